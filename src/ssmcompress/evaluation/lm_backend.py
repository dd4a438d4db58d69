"""lm-eval backends for the models we built (mamba-ssm's or transformers'): dense, pruned, or token-reduced.

They are lm-eval's own backends, `mamba_ssm` (`MambaLMWrapper`, itself an `HFLM`) for mamba-ssm models and `hf`
(`HFLM`, given the model object) for transformers models, with the same narrow overrides (`Reduction`):
- (mamba-ssm) `_get_config` / `_create_model` take the model object we built instead of loading one from the hub;
- `_model_call` runs the reducer (if any) and returns logits in the layout lm-eval's `_loglikelihood_tokens`
  expects, according to the protocol:
  * `exact` (default): the positions lm-eval scores (each row's last `len(continuation)` input positions) are
    protected from reduction, and the kept positions' logits are scattered back to their original places, so
    lm-eval reads the right logits for the right tokens. Removed positions hold NaN: reading one would be loud, and
    a reducer that drops a protected position is an error. Each row's real length is passed to the reducer, so
    right padding is not reduced as if it were text and a padded batch scores as batch size 1 does.
  * `paper`: the shortened logits are returned as they are, and lm-eval's unchanged slicing
    (`ctx_len = inplen + (L' - padded_len)`) assumes every removed token lay before the continuation: exactly the
    official ToR_SSM evaluation (github.com/wuyushuwys/ToR_SSM, its lm-eval harness), padding reduced like text. Where that
    slice would start before position 0 (a short row in a batch with a long one) the official code sliced with a
    negative start; here the row reads the first positions instead and the count of such rows is reported.
- `_loglikelihood_tokens` only records, per distinct input row, how many trailing positions are scored, so
  that `_model_call` can protect them (lm-eval does not pass continuation lengths to `_model_call`).
- `_model_generate` generates through `ssmcompress.generation` (the library's own decoding, the prefill reduced).
Without a reducer `_model_call` is the backend's own: dense scores are lm-eval's.
"""
from __future__ import annotations

import logging

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.mamba_lm import MambaLMWrapper

from ssmcompress import distributed, generation, hosts

PAD_ID = 0  # lm-eval's pad_and_concat right-pads input rows with zeros
logger = logging.getLogger(__name__)


class Reduction:
    """The overrides both backends share (module docstring); `self.reducer`, `self.protocol` are set by them."""

    # Data parallel: lm-eval's hf backend shards the requests over the processes of `accelerate launch` only for a
    # model it loads itself onto several GPUs, and assumes one process for a model object. Our backends start the
    # launch's process group before lm-eval's __init__ (distributed.start: gloo on a CPU), which lm-eval's
    # Accelerator joins, and take the process's rank after it, so that lm-eval shards the model we built as well.
    def _join_processes(self) -> None:
        """After lm-eval's __init__: this process's rank among the launch's, so that lm-eval evaluates its shard of
        the requests and gathers every shard's results on rank 0."""
        if distributed.world_size() <= 1:
            return
        from accelerate import Accelerator

        if getattr(self, "accelerator", None) is None:
            self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes

    def get_model_info(self) -> dict:
        """What lm-eval records about the model, without asking the hub about `pretrained` (HFLM's version looks up
        its commit there, a request that fails for a local or built model)."""
        model = self._built_model
        info = dict(model_num_parameters=sum(p.numel() for p in model.parameters()),
                    model_dtype=str(next(model.parameters()).dtype), model_source=self.pretrained)
        if self.reducer is not None:
            info["reduction"] = {k: v for k, v in self.reducer.describe().items() if k != "observed"}
        return info

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        self._scored = scored_rows(requests, self.max_length)
        clamped_before = self.clamped_rows
        results = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if self.clamped_rows > clamped_before:
            logger.warning(f"paper protocol: {self.clamped_rows - clamped_before} request(s) had more tokens "
                           f"removed than their row held before the continuation; scored from position 0")
        return results

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.reducer is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            if self.protocol == "paper":
                return self.reducer(inps, lengths=None, protect=None).logits
            lengths, protect = lengths_and_protection(inps, self._scored)
            out = self.reducer(inps, lengths=lengths, protect=protect)
            return scatter_to_positions(out.logits, out.positions, protect, getattr(out, "counts", None))

    def _select_cont_toks(self, logits: torch.Tensor, contlen: int | None = None, inplen: int | None = None):
        if self.protocol == "paper" and self.reducer is not None and inplen is not None and inplen < contlen:
            self.clamped_rows += 1
            inplen = contlen
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """generate_until's generation, dense or reduced, through ssmcompress.generation (mamba-ssm's own decoding):
        lm-eval left-pads its batch, and a Mamba state would take the padding in, so the padding is dropped and each
        prompt is generated with those of its own length (the same tokens alone as in any batch). Returns lm-eval's
        layout: the padded context, then up to max_length - context length new tokens (eos after a stop)."""
        mask = generation_kwargs.pop("attention_mask", None)
        rows = context.tolist() if mask is None else [row[m.bool()].tolist() for row, m in zip(context, mask)]
        greedy = not generation_kwargs.get("do_sample") or not generation_kwargs.get("temperature", 1.0)
        sampling = generation.Sampling() if greedy else generation.Sampling(
            top_k=int(generation_kwargs.get("top_k") or 0), top_p=float(generation_kwargs.get("top_p") or 0.0),
            temperature=float(generation_kwargs.get("temperature", 1.0)))
        new = generation.generate_each(self._built_model, rows, max_length - context.shape[1], reducer=self.reducer,
                                       batch_size=self.batch_size, sampling=sampling, eos_token_id=self.eot_token_id)
        out = context.new_full((context.shape[0], max_length), self.eot_token_id)
        out[:, :context.shape[1]] = context
        for i, tokens in enumerate(new):
            out[i, context.shape[1]:context.shape[1] + len(tokens)] = torch.tensor(tokens, dtype=out.dtype)
        return out


