"""WikiText-2, PTB and C4 perplexity as SparseGPT and Wanda report it (the pruning papers' language-modelling numbers).

The protocol of SparseGPT's `datautils.py` + `opt_eval` / `llama_eval` (Wanda's `lib/eval.py` is the same): the test
text joined into one string (WikiText-2 raw test split: "\\n\\n"; PTB test sentences: " "; C4: the first 1100
documents of validation shard 0 joined with " ", the tokens then cut to 256 windows), tokenised once as the
tokenizer does by default (LLaMA and OPT tokenizers put one BOS in front), cut into non-overlapping windows of
`seqlen` tokens (the remainder is dropped). Each window is scored on its own, its seqlen - 1 next-token losses
averaged; perplexity = exp(mean over windows of those means), which is SparseGPT's exp(Σ loss·seqlen / (n·seqlen)).
Any model whose forward returns `.logits` (both families) is scored. The datasets come from the hub; offline, the
benchmark stops before any work (harness.check_datasets), and `shakespeare_ppl` is the offline counterpart.
PTB is `ptb_text_only` as in SparseGPT; whether the installed `datasets` still loads it was not checked here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CORPORA = {
    "wikitext2": dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", split="test", field="text",
                      separator="\n\n"),
    "ptb": dict(path="ptb_text_only", name="penn_treebank", split="test", field="sentence", separator=" "),
    "c4": dict(path="allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
               split="validation", field="text", separator=" ", documents=1100, windows=256),
}


def test_text(corpus: str) -> str:
    """The corpus' evaluation text, joined as SparseGPT's loaders join it."""
    import datasets

    spec = CORPORA[corpus]
    data = datasets.load_dataset(spec["path"], spec.get("name"), data_files=spec.get("data_files"),
                                 split=spec["split"])
    if "documents" in spec:
        data = data.select(range(min(spec["documents"], len(data))))
    return spec["separator"].join(data[spec["field"]])


def token_windows(ids: list[int] | torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seqlen) of a token stream; the remainder is dropped."""
    ids = torch.as_tensor(ids)
    if max_windows is not None:
        ids = ids[: max_windows * seqlen]
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean over windows of each window's mean next-token loss)."""
    device = next(model.parameters()).device
    losses = []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        losses.append(loss.view(batch.shape[0], -1).mean(dim=1))
    return math.exp(torch.cat(losses).mean().item())


def evaluate(model, tokenizer, corpus: str, seqlen: int, batch_size: int = 8) -> dict:
    """{perplexity, windows, seqlen} of one corpus."""
    spec = CORPORA[corpus]
    ids = tokenizer(test_text(corpus), verbose=False)["input_ids"]
    windows = token_windows(ids, seqlen, spec.get("windows"))
    return dict(perplexity=perplexity(model, windows, batch_size), windows=windows.shape[0], seqlen=seqlen)
