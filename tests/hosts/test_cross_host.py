"""The same checkpoint in two libraries reduces alike: the bundled Mamba-2 and Mamba-1 converted to transformers'
Mamba2ForCausalLM / MambaForCausalLM (transformers' conversion rules, ssmcompress.convert), and a Mamba-2 + attention
hybrid in mamba-ssm and as transformers' NemotronH, keep the same tokens at every reduction layer and give the same
log-likelihoods, for every method at 10 and 30 %. This checks that the transformers host's two streams (captured
inside its layers) are mamba-ssm's (returned by its blocks), and the hybrid's positions, masks and caches."""
import json

import pytest
import torch

from conftest import TOKENIZER_DIR, compose_config
from ssmcompress import convert, models, reduction
from ssmcompress.config import ASSETS
from ssmcompress.hosts import mamba_ssm
from ssmcompress.hosts import transformers as hf

# the methods that remove tokens (longmamba's Δ filter: tests/reduction/test_longmamba.py compares it across hosts)
METHODS = sorted(name for name, entry in reduction.METHODS.items() if name != "ceiling" and not entry.filters_delta)
HYBRID = dict(d_model=128, n_layer=12, vocab_size=4096, pad_vocab_size_multiple=16, attn_layer_idx=[4, 9],
              attn_cfg=dict(num_heads=4, num_heads_kv=2, causal=True, qkv_proj_bias=False, out_proj_bias=False),
              ssm_cfg=dict(layer="Mamba2", d_state=64, headdim=32, chunk_size=64))


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on one thread (conftest.single_thread)."""


@pytest.fixture(scope="module")
def documents():
    """Four documents of the offline suite (recall and story tasks), right-padded, their last two tokens protected
    (scored), as lm-eval's batches are."""
    tokenizer = models.load_tokenizer(str(TOKENIZER_DIR))
    rows = []
    for task in ("mqar", "story_qa"):
        with open(ASSETS / "tasks" / "offline" / f"{task}.jsonl") as f:
            for line in list(f)[:2]:
                doc = json.loads(line)
                rows.append(tokenizer(doc["context"] + " " + doc["choices"][doc["label"]])["input_ids"])
    lengths = torch.tensor([len(row) for row in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    protect = torch.zeros(ids.shape, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        protect[i, len(row) - 2:len(row)] = True
    return ids, lengths, protect


def bundled(name: str):
    return mamba_ssm.load_model(str(ASSETS / "models" / name), "cpu", "float32")


@pytest.fixture(scope="module", params=["mamba2-tiny", "mamba-tiny", "hybrid"])
def pair(request):
    """(mamba-ssm model, its info, the transformers model, its info)."""
    if request.param == "hybrid":
        model = mamba_ssm.build_model(HYBRID, "cpu", "float32", seed=7)
    else:
        model = bundled(request.param)
    twin = convert.to_transformers(model)
    return request.param, model, mamba_ssm.model_info(model), twin, hf.model_info(twin)


def scores(out, ids, protect):
    """Each row's summed log-likelihood of its protected (scored) tokens, read at their original positions."""
    logits = torch.full((*ids.shape, out.logits.shape[-1]), float("nan"))
    real = torch.arange(out.positions.shape[1]) < out.counts[:, None]
    for row in range(ids.shape[0]):
        logits[row, out.positions[row, real[row]]] = out.logits[row, real[row]]
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logprobs * protect[:, 1:]).nan_to_num().sum(1)


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_both_libraries_keep_the_same_tokens_and_score_alike(pair, documents, ratio):
    name, model, info, twin, twin_info = pair
    ids, lengths, protect = documents
    for method in METHODS:
        outs = []
        for net, details in ((model, info), (twin, twin_info)):
            reducer = reduction.from_config(net, compose_config([f"method={method}", f"ratio={ratio}"]), details)
            try:
                outs.append(reducer(ids, lengths=lengths, protect=protect, trace=True))
            finally:
                reducer.remove()
        ssm, tf = outs
        assert torch.equal(ssm.counts, tf.counts), (name, method)
        for a, b in zip(ssm.trace, tf.trace):  # every reduction layer: the same fate for every slot
            assert torch.equal(a["position"], b["position"]) and torch.equal(a["hidden"], b["hidden"]), (name, method)
            assert torch.equal(a["residual"], b["residual"]) and torch.equal(a["into"], b["into"]), (name, method)
        torch.testing.assert_close(scores(ssm, ids, protect), scores(tf, ids, protect), atol=2e-4, rtol=1e-5)