def check_protocol(protocol: str) -> None:
    if protocol not in ("exact", "paper"):
        raise ValueError(f"unknown protocol {protocol!r}: use exact or paper")


class ReducedMambaLM(Reduction, MambaLMWrapper):
    """lm-eval's mamba_ssm backend on a mamba-ssm model we built (and its reducer); `ssmcompress.lmeval` builds them
    from lm-eval's string model_args for the model registered as `ssmcompress`."""

    def __init__(self, model, tokenizer, reducer=None, protocol: str = "exact", batch_size: int = 16,
                 max_length: int = 2048, source: str = "ssmcompress", **kwargs):
        check_protocol(protocol)
        self._built_model, self.reducer, self.protocol = model, reducer, protocol
        self._scored: dict[tuple, dict[int, int]] = {}
        self.clamped_rows = 0  # paper protocol: rows whose official slice would have started before position 0
        device = next(model.parameters()).device
        distributed.start(device)
        super().__init__(pretrained=source, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         device=str(device), **kwargs)
        self._join_processes()

    def _get_config(self, pretrained, **kwargs) -> None:
        self._config = self._built_model.config

    def _create_model(self, pretrained, dtype=None, **kwargs) -> None:
        self._model = self._built_model


class ReducedHFLM(Reduction, HFLM):
    """lm-eval's hf backend on a transformers model we built (and its reducer)."""

    def __init__(self, model, tokenizer, reducer=None, protocol: str = "exact", batch_size: int = 16,
                 max_length: int = 2048, source: str = "ssmcompress", **kwargs):
        check_protocol(protocol)
        self._built_model, self.reducer, self.protocol = model, reducer, protocol
        self._scored: dict[tuple, dict[int, int]] = {}
        self.clamped_rows = 0
        distributed.start(next(model.parameters()).device)
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         **kwargs)
        self.pretrained = source  # what get_model_info records (HFLM keeps the model object here)
        self._join_processes()


def backend_for(model) -> type:
    """The backend class for a built model: by its host."""
    return ReducedHFLM if hosts.of_model(model) is hosts.transformers else ReducedMambaLM


def scored_rows(requests, max_length: int) -> dict[tuple, dict[int, int]]:
    """lm-eval's input rows, keyed by the row without trailing pad ids: {row length: trailing positions scored}.

    lm-eval scores, per request, the logits at the last len(continuation) positions of
    inp = (context + continuation)[-(max_length + 1):][:-1]. Requests sharing an input row (its one-token-
    continuation cache) keep the largest count. Keying by the stripped row lets a padded batch row be matched in
    one lookup even when the row itself ends in pad ids."""
    rows: dict[tuple, dict[int, int]] = {}
    for _, context, continuation in requests:
        row = (context + continuation)[-(max_length + 1):][:-1]
        lengths = rows.setdefault(tuple(_strip_padding(row)), {})
        lengths[len(row)] = max(lengths.get(len(row), 0), len(continuation))
    return rows


def lengths_and_protection(inps: torch.Tensor, scored: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each batch row's real length and the positions lm-eval will score in it.

    A padded row is ambiguous only when its real tokens end in the pad id and a shorter known row matches it; then
    every candidate's scored positions are protected (a superset is safe) and the longest candidate is the length.
    """
    lengths = torch.zeros(inps.shape[0], dtype=torch.long)
    protect = torch.zeros(inps.shape, dtype=torch.bool)
    for i, row in enumerate(inps.tolist()):
        candidates = {length: count for length, count in scored.get(tuple(_strip_padding(row)), {}).items()
                      if length <= len(row)}
        if not candidates:
            raise RuntimeError("lm-eval sent an input row this backend did not see in the requests")
        lengths[i] = max(candidates)
        for length, count in candidates.items():
            protect[i, length - count: length] = True
    return lengths.to(inps.device), protect.to(inps.device)


def scatter_to_positions(logits: torch.Tensor, positions: torch.Tensor, protect: torch.Tensor,
                         counts: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, kept, vocab) logits of the kept positions -> (batch, length, vocab), NaN where a token was removed.
    `counts` (optional, per row): only a row's first counts[i] slots are real tokens, the rest fillers (NaN).
    Raises if a protected (scored) position is missing: its score would otherwise be read from a NaN or a neighbour."""
    if positions.shape != logits.shape[:2]:
        raise RuntimeError(f"reducer returned logits {tuple(logits.shape)} but positions {tuple(positions.shape)}")
    batch, length = protect.shape
    real = torch.ones_like(positions, dtype=torch.bool)
    if counts is not None:
        real = torch.arange(positions.shape[1], device=positions.device) < counts.to(positions.device)[:, None]
    # fillers go to a spare last column, so they can never overwrite or stand in for a real slot
    target = torch.where(real, positions, length)
    kept = protect.new_zeros(batch, length + 1).scatter_(1, target, True)[:, :length]
    missing = protect & ~kept
    if missing.any():
        row, position = missing.nonzero()[0].tolist()
        raise RuntimeError(f"the reducer removed protected position {position} of batch row {row}; "
                           f"the exact protocol needs every scored position kept")
    full = logits.new_full((batch, length + 1, logits.shape[-1]), float("nan"))
    return full.scatter_(1, target[..., None].expand_as(logits), logits)[:, :length]


def _strip_padding(row: list[int]) -> list[int]:
    end = len(row)
    while end > 0 and row[end - 1] == PAD_ID:
        end -= 1
    return row[:end]
