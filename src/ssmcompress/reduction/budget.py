"""The FLOPs budget: from `ratio` (fraction of the forward FLOPs removed) and the reduction layers to a keep rate.

Conventions (docs/reduction.md: Budget):
- FLOPs are the analytic model of `ssmcompress.flops` (blocks + lm_head), the ruler the evaluator uses.
  The budget counts the model's own work, identical for every method, so at one `ratio` every method removes
  the same number of tokens per layer. The reduction's own work (similarity matrices) is `overhead_flops`,
  reported beside the achieved ratio (and to the evaluator through `Reducer.reduction_flops`), not traded
  against tokens.
- One keep rate ρ per reduction layer, solved by bisection at the reference length `n_ref` (the model's
  max_length), with fractional token counts: block i sees n·ρ^(reduction layers before i) tokens, the lm_head
  n·ρ^(all of them). For n ≥ the Mamba-2 chunk size the per-token cost is constant, so ρ does not depend on n.
  Attention layers break that (a token's cost grows with the tokens before it): on models with attention ρ is
  solved per row length (`keep_rates_at`), so that every row removes the ratio, short or long.
- Tokens are a row's real tokens; padding is never counted.
- Per row, integer counts follow `removals`: `cumulative` (every method but `official`) keeps
  round(n0·ρ^j) tokens after the j-th reduction layer (round half up, at least 1), so rounding never drifts;
  `ceil` (the official code) keeps ceil(N·ρ) of the N tokens entering each reduction layer. Methods may remove
  fewer than asked (at most half the movable tokens for bipartite matching, never protected ones): a short or
  heavily protected row then falls below the target, and the achieved ratio says so.
- `schedule: chunk` (Mamba-2) replaces those counts, per row, by `chunk_counts`: counts in whole SSD chunks, which
  is what mamba-ssm's chunked scan charges for (a count of 1860 costs 8 chunks of 256 like 2048 does), chosen by
  the same FLOPs model. A row too short for any chunk schedule keeps the counts above (the reducer counts them).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ssmcompress.config import ConfigError
from ssmcompress import flops

# The paper's reduction layers (0-based block indices, as the official code's enumerate over backbone.layers).
PAPER_LAYERS = {64: (12, 17, 22, 27, 32, 37, 42), 48: (10, 15, 20, 25, 30, 35)}
TOLERANCE = 0.01  # |achieved - target| the budget promises for long sequences (and strict mode accepts)


def default_layers(n_layer: int) -> list[int]:
    """The paper's anchors for 64- and 48-layer models; other depths scale the 64-layer anchors proportionally."""
    if n_layer in PAPER_LAYERS:
        return list(PAPER_LAYERS[n_layer])
    return sorted({min(n_layer - 1, round(a * n_layer / 64)) for a in PAPER_LAYERS[64]})


def fractions(layers: list[int], keep_rate: float, n_layer: int) -> tuple[list[float], float]:
    """Fraction of the tokens entering each block, and the fraction reaching the lm_head."""
    entering, current = [], 1.0
    for index in range(n_layer):
        entering.append(current)
        if index in layers:
            current = current * keep_rate  # not *=: an array's in-place product would change those entered
    return entering, current


def flops_ratio(info: dict, layers: list[int], keep_rate: float, n_tokens: float, dense: float | None = None) -> float:
    """Fraction of the dense forward FLOPs removed at keep rate ρ, fractional token counts (`dense`: the dense
    FLOPs at n_tokens, where the caller has them). Numbers or arrays (elementwise)."""
    entering, leaving = fractions(layers, keep_rate, info["n_layer"])
    reduced = flops.forward_flops(info, [n_tokens * f for f in entering], logits_tokens=n_tokens * leaving)
    return 1.0 - reduced["total"] / (flops.dense_flops(info, n_tokens) if dense is None else dense)


