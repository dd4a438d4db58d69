"""The reduction methods: one short function each, one signature, on top of the helpers in `merge`.

    method(tokens: Tokens, n_remove: LongTensor (b,), **params) -> Reduced

`tokens` carries the two streams, the importance signal, the token sizes and the protection mask; `n_remove` is
the number of real tokens each row should lose at this layer (the budget's target count). A method may remove
fewer (never a protected token, at most half the movable tokens where it matches two halves); the counts it
achieved are in the result. Similarities are cosines of the block's mixer output (the hidden stream), as in the
official code. Merged values are weighted averages; the weights are the carried sizes (`sizes: carry`, ToMe) or
1 per token at every layer (`sizes: reset`, the paper's (a + f)/2 and the official code). A merged token takes
the place of the token it is merged into, so every method keeps the original order. The positional baselines
(`early`, `early_merge`, `strided`, `late`) decide by position alone and get no importance signal (None).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ssmcompress.reduction.merge import (INF, Plan, Reduced, Tokens, alternate, apply, best_match, first_of,
                                         gather_slots, highest, last_of, lowest, ranks, round_half_up)

STRATEGY_Q = {"prune": 1.0, "merge": 0.0}  # hybrid: the configured q


def merge_weights(tokens: Tokens, sizes: str) -> Tensor | None:
    """`carry`: None, i.e. each stream weighs by its own carried sizes; `reset`: every token weighs 1."""
    return None if sizes == "carry" else torch.ones(tokens.valid.shape, device=tokens.valid.device)


def stream_q(strategy: str, q: float | None) -> float:
    return STRATEGY_Q.get(strategy, q)


def links_to_prune(selected: Tensor, score: Tensor, importance: Tensor, q: float, order: str) -> Tensor:
    """Of each row's selected links, the round(q · count) that a hybrid stream prunes (the rest are merged)."""
    if q in (0.0, 1.0):  # a pure merge or prune stream: all or none, without ranking the links
        return selected if q == 1.0 else torch.zeros_like(selected)
    count = round_half_up(q * selected.sum(1).double())
    if order == "most_similar":  # near-duplicates: dropping them loses least, merging them would change little
        return highest(score, count, selected)
    if order == "least_similar":
        return lowest(score, count, selected)
    return lowest(importance, count, selected)  # least_important


def utr(tokens: Tokens, n_remove: Tensor, *, hidden: str = "hybrid", residual: str = "merge", q: float = 0.5,
        hidden_q: float | None = None, residual_q: float | None = None, prune_links: str = "most_similar",
        sizes: str = "reset", **_) -> Reduced:
    """Unified token reduction (the paper's text, Sec. 4.2): importance decides who may go, similarity where.

    The movable tokens are split by importance into a less important half A (the floor(m/2) lowest, ties to the
    earlier token) and a more important half B; each A token is linked to its most cosine-similar B token; the
    `n_remove` links with the highest similarity are removed. Per stream (`hidden`, `residual`): prune drops
    them, merge averages them into their B token, hybrid prunes round(q·r) links chosen by `prune_links` and
    merges the rest. `hidden_q` / `residual_q` override q per stream (paper Table 5). B tokens are never removed.
    """
    return utr_among(tokens, n_remove, tokens.movable, hidden, residual, q, hidden_q, residual_q, prune_links, sizes)


def utr_early(tokens: Tokens, n_remove: Tensor, *, window: float = 2.0, hidden: str = "hybrid",
              residual: str = "merge", q: float = 0.5, hidden_q: float | None = None, residual_q: float | None = None,
              prune_links: str = "most_similar", sizes: str = "reset", **_) -> Reduced:
    """UTR within the earliest tokens: the same importance split, matching and hybrid prune/merge, among the first
    round(window · n_remove) movable tokens of each row only (window >= 2, the least that lets the two halves
    remove n_remove). Motivated by the positional baselines: at the same budget, where tokens are removed (the
    start of the sequence, whose content the recurrent state of the earlier layers already carries) matters more
    on the bundled models than which tokens importance and similarity pick (docs/results.md: What drives the
    official code's gain). window -> infinity is UTR."""
    window_size = torch.ceil(n_remove.double() * window).long()
    early_movable = first_of(tokens.movable, window_size)
    return utr_among(tokens, n_remove, early_movable, hidden, residual, q, hidden_q, residual_q, prune_links, sizes)


