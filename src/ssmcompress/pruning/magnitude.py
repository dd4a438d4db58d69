"""Magnitude pruning: remove the smallest |W|. No calibration data, no weight update.

As the SparseGPT (`--gmp`) and Wanda magnitude baselines: unstructured sparsity compares all weights of a matrix
(one threshold per matrix), N:M compares the weights inside each group of M inputs of a row.
"""
from __future__ import annotations

import torch

from ssmcompress.pruning.hessian import LayerInputs
from ssmcompress.pruning.masks import Pattern, pattern_mask

NEEDS_INPUTS = False


def check_options(pattern: Pattern) -> None:
    """This pruner takes no options."""


def prune(weight: torch.Tensor, inputs: LayerInputs | None, pattern: Pattern,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned copy of `weight` (out x in); `mask` (True = remove) overrides the magnitude rule."""
    if mask is None:
        mask = pattern_mask(weight.abs(), pattern, per_row=False)
    return weight.masked_fill(mask, 0)