def token_fraction(layers: list[int], keep_rate: float, n_layer: int) -> float:
    """The paper's figure (its code's "model sparsity"): 1 - mean over blocks of the fraction of tokens entering."""
    entering, _ = fractions(layers, keep_rate, n_layer)
    return 1.0 - sum(entering) / n_layer


def bisect_keep_rate(info: dict, layers: list[int], ratio: float, min_keep_rate: float, n_tokens):
    """The keep rate ρ ∈ [min_keep_rate, 1] at which `ratio` of the FLOPs of n_tokens tokens is removed, by
    bisection (the ratio falls monotonically with ρ); n_tokens a number, or an array of lengths each solved alone
    (numpy's elementwise float64 arithmetic is Python's, so each equals its own scalar solve bit for bit)."""
    dense = flops.dense_flops(info, n_tokens)
    low, high = np.full(np.shape(n_tokens), min_keep_rate), np.full(np.shape(n_tokens), 1.0)
    for _ in range(60):
        middle = (low + high) / 2
        above = flops_ratio(info, layers, middle, n_tokens, dense) > ratio
        low, high = np.where(above, middle, low), np.where(above, high, middle)
    rate = (low + high) / 2
    return float(rate) if rate.ndim == 0 else rate


def solve_keep_rate(info: dict, layers: list[int], ratio: float, min_keep_rate: float, n_tokens: float,
                    what: str = "") -> float:
    """`bisect_keep_rate` at one length. Raises ConfigError, with the largest reachable ratio, when no keep rate
    the method allows removes `ratio`."""
    reachable = flops_ratio(info, layers, min_keep_rate, n_tokens)
    if ratio > reachable:
        limit = ("removes at most half of the tokens per reduction layer" if min_keep_rate >= 0.5
                 else f"keeps at least {min_keep_rate:.3g} of the tokens per reduction layer")
        raise ConfigError(f"ratio={ratio} cannot be reached{what} with layers {layers} on this "
                          f"{info['n_layer']}-layer model: the method {limit}, so at most {reachable:.4f} of the "
                          f"forward FLOPs can be removed; lower ratio or use more or earlier layers")
    return bisect_keep_rate(info, layers, ratio, min_keep_rate, n_tokens)


def keep_rates_at(info_items: tuple, layers: tuple[int, ...], ratio: float, min_keep_rate: float,
                  lengths) -> np.ndarray:
    """The keep rate that removes `ratio` of the FLOPs of a row of n tokens, for each n of `lengths` (the method's
    limit where n cannot reach the ratio). Where attention layers make a token's cost grow with the length, one
    keep rate for every length would remove a smaller share of a short row than the ratio says (and a larger one
    of a long row); the budget then solves it per length."""
    info, n = dict(info_items), np.asarray(lengths, dtype=np.float64)
    reachable = flops_ratio(info, list(layers), min_keep_rate, n)
    solved = bisect_keep_rate(info, list(layers), ratio, min_keep_rate, n)
    return np.where(ratio > reachable, min_keep_rate, solved)


