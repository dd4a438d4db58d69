"""Sparsity patterns and the mask rules every pruner shares.

A mask is a bool tensor shaped like the weight, True where a weight is removed. Scores are "keep-worthiness":
the lowest scores are removed. Every rule removes an exact count, so the achieved sparsity never depends on ties
(official SparseGPT/Wanda magnitude thresholds with `<=` remove one extra weight per group, and more on ties).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """Unstructured (`fraction` of the weights) or N:M (`n` zeros in every `m` consecutive inputs of a row)."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"


def parse_pattern(value) -> Pattern:
    """`0.5` -> 50 % unstructured; `"2:4"` -> 2 zeros in every 4 consecutive inputs. ValueError on anything else."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"sparsity must be a fraction in [0, 1) or an N:M pattern like '2:4', got {value!r}")
    if isinstance(value, str):
        match = NM_PATTERN.match(value)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise ValueError(f"N:M sparsity needs 0 < N < M (N zeros in every M weights), got {value!r}")
            return Pattern(fraction=n / m, n=n, m=m)
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"sparsity must be a fraction in [0, 1) or an N:M pattern like '2:4', "
                             f"got {value!r}") from None
    if not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
        raise ValueError(f"sparsity must be a fraction with 0 <= sparsity < 1 or an N:M pattern like '2:4', "
                         f"got {value!r}")
    return Pattern(fraction=float(value))


def removal_count(fraction: float, total: int) -> int:
    """floor(fraction * total), robust to float noise (0.7 * 10 is 7.000000000000001)."""
    return math.floor(fraction * total + 1e-9)


def smallest(scores: torch.Tensor, count: int, dim: int = -1) -> torch.Tensor:
    """Mask of the `count` lowest scores in each slice along `dim`; a stable sort (as Wanda's), so equal scores
    are removed in index order."""
    order = torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, count)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, order, True)


def unstructured_mask(scores: torch.Tensor, fraction: float, per_row: bool) -> torch.Tensor:
    """Remove `fraction` of the weights: the same count in every row (per_row), or the lowest of the whole matrix."""
    if per_row:
        return smallest(scores, removal_count(fraction, scores.shape[1]), dim=1)
    return smallest(scores.flatten(), removal_count(fraction, scores.numel())).view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of `m` consecutive columns of each row, remove the `n` lowest scores."""
    rows, columns = scores.shape
    check_width(Pattern(n / m, n, m), columns)
    grouped = scores.reshape(rows, columns // m, m)
    return smallest(grouped, n, dim=2).reshape(rows, columns)


def check_width(pattern: Pattern, columns: int) -> None:
    """N:M groups consecutive inputs: the input width must be a multiple of M."""
    if pattern.is_nm and columns % pattern.m:
        raise ValueError(f"N:M sparsity {pattern} needs the input width ({columns}) to be a multiple of {pattern.m}")


def pattern_mask(scores: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """The mask a pattern asks for, from scores (N:M is always per row; unstructured per row or per matrix)."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.fraction, per_row)


def zero_fraction(weight: torch.Tensor) -> float:
    """The achieved sparsity: the fraction of exactly-zero entries."""
    return (weight == 0).sum().item() / weight.numel()


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive inputs of every row holds at least n zeros."""
    rows, columns = weight.shape
    zeros = (weight.reshape(rows, columns // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())
