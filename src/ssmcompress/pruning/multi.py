"""Multi-removal pruning: *Pruning Foundation Models for High Accuracy without Retraining* (Zhao et al., Findings
of EMNLP 2024), reconstructed from its problem statement (arXiv 2410.15567, Sec. 3; its code is not public).

For one row w and a set Q of its weights removed at once, the error δw H δwᵀ / 2 (H = 2XXᵀ) subject to
δw_Q = -w_Q is minimised by

    δw* = -w_Q ([H⁻¹]_QQ)⁻¹ [H⁻¹]_{Q,:}          with loss  L*(Q) = ½ w_Q ([H⁻¹]_QQ)⁻¹ w_Qᵀ,

which is the masked least-squares refit of the kept weights (the paper's "optimal solution"; for |Q| = 1 it is
OBS). Every kept weight of the row compensates, on both sides of Q.

The algorithm (our choice where the paper is unknown: how it makes this tractable and how it picks masks):
1. Mask search, blockwise like SparseGPT. For a block [i1, i2), columns before i1 are final and every column from
   i1 on is free. With U the upper Cholesky factor of (H + λI)⁻¹, the inverse Hessian of the free columns F is
   U[i1:, i1:]ᵀ U[i1:, i1:], and since U is upper triangular its rows for Q ⊂ block are (U_b[:, Q])ᵀ U_b with
   U_b = U[i1:i2, i1:]. The block's removals are chosen on its current weights with that conditioned inverse, then
   removed jointly with the optimal update of every free column, which takes SparseGPT's lazy shape
   W[:, i1:] -= (x U_bbᵀ) U_b, with x_Q = w_Q ([H_F⁻¹]_QQ)⁻¹ (one small solve per row), U_bb = U_b[:, :block].
   Each step is the exact multi-removal solution given the frozen earlier columns; blocksize 1 is exactly
   SparseGPT's update, blocksize null a single static mask from the dense inverse.
2. Refit (`refit`, default on): the exact whole-row closed form for the final mask, applied to the original
   weights, so every kept weight of a row compensates for all its removals (the optimum for that mask; costs one
   k x k solve per row, k = removed weights of the row).
Measured on the bundled mamba2-tiny (weights of 2026-11-23; in_proj + out_proj of 12 blocks, 32 x 256 calibration
tokens; mean layer-wise relative output error): at 50 % blocksize 128 gives 0.0431, whole rows 0.0432,
32 gives 0.0453 (smaller blocks force equal counts per row and block); at 2:4, 32 gives 0.0758 against 0.0785 for
128. The refit lowers the error by 1.3 % (50 %) and 1.5 % (2:4); the joint N:M rule was not better than `single`
there (0.0785 vs 0.0784). SparseGPT: 0.0462 / 0.0831, Wanda: 0.0556 / 0.1049.

Mask rules (the paper's are not recoverable; these follow the one public re-implementation that cites its
equations):
- unstructured: per row (equal sparsity in every row), the lowest single-removal (SRP) scores
  w_j² / [H_F⁻¹]_jj of the block, on its current weights;
- N:M `joint` (default): per row and group of M inputs, the N-subset Q with the smallest joint loss
  w_Q ([H_F⁻¹]_QQ)⁻¹ w_Qᵀ among all C(M, N) subsets (6 for 2:4, 70 for 4:8); `single`: the N lowest SRP scores.
Groups are scored independently of the other groups removed in the same block; the conditioning on earlier
blocks is exact.
"""
from __future__ import annotations

import itertools

import torch

from ssmcompress.pruning.hessian import LayerInputs, check_damping, inverse_factor, working_dtype
from ssmcompress.pruning.masks import Pattern, check_width, nm_mask, removal_count, smallest

NEEDS_INPUTS = True
NM_RULES = ("joint", "single")
SOLVE_BUDGET = 2 ** 24  # entries of the batched (rows x k x k) systems solved at once (64 MiB in fp32)


def check_options(pattern: Pattern, blocksize: int | None = 128, damping: float = 0.01, nm_mask: str = "joint",
                  refit: bool = True) -> None:
    if blocksize is not None and (not isinstance(blocksize, int) or blocksize < 1):
        raise ValueError(f"multi blocksize must be a positive integer or null (whole rows), got {blocksize!r}")
    if pattern.is_nm and blocksize is not None and blocksize % pattern.m:
        raise ValueError(f"multi with {pattern} sparsity needs blocksize ({blocksize}) to be a multiple of "
                         f"{pattern.m} (or null)")
    check_damping(damping)
    if nm_mask not in NM_RULES:
        raise ValueError(f"unknown nm_mask {nm_mask!r}: use one of {', '.join(NM_RULES)}")
    if not isinstance(refit, bool):
        raise ValueError(f"refit must be true or false, got {refit!r}")