def utr_among(tokens: Tokens, n_remove: Tensor, candidates: Tensor, hidden: str, residual: str, q: float,
              hidden_q: float | None, residual_q: float | None, prune_links: str, sizes: str) -> Reduced:
    """UTR's decision (see `utr`) among the `candidates` slots: A and B halves, links, hybrid prune/merge."""
    half = candidates.sum(1) // 2
    less = lowest(tokens.importance, half, candidates)
    partner, score = best_match(tokens.hidden, less, candidates & ~less)
    removed = highest(score, torch.minimum(n_remove, half), less & (score > -INF))
    merged = {}
    for stream, strategy, override in (("hidden", hidden, hidden_q), ("residual", residual, residual_q)):
        share = stream_q(strategy, q if override is None else override)
        merged[stream] = removed & ~links_to_prune(removed, score, tokens.importance, share, prune_links)
    return apply(tokens, Plan(removed, partner, merged["hidden"], merged["residual"], merge_weights(tokens, sizes)))


def evit(tokens: Tokens, n_remove: Tensor, *, fuse_token: bool = False, **_) -> Reduced:
    """EViT: keep the most important tokens (ties: the earlier token goes first), in their original order.

    fuse_token: the dropped tokens plus the next least important one are fused into one token, an average
    weighted by softmax(importance) (EViT's attention weights, renormalised), placed at the latest of their
    positions so that it only carries information from positions at or before its own.
    """
    movable = tokens.movable
    extra = 1 if fuse_token else 0
    count = torch.minimum(n_remove, (movable.sum(1) - extra).clamp(min=0))
    dropped = lowest(tokens.importance, count + extra * (count > 0), movable)
    if not fuse_token:
        return apply(tokens, prune_plan(tokens, dropped))
    fused = torch.where(dropped, tokens.slots, -1).amax(1, keepdim=True)  # the latest dropped slot, -1 if none
    removed = dropped & (tokens.slots != fused)
    peak = tokens.importance.masked_fill(~dropped, -INF).amax(1, keepdim=True)
    weights = torch.where(dropped, (tokens.importance - peak).exp(), torch.ones_like(tokens.importance))
    target = torch.where(removed, fused.expand_as(removed), tokens.slots)
    return apply(tokens, Plan(removed, target, removed, removed, weights))


