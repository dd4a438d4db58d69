"""Wanda (Sun et al., ICLR 2024): score |W_ij| · ‖X_j‖₂, remove the lowest per output row; no weight update.

As the official `prune_wanda`: the comparison group is each output row (unstructured: the same number of zeros in
every row, stable sort) or each group of M inputs of a row (N:M).
"""
from __future__ import annotations

import torch

from ssmcompress.pruning.hessian import LayerInputs
from ssmcompress.pruning.masks import Pattern, pattern_mask

NEEDS_INPUTS = True


def check_options(pattern: Pattern) -> None:
    """This pruner takes no options."""


def scores(weight: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    return weight.abs().to(inputs.gram.dtype) * inputs.squared_norms().sqrt()


def prune(weight: torch.Tensor, inputs: LayerInputs, pattern: Pattern,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned copy of `weight` (out x in); `mask` (True = remove) overrides Wanda's rule."""
    if mask is None:
        mask = pattern_mask(scores(weight, inputs), pattern, per_row=True)
    return weight.masked_fill(mask, 0)
