"""The FLOPs budget: from `ratio` (fraction of the forward FLOPs removed) and the reduction layers to a keep rate.

Conventions (README: Token reduction, The budget):
- FLOPs are the analytic model of `ssmcompress.metrics.flops` (blocks + lm_head), the ruler the evaluator uses.
  The budget counts the model's own work, identical for every method, so at one `ratio` every method removes
  the same number of tokens per layer. The reduction's own work (similarity matrices) is `overhead_flops`,
  reported beside the achieved ratio (and to the evaluator through `Reducer.reduction_flops`), not traded
  against tokens.
- One keep rate ρ per reduction layer, solved by bisection at the reference length `n_ref` (the model's
  max_length), with fractional token counts: block i sees n·ρ^(reduction layers before i) tokens, the lm_head
  n·ρ^(all of them). For n ≥ the Mamba-2 chunk size the per-token cost is constant, so ρ does not depend on n.
- Tokens are a row's real tokens; padding is never counted.
- Per row, integer counts follow `removals`: `cumulative` (every method but `official`) keeps
  round(n0·ρ^j) tokens after the j-th reduction layer (round half up, at least 1), so rounding never drifts;
  `ceil` (the official code) keeps ceil(N·ρ) of the N tokens entering each reduction layer. Methods may remove
  fewer than asked (at most half the movable tokens for bipartite matching, never protected ones): a short or
  heavily protected row then falls below the target, and the achieved ratio says so.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ssmcompress.config import ConfigError
from ssmcompress.metrics import flops

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
            current *= keep_rate
    return entering, current


def flops_ratio(info: dict, layers: list[int], keep_rate: float, n_tokens: float) -> float:
    """Fraction of the dense forward FLOPs removed at keep rate ρ, fractional token counts."""
    entering, leaving = fractions(layers, keep_rate, info["n_layer"])
    reduced = flops.forward_flops(info, [n_tokens * f for f in entering], logits_tokens=n_tokens * leaving)
    return 1.0 - reduced["total"] / flops.dense_flops(info, n_tokens)


def token_fraction(layers: list[int], keep_rate: float, n_layer: int) -> float:
    """The paper's figure (its code's "model sparsity"): 1 - mean over blocks of the fraction of tokens entering."""
    entering, _ = fractions(layers, keep_rate, n_layer)
    return 1.0 - sum(entering) / n_layer


def solve_keep_rate(info: dict, layers: list[int], ratio: float, min_keep_rate: float, n_tokens: float,
                    what: str = "") -> float:
    """The keep rate ρ ∈ [min_keep_rate, 1] at which `ratio` of the FLOPs is removed (bisection; the ratio
    falls monotonically with ρ). Raises ConfigError, with the largest reachable ratio, when none exists."""
    reachable = flops_ratio(info, layers, min_keep_rate, n_tokens)
    if ratio > reachable:
        limit = ("removes at most half of the tokens per reduction layer" if min_keep_rate >= 0.5
                 else f"keeps at least {min_keep_rate:.3g} of the tokens per reduction layer")
        raise ConfigError(f"ratio={ratio} cannot be reached{what} with layers {layers} on this "
                          f"{info['n_layer']}-layer model: the method {limit}, so at most {reachable:.4f} of the "
                          f"forward FLOPs can be removed; lower ratio or use more or earlier layers")
    low, high = min_keep_rate, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if flops_ratio(info, layers, middle, n_tokens) > ratio:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def removals(rule: str, keep_rate: float, n0: torch.Tensor, current: torch.Tensor, step: int) -> torch.Tensor:
    """Tokens each row should drop at its `step`-th reduction layer (1-based): n0 real tokens at the input,
    `current` entering this layer. Exact float64 arithmetic, as Python's, so `ceil` matches the official code."""
    if rule == "cumulative":
        target = torch.floor(n0.double() * keep_rate ** step + 0.5).long().clamp(min=1)
        return (current - target).clamp(min=0)
    if rule == "ceil":
        return current - torch.ceil(current.double() * keep_rate).long()
    raise ValueError(f"unknown removal rule {rule!r}")


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
