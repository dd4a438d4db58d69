"""Mamba-3's layers in pure torch: mamba-ssm's `mamba3_siso_combined` (Triton only) and `mamba3_mimo` (TileLang only)
on any device.

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

MIMO (`mamba3_mimo`) is the same recurrence with R pairs (k_r, v_r) entering the state per token and R queries reading
it: v_r = x ⊙ ψ_r (MIMO_V), the state adds Σ_r v_r k_rᵀ, and the R outputs, each gated by silu(z ⊙ ζ_r) (MIMO_Z), are
summed with weights φ_r (MIMO_Out); its rotation pairs state dimension i with i + n/2 (the TileLang kernel's layout)
instead of 2i with 2i + 1, and its B/C biases are per head and rank. mamba-ssm's minimal SSD takes one (B, C) pair per
token, so the MIMO layer's chunks are contracted here (`ranked_ssd`, its listing with a rank index on B, C and X).

`return_final_states` gives what decoding continues from (the angles, the state, the last token's k and v), and `step`
is `Mamba3.step` (mamba-ssm's runs on its CuTe kernel only), SISO and MIMO, so a Mamba-3 model generates on a CPU.
Not covered: `Input_States` (a prefill continuing from a cache) and `cu_seqlens` (packed sequences):
NotImplementedError.

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
from einops import rearrange, repeat


def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x (..., n) with its pairs (x_2i, x_2i+1), i < theta.shape[-1], rotated by theta (..., n_angles)."""
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    cos, sin = theta.cos(), theta.sin()
    rest = first.shape[-1] - theta.shape[-1]
    if rest:  # pairs past the angles are not rotated
        cos, sin = F.pad(cos, (0, rest), value=1.0), F.pad(sin, (0, rest), value=0.0)
    return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)


def rotate_halves(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """x (..., n) with its pairs (x_i, x_i+n/2), i < theta.shape[-1], rotated by theta (..., n_angles): the MIMO
    kernel's layout of the same rotation (mamba3_mimo_fwd.py; mamba3.py's step: "the i-th entry is paired with the
    i+N//2-th entry")."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = theta.cos(), theta.sin()
    rest = first.shape[-1] - theta.shape[-1]
    if rest:  # pairs past the angles are not rotated
        cos, sin = F.pad(cos, (0, rest), value=1.0), F.pad(sin, (0, rest), value=0.0)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


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


def input_weights(dt: torch.Tensor, Trap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, f), both (b, h, l): the weight w_t = λ_t dt_t + (1 - λ_{t+1}) dt_{t+1} with which token t's (k, v) enters
    every later output, and f_t = (1 - λ_{t+1}) dt_{t+1}, the share it does not have in its own output. dt (b, h, l)
    float32, Trap (b, h, l) before the sigmoid."""
    share = torch.sigmoid(Trap.float())
    following = F.pad(dt[..., 1:] * (1 - share[..., 1:]), (0, 1))  # the next token's (1 - λ) dt; none after the last
    return dt * share + following, following


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
    dt = DT.float()
    theta = cumulative_angles(Angles, angle_dt(dt))
    q = rotate(heads(Q) + Q_bias.float(), theta)
    k = rotate(heads(K) + K_bias.float(), theta)
    weight, following = input_weights(dt, Trap)
    weight = weight.transpose(1, 2).unsqueeze(-1)  # (b, l, h, 1)
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


def by_rank(per_head: torch.Tensor) -> torch.Tensor:
    """A per-head, per-rank parameter (h, R, ...) as (R, h, ...) in float32, the layout the ranks' inputs have."""
    return per_head.float().transpose(0, 1)


def ranked_ssd(X, A, B, C, block_len):
    """mamba-ssm's `ssd_minimal_discrete` (its chunked listing, same steps) with R (B, X) pairs and R queries C per
    token: X (b, l, r, h, p), A (b, l, h), B (b, l, r, h, n), C (b, l, R, h, n); y_{t,R} = Σ_{s<=t} exp(A_{s+1} + ... +
    A_t) Σ_r (C_{t,R}·B_{s,r}) X_{s,r}. Returns y (b, l, R, h, p) and the final state (b, h, p, n)."""
    from mamba_ssm.modules.ssd_minimal import segsum  # imported once compat has made mamba_ssm importable

    X, A, B, C = [rearrange(x, "b (c l) ... -> b c l ...", l=block_len) for x in (X, A, B, C)]
    A = rearrange(A, "b c l h -> b h c l")
    A_cumsum = torch.cumsum(A, dim=-1)
    # 1. within each chunk
    scores = torch.einsum("bclRhn,bcsrhn->bhclsRr", C, B) * torch.exp(segsum(A))[..., None, None]
    y_diag = torch.einsum("bhclsRr,bcsrhp->bclRhp", scores, X)
    # 2. each chunk's state, 3. the states at chunk boundaries, 4. what each token reads of the state before its chunk
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclrhn,bhcl,bclrhp->bchpn", B, decay_states, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    y_off = torch.einsum("bclRhn,bchpn,bhcl->bclRhp", C, states, torch.exp(A_cumsum))
    return rearrange(y_diag + y_off, "b c l ... -> b (c l) ..."), final_state


def mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
                rotary_dim_divisor=4, dtype=None, return_state=False, cu_seqlens=None):
    """`mamba3_mimo`'s forward (mamba_ssm.ops.tilelang.mamba3.mamba3_mimo, same arguments): Q, K (b, l, R, g, n), V and
    Z (b, l, h, p), ADT, DT, Trap (b, h, l), Q_bias, K_bias (h, R, n), MIMO_V, MIMO_Z, MIMO_Out (h, R, p), Angles
    (b, l, h, n_angles), D (h,). Returns y (b, l, h, p), or (b, l, R, h, p) without MIMO_Out (the module then norms and
    contracts the ranks itself). `rotary_dim_divisor` and `dtype` only shape the kernel's tiles and precision: the
    angles' count gives the rotated pairs, and everything is computed in float32 and returned in V's dtype."""
    if cu_seqlens is not None:
        raise NotImplementedError("packed sequences (cu_seqlens) are not supported by the pure-torch Mamba-3 layer")
    length, nheads = V.shape[1], V.shape[2]
    heads = lambda M: repeat(M.float(), "b l r g n -> b l r (g x) n", x=nheads // M.shape[3])  # noqa: E731
    dt = DT.float()
    theta = cumulative_angles(Angles, angle_dt(dt))  # (b, l, h, n_angles): one rotation for every rank
    q = rotate_halves(heads(Q) + by_rank(Q_bias), theta[:, :, None])
    k = rotate_halves(heads(K) + by_rank(K_bias), theta[:, :, None])
    v = torch.einsum("blhp,hrp->blrhp", V.float(), MIMO_V.float())
    weight, following = input_weights(dt, Trap)
    pad = -length % chunk_size  # causal: tokens appended at the end change no earlier output
    along = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))  # noqa: E731
    y, state = ranked_ssd(along(v), along(ADT.float().transpose(1, 2)),
                          along(k * weight.transpose(1, 2)[:, :, None, :, None]), along(q), chunk_size)
    own = torch.einsum("blRhn,blrhn,blrhp->blRhp", q, k, v)  # each token's pairs with its own ranks
    y = y[:, :length] - own * following.transpose(1, 2)[:, :, None, :, None]
    if D is not None:
        y = y + D.float()[:, None] * v
    if Z is not None:
        y = y * F.silu(torch.einsum("blhp,hrp->blrhp", Z.float(), MIMO_Z.float()))
    if MIMO_Out is not None:
        y = torch.einsum("blrhp,hrp->blhp", y, MIMO_Out.float())
    if not return_state:
        return y.to(V.dtype)
    # as the kernel returns them: the angles, the state after the last token, its rotated k per rank, its x
    return y.to(V.dtype), theta[:, -1], state, k[:, -1].to(V.dtype), V[:, -1]


