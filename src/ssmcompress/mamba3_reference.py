"""Mamba-3's SISO layer in pure torch: mamba-ssm's `mamba3_siso_combined` (Triton only) on any device.

mamba-ssm ships Mamba-3 (`mamba_ssm.modules.mamba3.Mamba3`; Lahoti et al., "Mamba-3: Improved Sequence Modeling using
State Space Principles", 2026) with Triton kernels for the SISO layer and TileLang ones for MIMO, and no pure-torch
path, so the layer cannot run on a CPU. This is that path, written from the recurrence the kernels compute (the one
mamba-ssm's kernel tests check them against), per head h, token t:

    θ_t = θ_{t-1} + π·tanh(angles_t)·dt_t                      (mod 2π; one angle per pair of state dimensions)
    q_t = rot(θ_t) (C_t + C_bias),  k_t = rot(θ_t) (B_t + B_bias) (the first pairs rotated, the others left as they are)
    S_t = exp(adt_t) S_{t-1} + (1 - λ_t) dt_t exp(adt_t) k_{t-1} v_{t-1}ᵀ + λ_t dt_t k_t v_tᵀ,   λ_t = sigmoid(trap_t)
    y_t = S_tᵀ q_t + D v_t,  gated by z_t·sigmoid(z_t)

(the trapezoid: each token's input enters the state twice, weighted by λ at its own step and by 1 - λ at the next one,
the "previous token" the reducer has to think about). Unrolled, the pair (k_j, v_j) enters y_t (j <= t) with weight
exp(adt_{j+1} + ... + adt_t)·w_j, w_j = λ_j dt_j + (1 - λ_{j+1}) dt_{j+1}, except that at j = t only λ_t dt_t: so y is
Mamba-2's SSD with B = k·w, C = q, X = v and log-decays adt (mamba-ssm's chunked `ssd_minimal_discrete`, the same
contractions as the Triton kernel's chunks), minus the next token's share at j = t, (q_t·k_t)(1 - λ_{t+1}) dt_{t+1} v_t.
Everything is computed in float32 and returned in V's dtype.

Not covered: `Input_States` and `return_final_states` (the cache of a prefill, whose decoding steps need mamba-ssm's
CuTe step kernel, a GPU anyway), and `cu_seqlens` (packed sequences): each raises NotImplementedError.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import repeat


def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x (..., n) with its pairs (x_2i, x_2i+1), i < theta.shape[-1], rotated by theta (..., n_angles)."""
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    cos, sin = theta.cos(), theta.sin()
    rest = first.shape[-1] - theta.shape[-1]
    if rest:  # pairs past the angles are not rotated
        cos, sin = F.pad(cos, (0, rest), value=1.0), F.pad(sin, (0, rest), value=0.0)
    return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)


def cumulative_angles(angles: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """θ (b, l, h, n_angles): the running sum of π·tanh(angles)·dt over the sequence, wrapped to [0, 2π) as the
    kernels wrap it. angles (b, l, h, n_angles) before the tanh; dt (b, h, l)."""
    theta = torch.cumsum(torch.tanh(angles.float()) * math.pi * dt.transpose(1, 2).unsqueeze(-1), dim=1)
    return theta - 2 * math.pi * torch.floor(theta / (2 * math.pi))


def mamba3_siso(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
                return_final_states=False, cu_seqlens=None):
    """`mamba3_siso_combined`'s forward (same arguments): Q, K (b, l, g, n), V and Z (b, l, h, p), ADT, DT, Trap
    (b, h, l), Q_bias, K_bias (h, n), Angles (b, l, h, n_angles), D (h,). Returns y (b, l, h, p)."""
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    if Input_States is not None or return_final_states:
        raise NotImplementedError("Mamba-3 with a state cache (decoding) runs on mamba-ssm's GPU kernels only")
    if cu_seqlens is not None:
        raise NotImplementedError("packed sequences (cu_seqlens) are not supported by the pure-torch Mamba-3 layer")
    batch, length, nheads, _ = V.shape
    heads = lambda M: repeat(M.float(), "b l g n -> b l (g r) n", r=nheads // M.shape[2])  # noqa: E731
    dt, share = DT.float(), torch.sigmoid(Trap.float())  # (b, h, l)
    theta = cumulative_angles(Angles, dt)
    q = rotate(heads(Q) + Q_bias.float(), theta)
    k = rotate(heads(K) + K_bias.float(), theta)
    following = F.pad(dt[..., 1:] * (1 - share[..., 1:]), (0, 1))  # the next token's (1 - λ) dt; none after the last
    weight = (dt * share + following).transpose(1, 2).unsqueeze(-1)  # (b, l, h, 1)
    pad = -length % chunk_size  # causal: tokens appended at the end change no earlier output
    along = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))  # noqa: E731
    v = V.float()
    y, _ = ssd_minimal_discrete(along(v), along(ADT.float().transpose(1, 2)), along(k * weight), along(q), chunk_size)
    y = y[:, :length] - ((q * k).sum(-1) * following.transpose(1, 2)).unsqueeze(-1) * v
    if D is not None:
        y = y + D.float()[:, None] * v
    if Z is not None:
        y = y * F.silu(Z.float())
    return y.to(V.dtype)
