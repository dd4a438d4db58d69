"""What the pruners know about a linear layer's calibration inputs, and the inverse-Hessian factor they share.

For a layer y = W x and calibration inputs X (n features x N tokens) the layer-wise objective ||W X - Ŵ X||² has
the Hessian H = 2 X Xᵀ (per output row, the same for all rows). We keep Σ x xᵀ and the token count, so
H = 2 Σ x xᵀ / N (SparseGPT divides by sequences instead; the scale cancels, since damping is relative).
"""
from __future__ import annotations

import torch


class LayerInputs:
    """Running Σ x xᵀ (the Gram matrix) and token count of one linear layer's inputs."""

    def __init__(self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.gram = torch.zeros(width, width, device=device, dtype=dtype)
        self.tokens = 0

    @classmethod
    def of(cls, x: torch.Tensor, dtype: torch.dtype | None = None) -> "LayerInputs":
        """The statistics of a given input matrix (tokens x features), e.g. in tests."""
        stats = cls(x.shape[-1], x.device, dtype or torch.promote_types(x.dtype, torch.float32))
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.gram.shape[0]).to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer; its Hessian is undefined")
        return self.gram * (2.0 / self.tokens)

    def squared_norms(self) -> torch.Tensor:
        """‖X_j‖² for every input feature j (Wanda's statistic)."""
        return self.gram.diagonal().clone()


def check_damping(damping) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping < 0:
        raise ValueError(f"damping must be a number >= 0 (a fraction of the mean of diag H), got {damping!r}")


def inverse_factor(hessian: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): the upper Cholesky factor of (H + λI)⁻¹ = UᵀU, and the inputs never active in calibration.

    As SparseGPT: dead inputs (H_jj = 0) get H_jj = 1 so H stays invertible; λ = damping · mean(diag H).
    Row i of U from column i on is the OBS row of the inverse Hessian of the columns {i, ..., n-1} after the
    columns before i are eliminated, so [U[i:, i:]]ᵀ U[i:, i:] = (H_{i:, i:})⁻¹: every sequential downdate in one
    factorisation.
    """
    check_damping(damping)
    hessian = hessian.clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    # the mean of a contiguous copy of the diagonal, as SparseGPT's torch.mean(torch.diag(H)): a strided view sums in
    # another order, 1 ulp off, which the factorisation of an ill-conditioned H turns into ~1e-5 relative
    hessian.diagonal().add_(damping * torch.diag(hessian).mean())
    factor, info = torch.linalg.cholesky_ex(hessian)
    if info.item() != 0:
        raise ValueError(f"the damped Hessian is not positive definite (damping {damping}); raise pruner.damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True), dead


def relative_output_error(before: torch.Tensor, after: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - Ŵ) X||² / ||W X||² on the calibration inputs, from Σ x xᵀ alone."""
    gram = gram.to(torch.float64)
    delta = (before - after).to(torch.float64)
    before = before.to(torch.float64)
    total = torch.einsum("ij,jk,ik->", before, gram, before).item()
    return torch.einsum("ij,jk,ik->", delta, gram, delta).item() / total if total > 0 else 0.0


def working_dtype(weight: torch.Tensor, inputs: LayerInputs) -> torch.dtype:
    """fp32 at least (fp16/bf16 weights are solved in fp32, as SparseGPT), fp64 when the caller supplies fp64."""
    return torch.promote_types(torch.promote_types(weight.dtype, inputs.gram.dtype), torch.float32)
