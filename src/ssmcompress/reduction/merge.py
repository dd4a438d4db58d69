"""Matching, merging and compaction helpers shared by every reduction method: one place for each idea.

Conventions. Tensors are batched over rows (b) and token slots (n). A row's real tokens occupy its first
`count` slots, in original order; the slots after them hold right padding or fillers (see `compact`). Rows have
different counts, so selections use masks and *stable* sorts (ties go to the lower slot), never Python loops
over tokens: a row's result never depends on the other rows of its batch.

The index map a method produces is a `Plan` over its input slots: which slots are removed, the slot each removed
token is linked to, and, per stream, whether the removed token is averaged into that slot (merged) or dropped
(pruned). `apply` turns a plan into the reduced streams; methods only decide the plan.

On a GPU, matching and merging run as fused Triton kernels (`kernels`: no float32 copy of a stream, no similarity
matrix in memory, no width read back by the host); the pure-torch functions here are their reference and the CPU
path. Widths: a batch of unpadded, unprotected rows (the benchmark, the `paper` protocol) has every row's counts
known on the host from the budget (`Tokens.host_counts`), so the output width needs no synchronisation either.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmcompress.reduction import kernels

INF = float("inf")


@dataclass
class Tokens:
    """What a reduction layer sees: one block's outputs and the bookkeeping of the current slots."""

    hidden: Tensor  # (b, n, d) the block's mixer output
    residual: Tensor  # (b, n, d) the running residual (pre-norm sum)
    importance: Tensor  # (b, n) float32 per-token importance (patch.importance_of)
    hidden_sizes: Tensor  # (b, n) original tokens averaged into each slot, hidden stream
    residual_sizes: Tensor  # (b, n) the same for the residual stream
    valid: Tensor  # (b, n) bool: real tokens (not padding, not fillers)
    protect: Tensor  # (b, n) bool: never removed, never averaged into
    positions: Tensor  # (b, n) original position of each slot
    layer: int  # block index (seeds the random baseline)
    # (real tokens per row entering, kept) when these are the same for every row and known on the host (no padding,
    # no protection: the budget's counts), so that no width has to be read from the GPU; None: read from the masks
    host_counts: tuple[int, int] | None = None

    @cached_property  # computed once per layer, however many of a method's steps ask (each is a launch on a GPU)
    def movable(self) -> Tensor:
        """Slots a method may remove or merge into."""
        if self.host_counts is not None:  # every slot real, none protected (see host_counts): two launches fewer
            return self.valid
        return self.valid & ~self.protect

    @cached_property
    def slots(self) -> Tensor:
        b, n = self.valid.shape
        return torch.arange(n, device=self.valid.device).expand(b, n)


@dataclass
class Plan:
    """A method's decision, over its input slots (the index map)."""

    removed: Tensor  # (b, n) bool
    target: Tensor  # (b, n) long: the slot a removed token is linked to (the slot itself when kept)
    merge_hidden: Tensor  # (b, n) bool: removed tokens averaged into their target in the hidden stream
    merge_residual: Tensor  # (b, n) bool: ... in the residual stream; removed and not merged = pruned
    weights: Tensor | None  # (b, n) weight of each slot in the averages (ones, softmax importance), or None:
    # each stream weighs slots by its own carried sizes (ToMe)
    prune_only: bool = False  # known to merge nothing: apply skips the averages (a full pass over each stream)


@dataclass
class Reduced:
    """A reduction layer's result: the shortened streams and where each output slot came from."""

    hidden: Tensor  # (b, k, d)
    residual: Tensor  # (b, k, d)
    hidden_sizes: Tensor  # (b, k)
    residual_sizes: Tensor  # (b, k)
    source: Tensor  # (b, k) input slot of each output slot (real tokens first, in order; then fillers)
    counts: Tensor  # (b,) real tokens kept per row
    plan: Plan


def rows_of(tokens: Tokens, start: int, stop: int) -> Tokens:
    """Rows start:stop of a reduction layer's input (a method's result for a row depends on that row alone)."""
    return replace(tokens, **{f.name: getattr(tokens, f.name)[start:stop] for f in fields(Tokens)
                              if isinstance(getattr(tokens, f.name), Tensor)})