def removals(rule: str, keep_rate: float | torch.Tensor, n0: torch.Tensor, current: torch.Tensor, step: int,
             table: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens each row should drop at its `step`-th reduction layer (1-based): n0 real tokens at the input,
    `current` entering this layer; `keep_rate` one for every row, or one per row (float64, Setup.per_length). Exact float64 arithmetic, as Python's, so `ceil` matches the official code.
    `table` (b, steps): per row the tokens to keep after each reduction layer (`chunk_counts`), -1 where the row
    follows `rule` instead."""
    if rule == "cumulative":
        target = torch.floor(n0.double() * keep_rate ** step + 0.5).long().clamp(min=1)
        asked = (current - target).clamp(min=0)
    elif rule == "ceil":
        asked = current - torch.ceil(current.double() * keep_rate).long()
    else:
        raise ValueError(f"unknown removal rule {rule!r}")
    if table is None:
        return asked
    chunked = table[:, step - 1]
    return torch.where(chunked >= 0, (current - chunked).clamp(min=0), asked)


def predicted_counts(rule: str, keep_rate: float, n0: int, n_steps: int, min_keep_rate: float) -> list[int]:
    """Integer tokens after each reduction layer for an unprotected row of n0 tokens: what `removals` asks
    (the same float64 arithmetic, in Python), capped at what a method with this minimum keep rate can remove."""
    counts, current = [], n0
    for step in range(1, n_steps + 1):
        if rule == "cumulative":
            asked = max(current - max(math.floor(n0 * keep_rate ** step + 0.5), 1), 0)
        else:
            asked = current - math.ceil(current * keep_rate)
        cap = current - max(math.ceil(current * min_keep_rate), 1)
        current -= max(0, min(asked, cap))
        counts.append(current)
    return counts


def chunk_floor(n0: int, n_steps: int, chunk: int, min_keep_rate: float) -> list[int]:
    """The chunk schedule that keeps fewest tokens at every layer: each count the smallest chunk multiple the
    limit allows (n0 itself while none lies between the limit and n0). It removes the most FLOPs, so a row
    reaches a ratio in whole chunks iff this schedule does (the limit only tightens as counts grow)."""
    counts, current = [], n0
    for _ in range(n_steps):
        least = max(math.ceil(current * min_keep_rate), 1)
        current = min(current, chunk * math.ceil(least / chunk))
        counts.append(current)
    return counts


# Mamba-1 keeps its activations as (batch, channels, length): a length that is a multiple of 16 keeps every row
# of them 16-element aligned, which Triton and cuBLAS need for vector loads (Triton specialises a stride on its
# divisibility by 16). Mamba-2's are (batch, length, channels), and its SSD scan works in whole chunks.
MAMBA1_COUNT_MULTIPLE = 16


def count_multiple(info: dict) -> int:
    """What schedule=chunk counts tokens in: Mamba-2's SSD chunk size, or MAMBA1_COUNT_MULTIPLE on Mamba-1."""
    return int(info.get("chunk_size") or MAMBA1_COUNT_MULTIPLE)


def chunk_reachable(info_items: tuple, layers: tuple[int, ...], n0: int, ratio: float,
                    min_keep_rate: float) -> bool:
    """Whether a row of n0 tokens has a chunk schedule (`chunk_counts` is not None), without searching for it."""
    chunk = count_multiple(dict(info_items))
    if not layers or n0 < chunk:
        return False
    dense, reduced, _ = row_flops(info_items, layers, n0, tuple(chunk_floor(n0, len(layers), chunk, min_keep_rate)),
                                  "none")
    return 1 - reduced / dense >= ratio


@lru_cache(maxsize=16384)
def chunk_counts(info_items: tuple, layers: tuple[int, ...], n0: int, ratio: float,
                 min_keep_rate: float) -> tuple[int, ...] | None:
    """The `chunk` schedule of an unprotected row of n0 tokens: the tokens kept after each reduction layer, each a
    multiple of `count_multiple` (the SSD chunk size; 16 on Mamba-1) (or n0 while nothing is removed),
    non-increasing, each layer keeping at least max(ceil(min_keep_rate · its input), 1) tokens (the method's limit,
    as `predicted_counts`), removing at least `ratio` of the forward FLOPs and, of all such schedules, the least
    FLOPs beyond it; ties (equal FLOPs) go to the larger counts, from the last layer back. None when there is none
    (n0 under one chunk, or too short to reach `ratio` in whole chunks). Cached: lm-eval repeats lengths.

    Exact search, no heuristic: at n >= chunk size a block's FLOPs are its token count times a constant integer
    (flops.py), so a schedule's FLOPs are an integer-weighted sum of its counts. A dynamic programme over the
    layers keeps, per count, the set of reachable weighted sums as a bitset (a Python int); the best final sum is
    then read off, and the schedule traced back. Sums are exact integers, and the ratio is compared exactly as
    `row_flops` reports it."""
    if not chunk_reachable(info_items, layers, n0, ratio, min_keep_rate):
        return None
    info = dict(info_items)
    chunk = count_multiple(info)
    values = sorted({n0, *range(chunk, n0 + 1, chunk)}, reverse=True)  # the counts a layer may keep
    least = [max(math.ceil(v * min_keep_rate), 1) for v in values]  # fewest tokens a layer may keep of v
    spans = [b - a for a, b in zip(layers, [*layers[1:], info["n_layer"] - 1])]  # blocks after each layer
    per_token = sum(flops.block_flops_per_token(info, 0, n0).values())  # one block (all alike), per token (n >= chunk)
    head = flops.lm_head_flops(info, 1) + flops.final_norm_flops(info, 1)
    dense = flops.dense_flops(info, n0)
    before = per_token * n0 * (layers[0] + 1)  # the blocks up to the first reduction layer see n0

    def ratio_of(total: int, last: int) -> float:
        return 1 - (before + per_token * total + head * last) / dense

    # reach[j][i]: bitset of Σ_{l <= j} spans[l] · count_l over the valid schedules of layers 0..j ending at values[i]
    reach = []
    for j, span in enumerate(spans):
        row = []
        for i, value in enumerate(values):
            if j == 0:  # from n0 = values[0]
                came = int(value >= least[0])
            else:
                came = 0
                for p in range(i + 1):  # values[p] >= value: counts never grow
                    if least[p] <= value:
                        came |= reach[j - 1][p]
            row.append(came << (span * value))
        reach.append(row)

    best = None  # (total FLOPs ratio, value index, weighted sum)
    for i, value in enumerate(values):
        bits = reach[-1][i]
        limit = math.floor(((1 - ratio) * dense - before - head * value) / per_token) + 1  # + 1: float rounding
        while bits and limit >= 0:
            below = bits & ((2 << limit) - 1)  # the reachable sums <= limit
            if not below:
                break
            total = below.bit_length() - 1
            if ratio_of(total, value) >= ratio:
                if best is None or ratio_of(total, value) < best[0]:
                    best = (ratio_of(total, value), i, total)
                break
            limit = total - 1
    if best is None:
        return None
    _, i, total = best
    counts = []
    for j in range(len(spans) - 1, -1, -1):
        value = values[i]
        counts.append(value)
        total -= spans[j] * value
        if j:
            i = next(p for p in range(i + 1) if least[p] <= value and reach[j - 1][p] >> total & 1)
    return tuple(reversed(counts))


def row_tokens(n0: int, counts: tuple[int, ...], layers: list[int], n_layer: int) -> tuple[list[int], int]:
    """Tokens entering each block and reaching the lm_head for one row, from its counts after each reduction layer."""
    entering, current, after = [], n0, dict(zip(layers, counts))
    for index in range(n_layer):
        entering.append(current)
        current = after.get(index, current)
    return entering, current


def overhead_flops(kind: str, n_tokens: int, d_model: int) -> float:
    """The reduction's own work at one layer of n tokens, by the FLOPs model's convention: the similarity matrix
    of bipartite matching (normalising, sorting, ranking, gathers and averages count 0, as elementwise work)."""
    if kind == "none":
        return 0.0
    if kind == "bipartite":
        return float(flops.bipartite_matching_flops(n_tokens, d_model))
    raise ValueError(f"unknown overhead kind {kind!r}")


@lru_cache(maxsize=65536)
def row_flops(info_items: tuple, layers: tuple[int, ...], n0: int, counts: tuple[int, ...],
              overhead: str) -> tuple[float, float, float]:
    """(dense, reduced, overhead) FLOPs of one row; cached, since lm-eval repeats lengths."""
    info = dict(info_items)
    entering, final = row_tokens(n0, counts, list(layers), info["n_layer"])
    reduced = flops.forward_flops(info, entering, logits_tokens=final)["total"]
    inputs = [entering[layer] for layer in layers]
    extra = sum(overhead_flops(overhead, n, info["d_model"]) for n in inputs)
    return flops.dense_flops(info, n0), reduced, extra
