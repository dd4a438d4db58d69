"""lm-eval backend for mamba-ssm models we built: dense, pruned, or token-reduced.

It is lm-eval's own `mamba_ssm` backend (`MambaLMWrapper`, itself an `HFLM`) with narrow overrides:
- `_get_config` / `_create_model` take the model object we built instead of loading one from the hub;
- `_model_call` runs the reducer (if any) and returns logits in the layout lm-eval's `_loglikelihood_tokens`
  expects, according to the protocol:
  * `exact`: the positions lm-eval scores (each row's last `len(continuation)` input positions) are protected
    from reduction, and the kept positions' logits are scattered back to their original places, so lm-eval
    reads the right logits for the right tokens. Removed positions hold NaN: reading one would be loud.
  * `paper`: the shortened logits are returned as they are, and lm-eval's unchanged slicing
    (`ctx_len = inplen + (L' - padded_len)`) assumes every removed token lay before the continuation: exactly the
    official ToR_SSM evaluation (shared/reference paper-utr.md section 4). Rows whose slice would start before
    position 0 are clamped (`_select_cont_toks`), where the official code indexed with negative numbers.
- `_loglikelihood_tokens` only records, per distinct input row, how many trailing positions are scored, so
  that `_model_call` can protect them (lm-eval does not pass continuation lengths to `_model_call`).
"""
from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.mamba_lm import MambaLMWrapper


@register_model("ssmcompress")
class ReducedMambaLM(MambaLMWrapper):
    def __init__(self, model, tokenizer, reducer=None, protocol: str = "exact", batch_size: int = 16,
                 max_length: int = 2048, **kwargs):
        if protocol not in ("exact", "paper"):
            raise ValueError(f"unknown protocol {protocol!r}: use exact or paper")
        self._built_model, self.reducer, self.protocol = model, reducer, protocol
        self._scored = {}  # input row (tuple of token ids) -> number of trailing positions lm-eval will score
        device = str(next(model.parameters()).device)
        super().__init__(pretrained="ssmcompress-model", tokenizer=tokenizer, batch_size=batch_size,
                         max_length=max_length, device=device, **kwargs)

    def _get_config(self, pretrained, **kwargs) -> None:
        self._config = self._built_model.config

    def _create_model(self, pretrained, dtype=None, **kwargs) -> None:
        self._model = self._built_model

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        # lm-eval scores, for each request, the logits at the last len(continuation) positions of
        # inp = (context + continuation)[-(max_length + 1):][:-1]; remember that count per distinct input row.
        # Requests sharing an input row (lm-eval's one-token-continuation cache) keep the largest count.
        self._scored = {}
        for _, context, continuation in requests:
            row = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            self._scored[row] = max(self._scored.get(row, 0), len(continuation))
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _row_lengths_and_protection(self, inps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's real length (lm-eval right-pads with 0) and the positions it will score."""
        lengths = torch.zeros(inps.shape[0], dtype=torch.long)
        protect = torch.zeros(inps.shape, dtype=torch.bool)
        rows = inps.tolist()
        for i, row in enumerate(rows):
            # the longest prefix that is a known input row and is followed only by padding
            for length in range(len(row), 0, -1):
                if length < len(row) and row[length] != 0:
                    break
                scored = self._scored.get(tuple(row[:length]))
                if scored is not None:
                    lengths[i] = length
                    protect[i, length - scored: length] = True
                    break
            else:
                raise RuntimeError("lm-eval sent an input row this backend did not see in the requests")
        return lengths.to(inps.device), protect.to(inps.device)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.reducer is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            if self.protocol == "paper":
                # official alignment: no protection, padding reduced like real tokens, shortened output
                return self.reducer(inps, lengths=None, protect=None).logits
            lengths, protect = self._row_lengths_and_protection(inps)
            out = self.reducer(inps, lengths=lengths, protect=protect)
            full = out.logits.new_full((*inps.shape, out.logits.shape[-1]), float("nan"))
            return full.scatter_(1, out.positions[..., None].expand_as(out.logits), out.logits)

    def _select_cont_toks(self, logits: torch.Tensor, contlen: int | None = None, inplen: int | None = None):
        if self.protocol == "paper" and self.reducer is not None and inplen is not None and inplen < contlen:
            inplen = contlen  # the official code sliced with a negative start here; read the first rows instead
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)