def step(layer, u, angle_state, ssm_state, k_state, v_state):
    """mamba-ssm's `Mamba3.step` in pure torch, SISO and MIMO: one token per row, u (b, d_model) or (b, 1, d_model);
    the states are updated in place and returned as the module's step returns them (k_state (b, R, h, n) rotated,
    v_state the token's x (b, h, p), which the next step projects per rank as this one does)."""
    single = u.dim() == 3
    rank = layer.mimo_rank  # 1 for SISO
    z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(layer.in_proj(u.squeeze(1) if single else u), [
        layer.d_inner, layer.d_inner, layer.d_state * layer.num_bc_heads * rank,
        layer.d_state * layer.num_bc_heads * rank, layer.nheads, layer.nheads, layer.nheads, layer.num_rope_angles],
        dim=-1)
    dt, B, C, x, z, share, A, angles = layer._preprocess(dd_A, dd_dt, B, C, x, z, trap, angles)  # B, C (b, R, h, n)
    dt, share = dt.float(), share.float()
    theta = wrapped(angle_state + torch.tanh(angles.float()) * math.pi * dt.unsqueeze(-1))
    turn = rotate_halves if layer.is_mimo else rotate
    q = turn(C.float() + by_rank(layer.C_bias), theta[:, None])  # (b, R, h, n)
    k = turn(B.float() + by_rank(layer.B_bias), theta[:, None])
    ranks = ((lambda t: torch.einsum("bhp,hrp->brhp", t.float(), layer.mimo_x.float())) if layer.is_mimo
             else (lambda t: t.float()[:, None]))  # (b, h, p) -> the values per rank (b, R, h, p)
    v, v_before = ranks(x), ranks(v_state)
    decay = torch.exp(A * dt)[..., None, None]
    state = decay * ssm_state + ((1 - share) * dt)[..., None, None] * decay * torch.einsum(
        "brhp,brhn->bhpn", v_before, k_state.float()) + (share * dt)[..., None, None] * torch.einsum(
        "brhp,brhn->bhpn", v, k)  # (b, h, p, n)
    y = torch.einsum("bhpn,brhn->brhp", state, q) + layer.D.float()[:, None] * v  # (b, R, h, p)
    if layer.is_mimo and layer.is_outproj_norm:
        y = layer._postprocess(y, layer.mimo_o.transpose(0, 1), z, layer.mimo_z.transpose(0, 1),
                               layer.headdim).flatten(1)
    elif layer.is_mimo:
        gate = F.silu(torch.einsum("bhp,hrp->brhp", z.float(), layer.mimo_z.float()))
        y = torch.einsum("brhp,hrp->bhp", y * gate, layer.mimo_o.float()).flatten(1)
    elif layer.is_outproj_norm:
        y = layer.norm(y[:, 0].flatten(1), z.flatten(1))
    else:
        y = (y[:, 0] * F.silu(z.float())).flatten(1)
    out = layer.out_proj(y.to(x.dtype))
    angle_state.copy_(theta)
    ssm_state.copy_(state)
    k_state.copy_(k)
    v_state.copy_(x)
    return (out.unsqueeze(1) if single else out), angle_state, ssm_state, k_state, v_state
