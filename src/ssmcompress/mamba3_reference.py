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

`return_final_states` gives what decoding continues from (the angles, the state, the last token's k and v), and `step`
is `Mamba3.step` (mamba-ssm's runs on its CuTe kernel only), so a Mamba-3 model generates on a CPU. Not covered:
`Input_States` (a prefill continuing from a cache) and `cu_seqlens` (packed sequences): NotImplementedError.

`ANGLE_STEP_SCALE` is this repository's addition for token reduction: a factor per token on the angle step
π·tanh(angles_t)·dt_t, set around a mixer's forward (hosts.mamba_ssm.attach_rotation) and applied here and, through
compat, on mamba-ssm's kernel path (its angle cumsum, `angle_dt_fwd`). The step's dt also scales the token's input, so
no change of the layer's inputs could scale the rotation alone.
"""
from __future__ import annotations

import math
from contextvars import ContextVar

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


# (b, l) factors on the angle steps of the Mamba-3 mixer running, or None: every step as the layer computes it
ANGLE_STEP_SCALE: ContextVar[torch.Tensor | None] = ContextVar("angle_step_scale", default=None)


def angle_dt(dt: torch.Tensor) -> torch.Tensor:
    """dt (b, h, l) as the angle steps read it: times ANGLE_STEP_SCALE's factors where they are set."""
    scale = ANGLE_STEP_SCALE.get()
    return dt if scale is None else dt * scale.to(dt.dtype)[:, None, :]


def cumulative_angles(angles: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """θ (b, l, h, n_angles): the running sum of π·tanh(angles)·dt over the sequence, wrapped to [0, 2π) as the
    kernels wrap it. angles (b, l, h, n_angles) before the tanh; dt (b, h, l)."""
    return wrapped(torch.cumsum(torch.tanh(angles.float()) * math.pi * dt.transpose(1, 2).unsqueeze(-1), dim=1))


def wrapped(theta: torch.Tensor) -> torch.Tensor:
    """Angles wrapped to [0, 2π), as the kernels keep them."""
    return theta - 2 * math.pi * torch.floor(theta / (2 * math.pi))


def mamba3_siso(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None, chunk_size=64,
                return_final_states=False, cu_seqlens=None):
    """`mamba3_siso_combined`'s forward (same arguments): Q, K (b, l, g, n), V and Z (b, l, h, p), ADT, DT, Trap
    (b, h, l), Q_bias, K_bias (h, n), Angles (b, l, h, n_angles), D (h,). Returns y (b, l, h, p)."""
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    if Input_States is not None:
        raise NotImplementedError("a Mamba-3 prefill that continues from cached states is not supported by the "
                                  "pure-torch layer (decoding steps are: `step`)")
    if cu_seqlens is not None:
        raise NotImplementedError("packed sequences (cu_seqlens) are not supported by the pure-torch Mamba-3 layer")
    batch, length, nheads, _ = V.shape
    heads = lambda M: repeat(M.float(), "b l g n -> b l (g r) n", r=nheads // M.shape[2])  # noqa: E731
    dt, share = DT.float(), torch.sigmoid(Trap.float())  # (b, h, l)
    theta = cumulative_angles(Angles, angle_dt(dt))
    q = rotate(heads(Q) + Q_bias.float(), theta)
    k = rotate(heads(K) + K_bias.float(), theta)
    following = F.pad(dt[..., 1:] * (1 - share[..., 1:]), (0, 1))  # the next token's (1 - λ) dt; none after the last
    weight = (dt * share + following).transpose(1, 2).unsqueeze(-1)  # (b, l, h, 1)
    pad = -length % chunk_size  # causal: tokens appended at the end change no earlier output
    along = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))  # noqa: E731
    v = V.float()
    y, state = ssd_minimal_discrete(along(v), along(ADT.float().transpose(1, 2)), along(k * weight), along(q),
                                    chunk_size)
    y = y[:, :length] - ((q * k).sum(-1) * following.transpose(1, 2)).unsqueeze(-1) * v
    if D is not None:
        y = y + D.float()[:, None] * v
    if Z is not None:
        y = y * F.silu(Z.float())
    if not return_final_states:
        return y.to(V.dtype)
    # what decoding continues from, as the kernel returns it: the angles, the state after the last token (the padded
    # steps neither add to it nor decay it), and the last token's rotated k and its v, which the next step's
    # trapezoid mixes in
    return y.to(V.dtype), theta[:, -1], state, k[:, -1].to(V.dtype), V[:, -1]


def step(layer, u, angle_state, ssm_state, k_state, v_state):
    """mamba-ssm's `Mamba3.step` (SISO) in pure torch: one token per row, u (b, d_model) or (b, 1, d_model); the
    states are updated in place and returned as the module's step returns them."""
    if layer.is_mimo:
        raise NotImplementedError("Mamba-3 MIMO decoding runs on mamba-ssm's GPU kernels only")
    single = u.dim() == 3
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(layer.in_proj(u.squeeze(1) if single else u), [
        layer.d_inner, layer.d_inner, layer.d_state * layer.num_bc_heads, layer.d_state * layer.num_bc_heads,
        layer.nheads, layer.nheads, layer.nheads, layer.num_rope_angles], dim=-1)
    dt, B, C, x, z, share, A, angles = layer._preprocess(dd_A, dd_dt, B, C, x, z, trap, angles)
    dt, share = dt.float(), share.float()
    theta = wrapped(angle_state + torch.tanh(angles.float()) * math.pi * dt.unsqueeze(-1))
    q = rotate(C[:, 0].float() + layer.C_bias[:, 0].float(), theta)  # (b, h, n)
    k = rotate(B[:, 0].float() + layer.B_bias[:, 0].float(), theta)
    v = x.float()
    decay = torch.exp(A * dt)[..., None, None]
    state = decay * ssm_state + ((1 - share) * dt)[..., None, None] * decay * (
        v_state.float().unsqueeze(-1) * k_state[:, 0].float().unsqueeze(-2)) + (share * dt)[..., None, None] * (
        v.unsqueeze(-1) * k.unsqueeze(-2))  # (b, h, p, n)
    y = torch.einsum("bhpn,bhn->bhp", state, q) + layer.D.float()[:, None] * v
    if layer.is_outproj_norm:
        y = layer.norm(y.flatten(1), z.flatten(1))
    else:
        y = (y * F.silu(z.float())).flatten(1)
    out = layer.out_proj(y.to(x.dtype))
    angle_state.copy_(theta)
    ssm_state.copy_(state)
    k_state.copy_(k.unsqueeze(1))
    v_state.copy_(x)
    return (out.unsqueeze(1) if single else out), angle_state, ssm_state, k_state, v_state