def tome(tokens: Tokens, n_remove: Tensor, *, sizes: str = "carry", **_) -> Reduced:
    """ToMe's bipartite soft matching: tokens alternate into A (even) and B (odd), each A token is linked to
    its most similar B token, the `n_remove` most similar links are merged (size-weighted average, sizes
    carried across layers), at most half the movable tokens (ToMe: r = min(r, (t - protected) // 2), so an odd
    row of m keeps ceil(m / 2) although its A set could lose ceil(m / 2)). Protected tokens keep their place in
    the alternation but are in neither set."""
    even, odd = alternate(tokens.valid)
    partner, score = best_match(tokens.hidden, even & tokens.movable, odd & tokens.movable)
    merged = highest(score, torch.minimum(n_remove, tokens.movable.sum(1) // 2), score > -INF)
    return apply(tokens, Plan(merged, partner, merged, merged, merge_weights(tokens, sizes)))


def pumer(tokens: Tokens, n_remove: Tensor, *, prune_r: float = 0.1, merge_r: float = 0.3, sizes: str = "reset",
          **_) -> Reduced:
    """PuMer: prune the least important tokens, then ToMe-merge similar ones among the survivors.

    Of the `n_remove` tokens, round(n_remove · prune_r / (prune_r + merge_r)) are pruned (PuMer's two ratios
    set the split; the budget sets the total); the rest are merged by bipartite matching on the surviving
    sequence (A/B alternate over the survivors), at most half the movable survivors as ToMe, sizes reset every
    layer as in PuMer. Text-informed pruning has no counterpart in a text-only SSM: the importance signal stands
    in for the text-to-image attention.
    """
    n_prune = round_half_up(n_remove.double() * (prune_r / (prune_r + merge_r)))
    pruned = lowest(tokens.importance, n_prune, tokens.movable)
    even, odd = alternate(tokens.valid & ~pruned)
    survivors = tokens.movable & ~pruned
    partner, score = best_match(tokens.hidden, even & survivors, odd & survivors)
    n_merge = torch.minimum(n_remove - pruned.sum(1), survivors.sum(1) // 2)
    merged = highest(score, n_merge, score > -INF)
    target = torch.where(merged, partner, tokens.slots)
    return apply(tokens, Plan(pruned | merged, target, merged, merged, merge_weights(tokens, sizes)))


def random_prune(tokens: Tokens, n_remove: Tensor, *, seed: int = 0, **_) -> Reduced:
    """Floor: prune random movable tokens. The draw hashes (original position, layer, seed), so it is
    reproducible and does not depend on the batch a sequence is in."""
    key = hash_int(hash_int(tokens.positions + 7919 * seed) ^ (tokens.layer + 1))
    dropped = lowest(key.double(), n_remove, tokens.movable)
    return apply(tokens, prune_plan(tokens, dropped))


# ---------------------------------------------------------------------------------- positional baselines
# They test where tokens are removed, not which: the official code's clipped path removes the first even positions
# whatever the input (`official`, point 4). No importance, no similarity, the same budget and reducer as the rest.


def early(tokens: Tokens, n_remove: Tensor, **_) -> Reduced:
    """Prune the `n_remove` earliest movable tokens."""
    return apply(tokens, prune_plan(tokens, first_of(tokens.movable, n_remove)))


def late(tokens: Tokens, n_remove: Tensor, **_) -> Reduced:
    """Prune the `n_remove` latest movable tokens: each row keeps its first tokens (the mirror image of `early`).
    It is also the `ceiling` measuring device: the cheapest cut at the budget's counts. The last position is
    the one whose logits start generation or score a continuation: under protocol=exact scored positions are
    protected (never removed), under protocol=paper nothing is and `late` drops them first."""
    if tokens.host_counts is not None:  # every slot movable, every row the same count: a row's slots past the kept
        return apply(tokens, prune_plan(tokens, tokens.slots >= tokens.host_counts[1]))  # (two launches, not five)
    return apply(tokens, prune_plan(tokens, last_of(tokens.movable, n_remove)))


def strided(tokens: Tokens, n_remove: Tensor, **_) -> Reduced:
    """Prune evenly spaced movable tokens: of m movable tokens, those of rank floor(i · m / r), i = 0..r-1, for
    r = min(n_remove, m) (a stride of m / r, fractional so that the count is exact; the first movable token goes,
    the last stays unless all go). Deterministic, and per row: no draw, no dependence on the batch."""
    movable = tokens.movable
    m = movable.sum(1, keepdim=True)
    r = torch.minimum(n_remove[:, None], m)
    rank = movable.long().cumsum(1) - 1
    # rank t is floor(i · m / r) for some integer i  <=>  ceil(t · r / m) · m < (t + 1) · r
    first_i = (rank * r + m - 1).div(m.clamp(min=1), rounding_mode="floor")
    return apply(tokens, prune_plan(tokens, movable & (first_i * m < (rank + 1) * r)))


def early_merge(tokens: Tokens, n_remove: Tensor, *, sizes: str = "reset", **_) -> Reduced:
    """The official code's effect made explicit: the `n_remove` earliest movable tokens are removed and each is
    averaged, in both streams, into the next kept movable token to its right (protected tokens are skipped, as
    nothing is averaged into them). All of them precede it, so that is one token: the first kept movable one,
    which becomes the weighted mean of itself and all of them (weights: `sizes`, reset = 1 each as the official
    code's merge_wavg, carry = the carried sizes). A row left without a kept movable token prunes them instead."""
    movable = tokens.movable
    removed = first_of(movable, n_remove)
    receiver = first_of(movable & ~removed, torch.ones_like(n_remove))  # the first kept movable token
    has = receiver.any(1, keepdim=True)
    target = torch.where(removed & has, receiver.long().argmax(1, keepdim=True), tokens.slots)
    merged = removed & has
    return apply(tokens, Plan(removed, target, merged, merged, merge_weights(tokens, sizes)))


def prune_plan(tokens: Tokens, dropped: Tensor) -> Plan:
    nothing = torch.zeros_like(dropped)
    return Plan(dropped, tokens.slots, nothing, nothing, None, prune_only=True)


def hash_int(x: Tensor) -> Tensor:
    """A 31-bit integer hash (multiply-xorshift), exact in int64 on every device."""
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0x7FFFFFFF
    return x ^ (x >> 16)


def official(tokens: Tokens, n_remove: Tensor, *, hidden: str = "hybrid", residual: str = "merge",
             importance: str = "clip", **_) -> Reduced:
    """The official ToR_SSM code path (`bipartite_hybrid_{pure,merge,prune}` + `merge_wavg`), kept to reproduce
    the published numbers and to show where it differs from the paper's text (github.com/wuyushuwys/ToR_SSM,
    src/pom/modules/tome.py and mamba_wrap.py):

    1. No importance classification. The similarity signal is the block output (after out_proj, not the SSM
       output), clamped at 0 with `importance: clip`, L2-normalised per token, then sorted *per channel* along
       the sequence; the lower half of these sorted rows is "a", the upper half "b", and similarities are dot
       products of these rows, which are no longer tokens.
    2. The matched row indices are applied to the alternating split of the real tokens: a-row i is token 2i,
       b-row j is token 2j+1 (ToMe's x[::2] / x[1::2]).
    3. The source indices are sorted ascending after their destinations were gathered in edge order, so the
       k-th smallest source is paired with the destination of the k-th best edge.
    4. With clip this is data-independent: the removed tokens are the even positions 0, 2, …, 2r-2 at the
       start of the sequence, all merged into position 1. Why: a row of non-negative sorted values dominates
       the next, so b-row 0 is every a-row's best match (the first maximum) and the edge scores a_i · b_0 never
       rise along a. Here this holds for every row without protected tokens: the stable edge sort of a
       non-increasing sequence keeps a-rows 0..r-1. The code's argsort is unstable, so it agrees only where no
       tie straddles the cut, i.e. the scores of a-rows r-1 and r differ. With clip they tie exactly when those
       two sorted rows agree on every channel with a positive maximum; in practice when both are all zero,
       which happens when no channel of the metric has ⌊N/2⌋ + r positive values (the lower half of each sorted
       channel is zero: zero-mean channels, long rows). The code then removes other even positions among the
       tied ones (still merged into position 1); ours keeps 0, 2, …, 2r-2. Without clip, matching is
       data-dependent and the same tie rule decides exact ties only.
    5. Keep count ceil(N · reduce_ratio) of the N tokens entering the layer (removal rule `ceil`), removal
       capped at N // 2. N is the row's real token count; under protocol=paper it is the padded length, with
       padding reduced like real tokens, exactly as the code.
    6. hybrid: among the r removed sources, each channel keeps only its k = r // 2 largest (signed) values and
       adds them into the destination; the size tensor goes through the same top-k on equal values, which
       counts k sources (we take the first k in source order; torch's choice among ties is unspecified, which
       matters only when the sources have different destinations, i.e. not with clip). q is fixed at 1/2 and
       is per channel, not per link. merge: size-weighted mean of the destination and all its sources. prune:
       sources dropped.
    7. Sizes are reset to 1 at every reduction layer.
    Differences from the code: ties in the edge sort go to the lower index and the size top-k takes the first
    k sources (the code's choices among ties are unspecified: against the code run as-is, every disagreement
    seen on random inputs came from ties, and with stable ties the two are bit-identical); an all-zero token
    normalises to zero (the code divides by zero and gets NaN); protected tokens (the code has none) are
    excluded from both sides.
    """
    # plain ints: under torch.jit.trace (fvcore) shapes are CPU tensors, which clamp(max=) refuses on a GPU
    b, n, d = (int(size) for size in tokens.hidden.shape)
    valid, protect, device = tokens.valid, tokens.protect, tokens.hidden.device
    count = valid.sum(1)
    metric = tokens.hidden.float().clamp(min=0) if importance == "clip" else tokens.hidden.float()
    unit = torch.nn.functional.normalize(metric, dim=-1).masked_fill(~valid[..., None], -INF)
    ordered = unit.sort(dim=1, descending=True).values  # per channel; padding (-inf) sorts last
    half = count // 2
    if tokens.host_counts is None:
        width_a, width_b = torch.stack([(count - half).amax(), half.amax()]).clamp(min=1).tolist()  # one sync
    else:  # every row has the same count, known on the host
        known = tokens.host_counts[0]
        width_a, width_b = max(known - known // 2, 1), max(known // 2, 1)
    rows_a = torch.arange(width_a, device=device).expand(b, width_a)
    ok_a = rows_a < (count - half)[:, None]
    ok_b = torch.arange(width_b, device=device).expand(b, width_b) < half[:, None]
    a = gather_slots(ordered, (half[:, None] + rows_a).clamp(max=n - 1)).masked_fill(~ok_a[..., None], 0)
    b_rows = ordered[:, :width_b].masked_fill(~ok_b[..., None], 0)
    scores = a @ b_rows.transpose(1, 2)
    odd_protected = fit(protect[:, 1::2], width_b)
    scores = scores.masked_fill(~ok_b[:, None, :] | odd_protected[:, None, :], -INF)
    node_max, node_idx = scores.max(dim=-1)
    node_max = node_max.masked_fill(~ok_a | fit(protect[:, 0::2], width_a), -INF)
    r = torch.minimum(torch.minimum(n_remove, half), (node_max > -INF).sum(1))
    edges = torch.sort(node_max, dim=1, descending=True, stable=True).indices
    chosen = torch.arange(width_a, device=device) < r[:, None]  # the first r edges, in edge order
    dst_rows = node_idx.gather(1, edges)
    src_rows = torch.sort(edges.masked_fill(~chosen, width_a), dim=1).values  # quirk 3: sorted after pairing
    src_slot = (2 * src_rows).clamp(max=n - 1)
    dst_slot = (2 * dst_rows + 1).clamp(max=n - 1)
    # unchosen entries write into a spare column n, so they can never clash with a chosen source slot
    spare = torch.where(chosen, src_slot, n)
    removed = torch.zeros(b, n + 1, dtype=torch.bool, device=device).scatter_(1, spare, chosen)[:, :n]
    target = torch.cat([tokens.slots, tokens.slots[:, :1]], 1).scatter_(1, spare, dst_slot)[:, :n]
    merging = {name: removed if strategy != "prune" else torch.zeros_like(removed)  # no tensor & bool: fvcore traces
               for name, strategy in (("hidden", hidden), ("residual", residual))}
    most = None if tokens.host_counts is None else tokens.host_counts[0] - tokens.host_counts[1]  # r, on the host
    streams = {name: official_hybrid(getattr(tokens, name), src_slot, dst_slot, chosen, r, most)
               for name, strategy in (("hidden", hidden), ("residual", residual)) if strategy == "hybrid"}
    plan = Plan(removed, target, merging["hidden"], merging["residual"], torch.ones_like(tokens.importance))
    return apply(tokens, plan, hidden=streams.get("hidden"), residual=streams.get("residual"))


def fit(mask: Tensor, width: int) -> Tensor:
    """A (b, m) mask cut or padded with False to (b, width)."""
    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]), value=False)


def official_hybrid(x: Tensor, src_slot: Tensor, dst_slot: Tensor, chosen: Tensor, r: Tensor,
                    most: int | None = None) -> Tensor:
    """The code's `bipartite_hybrid_pure` merge of one stream: per channel, the k = r // 2 largest values of the
    r sources are added into their destination; each destination is divided by 1 + the number of the first k
    sources (in source order) that point at it. `most`: the largest r when the host knows it; the chosen sources
    are each row's first r, so only those are gathered and ranked (same result, a fraction of the sorting)."""
    if most is not None:
        src_slot, dst_slot, chosen = src_slot[:, :max(most, 1)], dst_slot[:, :max(most, 1)], chosen[:, :max(most, 1)]
    k = r // 2
    values = gather_slots(x.float(), src_slot)  # (b, width, d), sources in ascending order
    top = ranks(values.masked_fill(~chosen[..., None], -INF).transpose(1, 2), descending=True).transpose(1, 2)
    channel_kept = chosen[..., None] & (top < k[:, None, None])
    counted = chosen & (torch.arange(chosen.shape[1], device=x.device) < k[:, None])
    total = x.float().scatter_add(1, dst_slot[..., None].expand_as(values), values * channel_kept)
    size = torch.ones(x.shape[:2], device=x.device).scatter_add(1, dst_slot, counted.float())
    return (total / size[..., None]).to(x.dtype)