def concat(parts: list[Reduced]) -> Reduced:
    """The results of consecutive row slices as one, rows in order; every part has the same width (the host's
    counts: see `Tokens.host_counts`)."""
    def cat(values):
        return None if values[0] is None else torch.cat(values)

    plans = [part.plan for part in parts]
    plan = Plan(*(cat([getattr(p, name) for p in plans]) for name in ("removed", "target", "merge_hidden",
                                                                        "merge_residual", "weights")),
                prune_only=all(p.prune_only for p in plans))
    return Reduced(*(cat([getattr(part, f.name) for part in parts]) for f in fields(Reduced) if f.name != "plan"),
                   plan=plan)


# ---------------------------------------------------------------------------------------------- ranking


def ranks(key: Tensor, descending: bool = False) -> Tensor:
    """Each slot's rank in a stable sort of `key` along the last dim (ties: the lower slot ranks first)."""
    order = torch.sort(key, dim=-1, descending=descending, stable=True).indices
    position = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, position)


def lowest(key: Tensor, count: Tensor, eligible: Tensor) -> Tensor:
    """The `count[row]` eligible slots of each row with the smallest key (ties: lower slot first); keys compared
    as float32. One kernel on the GPU (kernels.select: the same slots, without a sort)."""
    if kernels.fused_per_row(key):
        return kernels.select(key, count, eligible, largest=False)
    return eligible & (ranks(key.float().masked_fill(~eligible, INF)) < count[:, None])


def highest(key: Tensor, count: Tensor, eligible: Tensor) -> Tensor:
    """The `count[row]` eligible slots of each row with the largest key (ties: lower slot first); keys compared
    as float32. One kernel on the GPU (kernels.select)."""
    if kernels.fused_per_row(key):
        return kernels.select(key, count, eligible, largest=True)
    return eligible & (ranks(key.float().masked_fill(~eligible, -INF), descending=True) < count[:, None])


def first_of(mask: Tensor, count: Tensor) -> Tensor:
    """The first `count[row]` slots of each row where `mask` holds: lowest(slots, count, mask), without a sort."""
    return mask & (mask.cumsum(-1) <= count[:, None])


def last_of(mask: Tensor, count: Tensor) -> Tensor:
    """The last `count[row]` slots of each row where `mask` holds: highest(slots, count, mask), without a sort."""
    after = mask.sum(-1, keepdim=True) - mask.cumsum(-1)  # mask slots after this one
    return mask & (after < count[:, None])


