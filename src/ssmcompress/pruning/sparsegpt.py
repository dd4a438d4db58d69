"""SparseGPT (Frantar & Alistarh, ICML 2023): blockwise OBS with lazy updates, ported from the official
`SparseGPT.fasterprune` (IST-DASLab/sparsegpt, sparsegpt.py).

Columns are processed left to right in blocks of `blocksize`. With U the upper Cholesky factor of (H + λI)⁻¹:
- unstructured mask: once per block, on the block's current (already updated) weights, the lowest OBS saliencies
  w² / U_jj² over the whole (rows x block) slab; per-row counts vary;
- N:M mask: at the first column of every group of M, per row, the N lowest saliencies of that group;
- each column's removal error is compensated only by the columns to its right (err = w_j / U_jj,
  W[:, j:] -= err ⊗ U[j, j:]); later blocks receive the block's errors in one lazy matrix product.
Deviations from the official code (tests/pruning/test_pruning_official.py: otherwise bit for bit on its inputs):
- a block removes exactly floor(sparsity · rows · block) weights, where the official `<=` threshold removes one
  more (one weight per block even at sparsity 0), and every weight tied with the threshold;
- inputs never active in calibration (H_jj = 0) have saliency 0, so they are removed first, but only as many as
  the pattern asks; the official code zeroes their whole column beforehand (`W[:, dead] = 0`), beyond the pattern.
"""
from __future__ import annotations

import torch

from ssmcompress.pruning.hessian import LayerInputs, check_damping, inverse_factor, working_dtype
from ssmcompress.pruning.masks import Pattern, check_width, nm_mask, removal_count, smallest

NEEDS_INPUTS = True


def check_options(pattern: Pattern, blocksize: int = 128, damping: float = 0.01) -> None:
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"sparsegpt blocksize must be a positive integer, got {blocksize!r}")
    if pattern.is_nm and blocksize % pattern.m:
        raise ValueError(f"sparsegpt with {pattern} sparsity needs blocksize ({blocksize}) to be a multiple of "
                         f"{pattern.m}")
    check_damping(damping)


def saliency(weight: torch.Tensor, inverse_diagonal: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS saliency w² / U_jj² (SparseGPT's score); inputs never active cost nothing to remove (score 0)."""
    return (weight.masked_fill(dead, 0) / inverse_diagonal) ** 2


def prune(weight: torch.Tensor, inputs: LayerInputs, pattern: Pattern, blocksize: int = 128,
          damping: float = 0.01, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned and compensated copy of `weight` (out x in); `mask` (True = remove) overrides the mask rule
    (the "ablate" mode of Wanda's repository)."""
    check_options(pattern, blocksize, damping)
    check_width(pattern, weight.shape[1])
    dtype = working_dtype(weight, inputs)
    W = weight.to(dtype).clone()
    U, dead = inverse_factor(inputs.hessian().to(dtype), damping)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, U1, dead1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], dead[i1:i2]
        diagonal = U1.diagonal()
        errors = torch.zeros_like(W1)
        if mask is not None:
            mask1 = mask[:, i1:i2]
        elif pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = smallest(saliency(W1, diagonal, dead1).flatten(),
                             removal_count(pattern.fraction, W1.numel())).view_as(W1)
        for i in range(i2 - i1):
            if mask is None and pattern.is_nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                mask1[:, group] = nm_mask(saliency(W1[:, group], diagonal[group], dead1[group]), pattern.n, pattern.m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            error = (w - q) / diagonal[i]
            W1[:, i:] -= error[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            errors[:, i] = error
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return W.to(weight.dtype)
