"""Wrapping a model for token reduction: hooks, per-forward state, FLOPs bookkeeping.

The reducer is the same for every host; how a library's model is hooked is its host adapter's (`ssmcompress.hosts`):
per reduction layer, a forward pre-hook on the importance site captures the signal the paper scores (the SSM output
before `out_proj`), and the layer's output passes through `_reduce` as the paper's two streams (hidden, residual):
both lose the same slots and keep the original order, and every later layer sees the shorter sequence, with the
positions, masks and caches of the kept tokens (the host's context hooks). All hooks are inert outside a reducer
call. Fused kernel paths that fold the importance site away are switched off on reduction layers only, and
restored by `remove()`, which leaves the model exactly as it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from ssmcompress import hosts
from ssmcompress.reduction import budget, kernels, longmamba
from ssmcompress.timing import Stopwatch, timed
from ssmcompress.reduction.merge import Reduced, Tokens, concat, rows_of

KEPT, PRUNED, MERGED = 0, 1, 2  # a slot's fate in a trace


def importance_of(y: Tensor, metric: str) -> Tensor:
    """Per-token importance from the SSM output y (..., d_inner) (paper Eq. 5 and its Table 3 ablation)."""
    # reductions accumulate in float32 without a float32 copy of y (at 2.7b, b8 x 2048 tokens, that is 335 MB)
    if metric in ("clip", "l1") and kernels.fused(y):  # one read of y, no clamped copy
        return kernels.importance(y, metric)
    if metric == "clip":
        return y.clamp(min=0).mean(-1, dtype=torch.float32)
    if metric == "raw":
        return y.mean(-1, dtype=torch.float32)
    if metric == "l1":
        return y.abs().mean(-1, dtype=torch.float32)
    if metric == "l2":
        return torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32)
    raise ValueError(f"unknown importance metric {metric!r}")


def delta_importance(delta: Tensor) -> Tensor:
    """Per-token importance from the SSM's Δ before its softplus (..., channels): the L2 norm over the channels of
    softplus(Δ), DeciMamba's decimation score (Ben-Kish et al., ICLR 2025; github.com/assafbk/DeciMamba,
    `get_non_decimated_indices`: torch.norm(softplus(delta + delta_bias), p=2, dim=1))."""
    return torch.linalg.vector_norm(torch.nn.functional.softplus(delta.float()), dim=-1)


@dataclass
class ReducedOutput:
    logits: Tensor  # (b, k, vocab); slots after a row's `counts` are fillers and hold NaN
    positions: Tensor  # (b, k) original position of each slot
    counts: Tensor  # (b,) real tokens kept per row
    trace: list[dict] | None = None


@dataclass
class ForwardState:
    """The bookkeeping of one reducer call, updated at every reduction layer."""

    positions: Tensor
    valid: Tensor
    protect: Tensor
    hidden_sizes: Tensor
    residual_sizes: Tensor
    n0: Tensor
    importance: dict = field(default_factory=dict)  # layer -> its importance, one tensor per mixer call (slices)
    counts: list = field(default_factory=list)  # real tokens per row after each reduction layer
    nonfinite: list = field(default_factory=list)  # (layer, (b, n) real tokens whose importance is NaN/inf)
    trace: list | None = None
    table: Tensor | None = None  # (b, steps) schedule=chunk: tokens each row keeps per reduction layer, -1: smooth
    planned: list[int] | None = None  # every row's real tokens after each reduction layer, known on the host
    context: dict = field(default_factory=dict)  # what the host's context hooks build once per reduction step
    keep_rates: Tensor | None = None  # (b,) float64 per-row keep rates (Setup.per_length), None: the setup's
    thresholds: Tensor | None = None  # (b, filter layers, heads) the Δ filter's per-row thresholds (longmamba)
    row_cursors: dict = field(default_factory=dict)  # a hook's key -> the next row it sees (next_rows)
    dropped: list = field(default_factory=list)  # per Δ-filter call, the real (token, head) pairs it set to Δ = 0
    # with `planned`: flat all-true and all-false masks as long as the input, whose prefixes are every later layer's
    # `valid` and `protect` (views: no launch per layer)
    full_rows: tuple[Tensor, Tensor] | None = None
    removals: Tensor | None = None  # with `planned`: (steps, b) every row's removals at each reduction layer

    def next_rows(self, key, rows: int) -> slice:
        """The rows of this forward that a hook's call on `rows` rows sees: a mixer run in batch slices
        (ssmcompress.mixer_slices) calls its modules once per slice, in row order."""
        start = self.row_cursors.get(key, 0)
        self.row_cursors[key] = (start + rows) % self.valid.shape[0]
        return slice(start, start + rows)


@dataclass
class Setup:
    """A resolved configuration (see `ssmcompress.reduction.resolve`)."""

    name: str
    function: object
    params: dict
    layers: list[int]
    keep_rate: float
    rule: str
    overhead: str
    min_keep_rate: float
    ratio: float | None  # the target; None where official's reduce_ratio was given directly
    reference_length: int
    strict: bool
    schedule: str = "smooth"  # smooth | chunk (budget.chunk_counts)
    uses_importance: bool = True  # the method reads the importance signal: capture it at out_proj
    ceiling: Setup | None = None  # the ceiling at this schedule (reduction.ceiling_of); None for the ceiling
    per_length: bool = False  # the keep rate is solved per row length (budget: models with attention layers)
    filter_layers: tuple = ()  # layers whose Mamba-2 heads the Δ filter acts in (longmamba), none elsewhere
    calibration: longmamba.Calibration | None = None  # the Δ filter's, set by reduction.from_config
    trapezoid: str = "kept"  # Mamba-3: kept | none (reduction.check_trapezoid)
    rotation: str = "kept"  # Mamba-3: kept | positions | sizes (reduction.check_rotation)


class Schedule:
    """The integer token counts a setup gives a row of n real tokens, and what they remove: the reducer's schedule,
    without a model (the config checks use it before any work)."""

    def __init__(self, setup: Setup, info: dict):
        self.setup = setup
        self.info_items = tuple(sorted((k, v) for k, v in info.items() if isinstance(v, (int, float, str))))
        self._min_length: int | None | bool = False  # computed on first use
        self._keep_rates: dict[int, float] = {}  # per_length: each length's, as solved

    def keep_rate(self, n: int) -> float:
        """The keep rate of a row of n real tokens (`keep_rates`)."""
        return self.keep_rates([n])[0]

    def keep_rates(self, lengths) -> list[float]:
        """The keep rate of a row of each length: the setup's (solved at the reference length), or, where the cost
        of a token depends on the length (attention), the one solved at that length (budget.keep_rates_at: the
        lengths not seen before in one solve; kept, as lm-eval repeats lengths)."""
        s = self.setup
        if not s.per_length or s.ratio is None or not s.layers:
            return [s.keep_rate] * len(lengths)
        new = sorted(set(lengths) - self._keep_rates.keys())
        if new:
            rates = budget.keep_rates_at(self.info_items, tuple(s.layers), s.ratio, s.min_keep_rate, new)
            self._keep_rates.update(zip(new, rates.tolist()))
        return [self._keep_rates[n] for n in lengths]

    def chunk_counts(self, n: int) -> tuple[int, ...] | None:
        """schedule=chunk: the tokens a row of n real tokens keeps after each reduction layer (budget.chunk_counts),
        None where it falls back to the smooth counts (and under schedule=smooth)."""
        s = self.setup
        if s.schedule != "chunk" or s.ratio is None:
            return None
        return budget.chunk_counts(self.info_items, tuple(s.layers), n, s.ratio, s.min_keep_rate)

    def chunk_reachable(self, n: int) -> bool:
        """Whether a row of n tokens has chunk counts (they reach the ratio), without searching for them."""
        s = self.setup
        return s.schedule == "chunk" and s.ratio is not None and budget.chunk_reachable(
            self.info_items, tuple(s.layers), n, s.ratio, s.min_keep_rate)

    def check_lengths(self, lengths) -> None:
        """strict mode: a ValueError for a row length whose integer schedule falls short of the ratio."""
        shortest = self.min_length()
        for n in sorted(set(lengths)):
            reached = self.predicted_ratio(n)
            if self.setup.ratio is not None and reached < self.setup.ratio - budget.TOLERANCE:
                hint = (f"sequences of at least {shortest} tokens reach it" if shortest else
                        f"no sequence up to {self.setup.reference_length} tokens reaches it")
                raise ValueError(f"a sequence of {n} tokens is too short for ratio={self.setup.ratio}: with layers "
                                 f"{self.setup.layers} it reaches {reached:.4f}; {hint} (strict=false reduces it "
                                 f"as far as it goes and reports the achieved ratio)")

    def predicted_counts(self, n: int) -> list[int]:
        """Tokens an unprotected sequence of n real tokens keeps after each reduction layer."""
        s = self.setup
        return self.chunk_counts(n) or budget.predicted_counts(s.rule, self.keep_rate(n), n, len(s.layers),
                                                               s.min_keep_rate)

    def tokens_entering(self, n: int) -> list[int]:
        """Tokens each layer of the model receives from an unprotected sequence of n real tokens."""
        return budget.row_tokens(n, tuple(self.predicted_counts(n)), list(self.setup.layers),
                                 dict(self.info_items)["n_layer"])[0]

    def predicted_ratio(self, n: int) -> float:
        """FLOPs ratio the integer schedule removes from an unprotected sequence of n real tokens."""
        s = self.setup
        counts = self.predicted_counts(n)
        dense, reduced, _ = budget.row_flops(self.info_items, tuple(s.layers), n, tuple(counts), s.overhead)
        return 1.0 - reduced / dense

    def min_length(self) -> int | None:
        """The length from which on (up to the reference length) every unprotected sequence reaches the target
        ratio within the tolerance; None if the reference length itself does not (rounding makes the achieved
        ratio of short sequences jump up and down, so "the first length that reaches it" would mislead)."""
        if self._min_length is False:
            self._min_length = None
            s = self.setup
            if s.ratio is not None and s.layers:
                lengths = range(s.reference_length, 0, -1)
                self.keep_rates(lengths)  # per_length: every length's in one solve (each alone is a bisection)
                for n in lengths:
                    if not self.chunk_reachable(n) and self.predicted_ratio(n) < self.setup.ratio - budget.TOLERANCE:
                        break
                    self._min_length = n
        return self._min_length


class Reducer:
    """A token-reduced view of a model; `ssmcompress.reduction` documents the contract."""

    def __init__(self, model, setup: Setup, info: dict):
        self.model, self.setup, self.info = model, setup, info
        self.host = hosts.of_model(model)
        self.schedule = Schedule(setup, info)
        self._info_items = self.schedule.info_items
        self._state: ForwardState | None = None
        self._handles, self._flags = [], []
        self.stopwatch: Stopwatch | None = None  # set by metrics to time the reduction's own work
        # set by metrics to measure memory: each reduction layer's method runs on this many rows at a time (batches
        # whose widths come from the host only; the same result, the working memory of that many rows)
        self.row_slices: int | None = None
        self.prefill_entering: list[int] | None = None  # tokens entering each layer in the last reduced prefill
        self._pending = []  # (n0, counts, Δ-filter drops) of calls not yet added to the totals
        self._planned: dict[int, list[int] | None] = {}  # planned_counts per input length
        self._device_tables: dict[tuple, Tensor] = {}  # _on_device
        self._captured: ForwardState | None = None  # a call captured in a CUDA graph, until `settle_captured`
        self._totals = dict(calls=0, rows=0, tokens=0, final_tokens=0, dense_flops=0.0, reduced_flops=0.0,
                           overhead_flops=0.0, token_layers=0.0, chunk_fallback_rows=0, filter_dropped=0)
        for step, index in enumerate(setup.layers, start=1):
            self._handles += self.host.attach_streams(model, index, partial(self._reduce, index, step))
            if not setup.uses_importance:  # nothing to capture: the site and the fused paths stay as they are
                continue
            if setup.params.get("importance") == "delta":  # the SSM's Δ, read where the mixer computes it
                self._handles += self.host.attach_delta(model, index, partial(self._capture_delta, index))
            else:
                site = self.host.importance_site(model, index)
                self._handles.append(site.register_forward_pre_hook(partial(self._capture, index)))
            for owner, flag in self.host.fused_flags(model, index):
                self._flags.append((owner, flag, getattr(owner, flag)))
                setattr(owner, flag, False)
        if setup.layers:
            self._handles += self.host.attach_context(model, setup.layers[0], lambda: self._state)
        if setup.layers and setup.trapezoid == "none":
            self._handles += self.host.attach_trapezoid(model, setup.layers[0], lambda: self._state)
        if setup.layers and setup.rotation != "kept":
            self._handles += self.host.attach_rotation(model, setup.layers[0], lambda: self._state, setup.rotation)
        for slot, index in enumerate(setup.filter_layers):
            self._handles += self.host.attach_delta_filter(model, index, partial(self._filter_delta, slot))

    # ------------------------------------------------------------------------------------------ hooks

    def _capture(self, index: int, module, args):
        if self._state is not None:
            with timed(self.stopwatch, args[0]):
                # a mixer run in batch slices (ssmcompress.mixer_slices) calls out_proj once per slice, in row order
                self._state.importance.setdefault(index, []).append(
                    importance_of(args[0], self.setup.params.get("importance", "clip")))

    def _capture_delta(self, index: int, delta: Tensor):
        if self._state is not None:
            with timed(self.stopwatch, delta):
                self._state.importance.setdefault(index, []).append(delta_importance(delta))

    def _filter_delta(self, slot: int, dt: Tensor) -> Tensor | None:
        """The Δ filter's keep mask (batch, length, heads) for a Mamba-2 mixer's Δ before its softplus: Δ above the
        row's threshold at this layer and head (longmamba.row_thresholds). A mixer run in batch slices
        (ssmcompress.mixer_slices) calls in_proj once per slice, in row order."""
        state = self._state
        if state is None or state.thresholds is None:
            return None
        with timed(self.stopwatch, dt):
            rows = state.next_rows(("delta filter", slot), int(dt.shape[0]))
            keep = longmamba.keep_mask(torch.nn.functional.softplus(dt.float()), state.thresholds[rows, slot])
            state.dropped.append((~keep & state.valid[rows, :, None]).sum())
            return keep

    def _reduce(self, index: int, step: int, hidden: Tensor, residual: Tensor):
        state = self._state
        if state is None:
            return None
        with timed(self.stopwatch, hidden):
            return self._reduce_step(state, index, step, hidden, residual)

    def _reduce_step(self, state: ForwardState, index: int, step: int, hidden: Tensor, residual: Tensor):
        slices = state.importance.pop(index, None)
        importance = None if slices is None else slices[0] if len(slices) == 1 else torch.cat(slices)
        if importance is not None:  # a mixer run on its input padded at the end (compat.aligned_mamba1) scores the
            importance = importance[:, :hidden.shape[1]]  # padding too: the tokens are the first rows
        if importance is None and self.setup.uses_importance:
            raise RuntimeError(f"layer {index}: the importance site (out_proj) did not run as a module, so the token "
                               f"importance could not be captured (a fused kernel path is active)")
        # checked once after the forward (`_check_finite`): a check here would stall the GPU at every layer
        if importance is not None:  # x · 0 is 0 for a finite x, NaN for NaN and ±inf: two launches, isfinite takes four
            nonfinite = importance * 0 != 0
            state.nonfinite.append((index, nonfinite if state.planned is not None else nonfinite & state.valid))
        host_counts = None
        if state.planned is not None:  # (entering, kept), the same for every row: the budget's ask, known on the host
            host_counts = (state.planned[step - 2] if step > 1 else int(state.valid.shape[1]), state.planned[step - 1])
            n_remove = state.removals[step - 1]
        else:
            keep_rate = self.setup.keep_rate if state.keep_rates is None else state.keep_rates
            n_remove = budget.removals(self.setup.rule, keep_rate, state.n0, state.valid.sum(1), step, state.table)
        tokens = Tokens(hidden, residual, importance, state.hidden_sizes, state.residual_sizes, state.valid,
                        state.protect, state.positions, index, host_counts)
        reduced = self._decide(tokens, n_remove)
        if state.trace is not None:
            state.trace.append(trace_entry(index, tokens, reduced))
        self._advance(state, reduced)
        return reduced.hidden, reduced.residual

    def _decide(self, tokens: Tokens, n_remove: Tensor) -> Reduced:
        """The method's result, on `row_slices` rows at a time where set and every row's width is the host's."""
        rows, batch = self.row_slices, tokens.valid.shape[0]
        if not rows or batch <= rows or tokens.host_counts is None:
            return self.setup.function(tokens, n_remove, **self.setup.params)
        return concat([self.setup.function(rows_of(tokens, start, start + rows), n_remove[start:start + rows],
                                           **self.setup.params) for start in range(0, batch, rows)])

    @staticmethod
    def _advance(state: ForwardState, reduced: Reduced) -> None:
        width = reduced.source.shape[1]
        state.positions = state.positions.gather(1, reduced.source)
        if state.planned is not None:  # every row keeps the planned count, the width: all real, nothing protected
            state.valid, state.protect = (full[:reduced.source.numel()].view(reduced.source.shape)
                                          for full in state.full_rows)
        else:
            state.valid = torch.arange(width, device=state.valid.device) < reduced.counts[:, None]
            state.protect = state.protect.gather(1, reduced.source) & state.valid
        state.hidden_sizes, state.residual_sizes = reduced.hidden_sizes, reduced.residual_sizes
        state.counts.append(reduced.counts)

    # ------------------------------------------------------------------------------------------ calls

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, lengths: Tensor | None = None, protect: Tensor | None = None,
                 trace: bool = False) -> ReducedOutput:
        """Run the reduced model. `trace=True` also records, per reduction layer, every slot's fate."""
        state = self._begin(input_ids, lengths, protect, trace)
        try:
            logits = self.host.logits(self.model, input_ids)
        finally:
            self._state = None
        if capturing():
            # inside a CUDA graph capture (metrics.capture) the checks, which wait for the GPU, cannot run: they run on
            # the graph's own tensors after a replay (`settle_captured`)
            self._captured = state
            return ReducedOutput(logits, state.positions, state.valid.sum(1), state.trace)
        return self._settle(state, logits)

    def settle_captured(self) -> None:
        """After a replay of a CUDA graph that captured a call: that call's checks and bookkeeping, on the values the
        replay left in the graph's tensors (a replay runs no Python, so each replay is not counted in the totals)."""
        state, self._captured = self._captured, None
        if state is None:
            raise RuntimeError("no reducer call was captured in a CUDA graph")
        self._settle(state, None)

    def _begin(self, input_ids: Tensor, lengths: Tensor | None, protect: Tensor | None, trace: bool) -> ForwardState:
        """The bookkeeping of one reduced forward, made active for the hooks."""
        if self._handles is None:
            raise RuntimeError("this reducer was removed; build a new one with reduction.from_config")
        # int(): under torch.jit.trace (fvcore) shapes are tensors
        planned = self.planned_counts(int(input_ids.shape[1])) if lengths is None and protect is None else None
        valid, protect = check_inputs(input_ids, lengths, protect)
        n0 = valid.sum(1)
        if self.setup.strict:  # the lengths from the host where they are known there: no wait for the GPU
            self.schedule.check_lengths(n0.tolist() if lengths is not None else [int(input_ids.shape[1])])
        ones = torch.ones(valid.shape, device=valid.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        state = ForwardState(positions, valid, protect, ones, ones, n0, trace=[] if trace else None,
                             table=self._chunk_table(input_ids, lengths), planned=planned,
                             full_rows=None if planned is None else self._full_rows(input_ids),
                             removals=None if planned is None else self._removals(input_ids, planned),
                             keep_rates=self._keep_rates(input_ids, lengths),
                             thresholds=self._thresholds(input_ids, lengths))
        self._state = state
        return state

    def _keep_rates(self, input_ids: Tensor, lengths) -> Tensor | None:
        """Setup.per_length: each row's keep rate, from its length on the host (as `_chunk_table`)."""
        if not self.setup.per_length:
            return None
        return self._on_device(input_ids, lengths, "keep_rates", lambda rows: self.schedule.keep_rates(rows),
                               torch.float64)

    def _thresholds(self, input_ids: Tensor, lengths) -> Tensor | None:
        """The Δ filter's per-row thresholds (longmamba.row_thresholds), from the row lengths on the host."""
        s = self.setup
        if not s.filter_layers:
            return None
        return self._on_device(input_ids, lengths, "thresholds", lambda rows: longmamba.row_thresholds(
            s.calibration, rows, s.params["channel_threshold"], s.params["scale"], s.params["min_length"]),
            torch.float32)

    def _full_rows(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """ForwardState.full_rows, made once per input shape (as `_on_device`'s tables); read, never written."""
        key = ("full_rows", *input_ids.shape, input_ids.device)
        if key not in self._device_tables:
            self._device_tables[key] = (torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device),
                                        torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device))
        return self._device_tables[key]

    def _removals(self, input_ids: Tensor, planned: list[int]) -> Tensor:
        """ForwardState.removals: the planned counts' differences, every row alike (as `_on_device`'s tables)."""
        entering = [int(input_ids.shape[1])] + planned[:-1]
        return self._on_device(input_ids, None, "removals",
                               lambda rows: [[n - kept] * len(rows) for n, kept in zip(entering, planned)])

    def _on_device(self, input_ids: Tensor, lengths, what: str, per_rows, dtype=None) -> Tensor:
        """A per-row table computed on the host from the row lengths, on the input's device. Without `lengths` (every
        row real: the efficiency benchmarks) it is copied once per input shape, so that a forward of a shape seen
        before copies nothing from the host (a CUDA graph cannot capture such a copy)."""
        b, n = (int(size) for size in input_ids.shape)
        if lengths is not None:
            return torch.as_tensor(per_rows(torch.as_tensor(lengths).tolist()), dtype=dtype, device=input_ids.device)
        key = (what, b, n, input_ids.device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.as_tensor(per_rows([n] * b), dtype=dtype, device=input_ids.device)
        return self._device_tables[key]

    def _settle(self, state: ForwardState, logits: Tensor | None, same_counts: bool = False) -> ReducedOutput:
        """After a reduced forward: every check that needs the GPU's answer, in one synchronisation, and the
        bookkeeping. `same_counts`: every row must have kept as many tokens as every other (a prefill, whose cached
        states would otherwise include filler slots)."""
        with timed(self.stopwatch, state.n0):
            planned = zip(state.counts, state.planned or ())
            same = [(counts != counts[:1]).any() for counts in state.counts] if same_counts else []
            flags = torch.stack([state.valid.all()] + [bad.any() for _, bad in state.nonfinite]
                                + [(counts != count).any() for counts, count in planned] + same).tolist()
            found = len(state.nonfinite)
            _check_finite(state.nonfinite, flags[1:found + 1])
            _check_planned(self.setup.layers, flags[found + 1:len(flags) - len(same)])
            if any(flags[len(flags) - len(same):]):
                raise RuntimeError("the rows of a prefill kept different numbers of tokens; their cached states would "
                                   "include filler slots (generate prompts of one length per batch)")
            if logits is not None and not flags[0]:
                logits = logits.masked_fill(~state.valid[..., None], float("nan"))
            self._pending.append((state.n0, torch.stack(state.counts, 1) if state.counts else None,
                                  torch.stack(state.dropped).sum() if state.dropped else None))
        return ReducedOutput(logits, state.positions, state.valid.sum(1), state.trace)

    @contextlib.contextmanager
    def prefilling(self):
        """While active, every prefill of the model (the forward that starts a generation, as the host recognises it)
        runs reduced, with each row's last position protected: its logits start decoding, and every layer caches the
        states (and attention layers the keys and values) of the tokens it saw. Decoding steps run dense. After a
        prefill, `prefill_entering` holds the tokens that entered each layer (every row kept as many)."""
        def begin(input_ids):
            protect = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            protect[:, -1] = True
            self._prefill = self._begin(input_ids, None, protect, False)

        def settle():
            state, self._prefill, self._state = self._prefill, None, None
            if state is not None:
                self._settle(state, None, same_counts=True)
                counts = tuple(int(counts[0]) for counts in state.counts)
                self.prefill_entering = budget.row_tokens(int(state.n0[0]), counts, list(self.setup.layers),
                                                          self.info["n_layer"])[0]

        handles = self.host.prefill(self.model, begin, settle)
        self._prefill, self.prefill_entering = None, None
        try:
            yield self
        finally:
            self._state = self._prefill = None
            for handle in handles:
                handle.remove()

    def chunk_counts(self, n: int) -> tuple[int, ...] | None:
        return self.schedule.chunk_counts(n)

    def predicted_ratio(self, n: int) -> float:
        return self.schedule.predicted_ratio(n)

    def min_length(self) -> int | None:
        return self.schedule.min_length()

    def _chunk_table(self, input_ids: Tensor, lengths) -> Tensor | None:
        """Per row its chunk counts, -1 for the smooth counts; from the lengths on the host (no GPU wait when they
        live there, as lm-eval's do)."""
        if self.setup.schedule != "chunk" or not self.setup.layers:
            return None
        return self._on_device(input_ids, lengths, "chunk_table", lambda rows: [
            self.chunk_counts(length) or (-1,) * len(self.setup.layers) for length in rows])

    def ceiling(self) -> Reducer | None:
        """The `ceiling` at this reducer's schedule, on the same model (remove it before this one); None for the
        ceiling itself."""
        return None if self.setup.ceiling is None else Reducer(self.model, self.setup.ceiling, self.info)

    @property
    def totals(self) -> dict:
        """Running totals of the calls so far (rows, tokens, FLOPs); settled on reading, so that a forward never
        waits for its bookkeeping (Python arithmetic per row)."""
        pending, self._pending = self._pending, []
        for n0, counts, dropped in pending:
            self._account(n0, counts, dropped)
        return self._totals

    def add_totals(self, others: list[dict]) -> None:
        """Add other reducers' totals to this one's (the processes of a data-parallel evaluation)."""
        totals = self.totals
        for other in others:
            for key, value in other.items():
                totals[key] += value

    def _account(self, n0: Tensor, counts: Tensor | None, dropped: Tensor | None = None) -> None:
        """Add one call's real tokens, FLOPs (dense, reduced, overhead) and Δ-filter drops to the running totals."""
        per_row = counts.tolist() if counts is not None else [[] for _ in range(len(n0))]
        totals, layers = self._totals, tuple(self.setup.layers)
        totals["calls"] += 1
        totals["filter_dropped"] += 0 if dropped is None else int(dropped)
        for n, row in zip(n0.tolist(), per_row):
            dense, reduced, extra = budget.row_flops(self._info_items, layers, n, tuple(row), self.setup.overhead)
            entering, final = budget.row_tokens(n, tuple(row), list(layers), self.info["n_layer"])
            totals["rows"] += 1
            totals["tokens"] += n
            totals["final_tokens"] += final
            totals["dense_flops"] += dense
            totals["reduced_flops"] += reduced
            totals["overhead_flops"] += extra
            totals["token_layers"] += sum(entering) / self.info["n_layer"]
            totals["chunk_fallback_rows"] += self.setup.schedule == "chunk" and self.chunk_counts(n) is None

    def reduction_flops(self, tokens_per_layer: list[float]) -> float:
        """The reduction's own FLOPs for one sequence whose blocks saw `tokens_per_layer` tokens (the metrics
        module's hook; budget.overhead_flops at every reduction layer)."""
        return sum(budget.overhead_flops(self.setup.overhead, int(round(tokens_per_layer[layer])), self.info["d_model"])
                   for layer in self.setup.layers)

    def planned_counts(self, n: int) -> list[int] | None:
        """Real tokens per row after each reduction layer for a batch of unpadded, unprotected rows of n tokens,
        known on the host so that no width has to be read from the GPU: the budget's counts, where no layer asks
        for more than the method's limit (min_keep_rate); every method then removes exactly what is asked. None
        where a limit binds (the counts then follow each method's own rule: read from the GPU). Checked against
        the real counts after the forward."""
        if n not in self._planned:
            s = self.setup
            chunk = self.chunk_counts(n)  # schedule=chunk: within every method's limit by construction
            rate = self.schedule.keep_rate(n)
            capped = budget.predicted_counts(s.rule, rate, n, len(s.layers), s.min_keep_rate)
            asked = budget.predicted_counts(s.rule, rate, n, len(s.layers), 0.0)  # a limit no ask reaches
            self._planned[n] = list(chunk) if chunk is not None else capped if capped == asked and s.layers else None
        return self._planned[n]

    # ------------------------------------------------------------------------------------------ record

    def describe(self) -> dict:
        """The configuration, the budget (nominal, at the reference length) and what the calls so far achieved."""
        s, info = self.setup, self.info
        nominal = budget.flops_ratio(info, s.layers, s.keep_rate, s.reference_length)
        record = dict(
            method=s.name, params={k: v for k, v in s.params.items()}, layers=list(s.layers),
            target_ratio=s.ratio, keep_rate=s.keep_rate, removal_rule=s.rule, schedule=s.schedule,
            reference_length=s.reference_length,
            nominal=dict(flops_ratio=nominal, token_fraction=budget.token_fraction(s.layers, s.keep_rate,
                                                                                  info["n_layer"]),
                         final_keep=s.keep_rate ** len(s.layers),
                         max_ratio=budget.flops_ratio(info, s.layers, s.min_keep_rate, s.reference_length)
                         if s.layers else 0.0),
            min_length=self.min_length(),
        )
        if s.filter_layers:  # what the Δ filter acts in
            c = s.calibration
            record["delta_filter"] = dict(layers=list(s.filter_layers), window=c.window,
                                          global_heads=(c.decay_product > s.params["channel_threshold"]).sum(1).tolist())
        if s.schedule == "chunk":  # the counts at the reference length, and what they remove
            chunked = self.chunk_counts(s.reference_length)
            record["nominal"].update(chunk_counts=list(chunked) if chunked else None,
                                     chunk_flops_ratio=self.predicted_ratio(s.reference_length) if chunked else None)
        t = self.totals
        if t["rows"]:
            record["observed"] = dict(
                calls=t["calls"], rows=t["rows"], tokens=t["tokens"], final_tokens=t["final_tokens"],
                dense_flops=t["dense_flops"], reduced_flops=t["reduced_flops"], overhead_flops=t["overhead_flops"],
                achieved_ratio=1.0 - t["reduced_flops"] / t["dense_flops"],
                achieved_ratio_with_overhead=1.0 - (t["reduced_flops"] + t["overhead_flops"]) / t["dense_flops"],
                token_fraction=1.0 - t["token_layers"] / t["tokens"],
            )
            if s.schedule == "chunk":  # rows too short for a chunk schedule: reduced by the smooth counts
                record["observed"]["chunk_fallback_rows"] = t["chunk_fallback_rows"]
            if s.filter_layers:  # the share of the filtered layers' (token, head) steps the Δ filter set to 0
                record["observed"]["filter_dropped_share"] = t["filter_dropped"] / (
                    t["tokens"] * len(s.filter_layers) * s.calibration.decay_product.shape[1])
        else:
            record["observed"] = None
        return record

    def remove(self) -> None:
        """Remove every hook and restore the fused-path flags: the model is the dense model again."""
        for handle in self._handles or ():
            handle.remove()
        for mixer, flag, value in self._flags:
            setattr(mixer, flag, value)
        self._handles, self._flags = None, []


def capturing() -> bool:
    """Whether a CUDA graph capture is under way on the current stream (metrics.capture)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_finite(nonfinite: list, flags: list) -> None:
    """A clear error for the first reduction layer whose importance was NaN/inf on a real token."""
    for (index, bad), flag in zip(nonfinite, flags):
        if flag:
            rows = sorted(set(bad.nonzero()[:, 0].tolist()))
            raise FloatingPointError(f"layer {index}: token importance is NaN/inf for {int(bad.sum())} real token(s) "
                                     f"in row(s) {rows[:8]}; the model's activations are not finite (check the "
                                     f"weights and the dtype)")


def _check_planned(layers: list[int], flags: list) -> None:
    """A clear error where a layer's real counts differed from `Reducer.planned_counts` (the widths were taken
    from the plan, so a row keeping more would have lost tokens)."""
    for index, flag in zip(layers, flags):
        if flag:
            raise RuntimeError(f"layer {index}: the method kept a different number of tokens than the budget planned "
                               f"for unpadded, unprotected rows (non-finite activations, or a method that removes "
                               f"other than min(asked, its min_keep_rate limit)); pass lengths= to take the widths "
                               f"from the data instead")


def check_inputs(input_ids: Tensor, lengths: Tensor | None, protect: Tensor | None) -> tuple[Tensor, Tensor]:
    """Clear errors for malformed calls; returns the masks of real and of protected positions."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor (batch, length), got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    b, n = input_ids.shape
    positions = torch.arange(n, device=input_ids.device)
    if lengths is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=input_ids.device)
    else:
        lengths = torch.as_tensor(lengths, device=input_ids.device)
        if lengths.shape != (b,):
            raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
        if bool(((lengths < 1) | (lengths > n)).any()):
            raise ValueError(f"lengths must lie in [1, {n}] (rows are right-padded), got {lengths.tolist()}")
        valid = positions < lengths[:, None]
    if protect is None:
        return valid, torch.zeros_like(valid)
    protect = torch.as_tensor(protect, device=input_ids.device)
    if protect.shape != (b, n) or protect.dtype != torch.bool:
        raise ValueError(f"protect must be a bool tensor of shape {(b, n)}, got {protect.dtype} {tuple(protect.shape)}")
    return valid, protect & valid


def trace_entry(index: int, tokens: Tokens, reduced: Reduced) -> dict:
    """Where every slot entering a reduction layer went, as original positions (CPU tensors):
    `position` of each slot, `valid` (real tokens), `hidden` / `residual` fate (KEPT, PRUNED, MERGED), and
    `into`: for removed tokens, the original position of the token they were linked to (-1 for kept tokens
    and for tokens pruned without a link)."""
    plan = reduced.plan

    def fate(merged: Tensor) -> Tensor:
        return torch.where(plan.removed, torch.where(merged, MERGED, PRUNED), KEPT).to(torch.int8).cpu()

    linked = plan.removed & (plan.target != tokens.slots)
    into = torch.where(linked, tokens.positions.gather(1, plan.target), -1)
    return dict(layer=index, position=tokens.positions.cpu(), valid=tokens.valid.cpu(),
                hidden=fate(plan.merge_hidden), residual=fate(plan.merge_residual), into=into.cpu())