def alternate(present: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe's split of a sequence into sets A (even) and B (odd), counted over the `present` slots only."""
    rank = present.long().cumsum(-1) - 1
    even = present & (rank % 2 == 0)
    return even, present & ~even


def round_half_up(x: Tensor) -> Tensor:
    """Deterministic rounding of non-negative counts (torch.round rounds half to even)."""
    return torch.floor(x + 0.5).long()


# ---------------------------------------------------------------------------------------------- matching


def pack(mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The slots where `mask` holds, gathered to the front of each row in slot order: (index, ok), (b, width)
    with width at least the largest count; `ok` marks real entries (the rest point at the other slots, in order)."""
    count = mask.sum(-1)
    order = arrange(mask, count[:, None], width=width)
    ok = torch.arange(width, device=mask.device) < count[:, None]
    return order, ok


def arrange(first: Tensor, first_count: Tensor, second: Tensor | None = None, width: int | None = None) -> Tensor:
    """The permutation that lists each row's `first` slots, then its `second` slots, then the rest, each group in
    slot order: a stable sort by group, computed by counting (each slot's place follows from running counts of the
    groups, so no sort runs); its first `width` places (default: all). `first_count`: (b, 1) the first group's
    sizes; `second` excludes `first` slots. One kernel on the GPU (kernels.arrange)."""
    b, n = first.shape
    width = n if width is None else min(width, n)
    if kernels.fused_per_row(first):
        return kernels.arrange(first, second, width)
    slots = torch.arange(n, device=first.device).expand(b, n)
    before_first = first.cumsum(-1) - first.long()  # slots of `first` before this one, in the row
    if second is None:
        place = torch.where(first, before_first, first_count + slots - before_first)
    else:
        before_second = second.cumsum(-1) - second.long()
        place = torch.where(first, before_first, torch.where(
            second, first_count + before_second,
            first_count + second.sum(-1, keepdim=True) + slots - before_first - before_second))
    return torch.empty_like(slots).scatter_(1, place, slots)[:, :width]


def flat_index(index: Tensor, n: int) -> Tensor:
    """Row-major indices into a (b·n, ...) flattening of a (b, n, ...) tensor."""
    return (index + n * torch.arange(index.shape[0], device=index.device)[:, None]).flatten()


def gather_slots(x: Tensor, index: Tensor) -> Tensor:
    """x[row, index[row, j]] for (b, n) or (b, n, d) tensors (flat indexing: much faster than an expanded gather)."""
    b, n = x.shape[:2]
    return x.flatten(0, 1)[flat_index(index, n)].view(b, index.shape[1], *x.shape[2:])


def best_match(metric: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """For every `src` slot its most cosine-similar `dst` slot and that similarity (ToMe's matching step).

    Returns (partner, score), both (b, n): for slots that are not in `src`, or have no `dst` to go to, the
    partner is the slot itself and the score is -inf. Ties go to the lower dst slot.
    Fused on the GPU (kernels.best_match: the same scores up to float32 rounding, see there). Here the matrix is
    exactly as wide as the largest set, read from the device: a wider one would round its products differently.
    """
    b, n = src.shape
    if kernels.fused(metric):  # each row's counts are read inside the kernel: no width, no synchronisation
        src_count, dst_count = src.sum(-1), dst.sum(-1)
        return kernels.best_match(metric, arrange(src, src_count[:, None]), src_count,
                                  arrange(dst, dst_count[:, None]), dst_count)
    unit = F.normalize(metric.float(), dim=-1)  # a zero vector stays zero: similarity 0, never NaN
    widths = torch.stack([src.sum(-1).amax(), dst.sum(-1).amax()]).clamp(min=1).tolist()  # one synchronisation
    a_index, a_ok = pack(src, widths[0])
    b_index, b_ok = pack(dst, widths[1])
    similarity = gather_slots(unit, a_index) @ gather_slots(unit, b_index).transpose(1, 2)
    similarity = similarity.masked_fill(~b_ok[:, None, :], -INF)
    best, column = similarity.max(dim=-1)  # first maximal index on ties
    best = best.masked_fill(~a_ok, -INF)
    partner_of_a = torch.where(a_ok & (best > -INF), b_index.gather(1, column), a_index)
    slots = torch.arange(n, device=src.device).expand(b, n)
    partner = slots.clone().scatter_(1, a_index, partner_of_a)  # a_index is a permutation prefix: no clashes
    score = torch.full((b, n), -INF, device=src.device).scatter_(1, a_index, best)
    return partner, score


# ---------------------------------------------------------------------------------------------- merging


def average_into(x: Tensor, target: Tensor, merged: Tensor, weights: Tensor) -> Tensor:
    """Weighted average of every slot with the slots merged into it: x'[t] = Σ w·x / Σ w over t and its sources.

    Only receiving slots change; the others keep their exact value (no x·w/w rounding), merged slots keep a
    stale value and are dropped by `compact`. Accumulated in float32 in slot order, returned in x's dtype.
    Written over all slots (a slot that is not merged adds an exact zero to itself) rather than over the merged
    ones: selecting them would need their count on the host, a GPU synchronisation at every reduction layer.
    """
    b, n = merged.shape
    rows = x.flatten(0, 1)
    weights = weights.flatten().float()
    merged = merged.flatten()
    index = flat_index(target, n)
    weighted = rows.float() * weights[:, None]
    total = weighted.index_add(0, index, torch.where(merged[:, None], weighted, 0.0))
    mass = weights.index_add(0, index, torch.where(merged, weights, 0.0))
    received = torch.zeros_like(weights).index_add_(0, index, merged.float()) > 0
    out = torch.where(received[:, None], (total / mass[:, None]).to(x.dtype), rows)
    return out.view_as(x)


def merge_stream(x: Tensor, sizes: Tensor, source: Tensor, target: Tensor | None = None,
                 merged: Tensor | None = None, weights: Tensor | None = None,
                 groups: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """A stream and its sizes at the output slots `source` after merging: gather_slots of average_into(x, target,
    merged, weights) and of carry_sizes(sizes, target, merged); merged None: nothing is merged (the gathers alone).
    One fused pass on the GPU (kernels.merge_stream, bit for bit the same arithmetic)."""
    if kernels.fused(x):
        return kernels.merge_stream(x, sizes, source, target, merged, weights, groups)
    if merged is None:
        return gather_slots(x, source), gather_slots(sizes, source)
    return (gather_slots(average_into(x, target, merged, weights), source),
            gather_slots(carry_sizes(sizes, target, merged), source))


def carry_sizes(sizes: Tensor, target: Tensor, merged: Tensor) -> Tensor:
    """Sizes after merging: a slot accumulates the sizes of the slots merged into it."""
    slots = torch.arange(sizes.shape[1], device=sizes.device).expand_as(target)
    moving = sizes * merged
    return (sizes - moving).scatter_add(1, torch.where(merged, target, slots), moving)


def compact(keep: Tensor, valid: Tensor | None, width: int | None = None) -> tuple[Tensor, Tensor]:
    """The input slot of each output slot, and the real tokens kept per row.

    Output rows are as long as the longest row's kept tokens: each row's kept real slots in order, then fillers
    (its padding first, then its removed slots) so the batch stays rectangular. Fillers come after every real
    token, so a causal model's real outputs never depend on them. `valid` None: every slot is real. `width`: that
    length when the host knows it (Tokens.host_counts), else it is read from the device (a synchronisation).
    """
    kept = keep if valid is None else keep & valid
    counts = kept.sum(1)
    width = max(int(counts.max()), 1) if width is None else width
    return arrange(kept, counts[:, None], None if valid is None else ~valid, width), counts


def apply(tokens: Tokens, plan: Plan, hidden: Tensor | None = None, residual: Tensor | None = None) -> Reduced:
    """Carry out a plan: average merged tokens into their targets per stream, then drop removed slots.

    `hidden` / `residual`: streams a method has already merged its own way (`official`); the plan then only
    serves as the index map for that stream.
    """
    host = tokens.host_counts  # known counts: every slot real (no padding to place after the kept ones)
    source, counts = compact(~plan.removed, tokens.valid if host is None else None, None if host is None else host[1])
    if plan.prune_only:  # nothing is averaged: streams and sizes are gathered as they are
        hidden, hidden_sizes = merge_stream(tokens.hidden, tokens.hidden_sizes, source)
        residual, residual_sizes = merge_stream(tokens.residual, tokens.residual_sizes, source)
        return Reduced(hidden, residual, hidden_sizes, residual_sizes, source, counts, plan)
    groups = None  # the fused merge's senders per receiver: one table for both streams
    if (hidden is None or residual is None) and kernels.fused(tokens.hidden):
        groups = kernels.sender_groups(plan.target, plan.merge_hidden | plan.merge_residual)
    streams = {}
    for name, merged_own_way, merged in (("hidden", hidden, plan.merge_hidden), ("residual", residual,
                                                                                  plan.merge_residual)):
        sizes = getattr(tokens, f"{name}_sizes")
        if merged_own_way is None:
            weights = sizes if plan.weights is None else plan.weights
            streams[name] = merge_stream(getattr(tokens, name), sizes, source, plan.target, merged, weights, groups)
        else:  # a method's own merge (`official`): the plan carries the sizes and places the slots
            streams[name] = (gather_slots(merged_own_way, source),
                             gather_slots(carry_sizes(sizes, plan.target, merged), source))
    (hidden, hidden_sizes), (residual, residual_sizes) = streams["hidden"], streams["residual"]
    return Reduced(hidden, residual, hidden_sizes, residual_sizes, source, counts, plan)