def srp_scores(weight: torch.Tensor, inverse_hessian: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The single-removal loss of each weight, w_j² / [H⁻¹]_jj (up to ½); inputs never active cost nothing."""
    return weight.masked_fill(dead, 0) ** 2 / inverse_hessian.diagonal()


def joint_nm_mask(weight: torch.Tensor, inverse_hessian: torch.Tensor, dead: torch.Tensor, n: int,
                  m: int) -> torch.Tensor:
    """Per row and group of m inputs, the n-subset with the least joint removal loss w_Q ([H⁻¹]_QQ)⁻¹ w_Qᵀ."""
    rows, columns = weight.shape
    groups = columns // m
    subsets = torch.tensor(list(itertools.combinations(range(m), n)), device=weight.device)  # (S, n)
    blocks = inverse_hessian.reshape(groups, m, groups, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, m, m)
    # ([H⁻¹]_QQ)⁻¹ depends on the group and the subset only, not on the row
    kernels = torch.linalg.inv(blocks[:, subsets[:, :, None], subsets[:, None, :]])  # (G, S, n, n)
    picked = weight.masked_fill(dead, 0).reshape(rows, groups, m)[:, :, subsets]  # (rows, G, S, n)
    losses = torch.einsum("rgsi,gsij,rgsj->rgs", picked, kernels, picked)
    chosen = subsets[losses.argmin(dim=-1)]  # (rows, G, n)
    mask = torch.zeros(rows, groups, m, dtype=torch.bool, device=weight.device).scatter_(2, chosen, True)
    return mask.reshape(rows, columns)


def removal_mask(weight: torch.Tensor, inverse_hessian: torch.Tensor, dead: torch.Tensor, pattern: Pattern,
                 nm_rule: str, count: int) -> torch.Tensor:
    """The weights of a block to remove (True), by the rules in the module docstring; `count` per row when
    unstructured."""
    if pattern.is_nm and nm_rule == "joint":
        return joint_nm_mask(weight, inverse_hessian, dead, pattern.n, pattern.m)
    scores = srp_scores(weight, inverse_hessian, dead)
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return smallest(scores, count, dim=1)


def joint_removal(weight: torch.Tensor, inverse_hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (rows x columns) with x_Q = w_Q ([H⁻¹]_QQ)⁻¹ on each row's removed set Q and 0 elsewhere.

    Rows remove different sets (and possibly different numbers) of weights: each row's system is gathered into a
    k_max x k_max batch, padded with identity rows where a row removes fewer than k_max weights.
    """
    rows, columns = weight.shape
    counts = mask.sum(dim=1)
    k = int(counts.max().item()) if rows else 0
    x = torch.zeros_like(weight)
    if k == 0:
        return x
    removed = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # removed columns first
    valid = torch.arange(k, device=weight.device)[None, :] < counts[:, None]
    eye = torch.eye(k, dtype=weight.dtype, device=weight.device)
    chunk = max(1, SOLVE_BUDGET // (k * k))
    for r1 in range(0, rows, chunk):
        idx, ok = removed[r1:r1 + chunk], valid[r1:r1 + chunk]
        pair = ok[:, :, None] & ok[:, None, :]
        system = torch.where(pair, inverse_hessian[idx[:, :, None], idx[:, None, :]], eye)
        rhs = (weight[r1:r1 + chunk].gather(1, idx) * ok)[:, :, None]
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info.max().item()) != 0:
            raise ValueError("a principal block of the inverse Hessian is not positive definite; raise "
                             "pruner.damping")
        solution = torch.cholesky_solve(rhs, factor)[:, :, 0] * ok
        x[r1:r1 + chunk].scatter_(1, idx, solution)
    return x


def blockwise_pass(weight: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, pattern: Pattern, blocksize: int,
                   nm_rule: str, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weights, removal mask): walk the column blocks, choose each block's removals (unless `mask` is
    given) and remove them jointly with the optimal update of every column not yet final."""
    W = weight.clone()
    chosen = torch.zeros_like(W, dtype=torch.bool) if mask is None else mask
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        U_b = U[i1:i2, i1:]
        U_bb = U_b[:, :i2 - i1]
        inverse_hessian = U_bb.T @ U_bb  # [H_F⁻¹] restricted to the block, F = every column from i1 on
        block = W[:, i1:i2]
        if mask is None:  # cumulative rounding: every row ends with exactly floor(fraction * columns) zeros
            count = removal_count(pattern.fraction, i2) - removal_count(pattern.fraction, i1)
            chosen[:, i1:i2] = removal_mask(block, inverse_hessian, dead[i1:i2], pattern, nm_rule, count)
        mask_b = chosen[:, i1:i2]
        if mask_b.any():
            x = joint_removal(block, inverse_hessian, mask_b)
            W[:, i1:] -= (x @ U_bb.T) @ U_b
            W[:, i1:i2].masked_fill_(mask_b, 0)  # exactly zero, not a rounding residue
    return W, chosen


def prune(weight: torch.Tensor, inputs: LayerInputs, pattern: Pattern, blocksize: int | None = 128,
          damping: float = 0.01, nm_mask: str = "joint", refit: bool = True,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned and jointly compensated copy of `weight` (out x in).

    `blocksize` columns per step of the mask search (null: whole rows, a static mask); `refit` then applies the
    exact whole-row closed form to the original weights for the chosen mask (the optimum for that mask; without
    it earlier blocks stay as they were frozen). `mask` (True = remove) skips the search: only the update runs.
    """
    check_options(pattern, blocksize, damping, nm_mask, refit)
    columns = weight.shape[1]
    check_width(pattern, columns)
    blocksize = columns if blocksize is None else min(blocksize, columns)
    dtype = working_dtype(weight, inputs)
    W = weight.to(dtype)
    U, dead = inverse_factor(inputs.hessian().to(dtype), damping)
    pruned, chosen = blockwise_pass(W, U, dead, pattern, blocksize, nm_mask, mask)
    if refit and blocksize < columns:
        pruned, _ = blockwise_pass(W, U, dead, pattern, columns, nm_mask, chosen)
    return pruned.to(weight.dtype)
