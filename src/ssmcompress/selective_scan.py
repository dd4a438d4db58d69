"""Mamba-1's selective scan in Triton, forward and backward: mamba-ssm's `selective_scan_fn` without its CUDA build.

Written by hand because mamba-ssm ships this scan only as a compiled CUDA extension (`selective_scan_cuda`) and
no library offers it otherwise; mambapy's parallel scan and mamba-ssm's `selective_scan_ref` are pure torch and
materialise the (batch, d, length, d_state) states. Same contract as `selective_scan_fn`:

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t      (per channel d, state n; delta = softplus(delta + bias))
    y_t = C_t . h_t + D u_t,   out_t = y_t * silu(z_t)

u, delta, z: (b, d, l); A: (d, n) real; B, C: (d, n), (b, n, l) or (b, g, n, l) with g dividing d; D, delta_bias:
(d,). Inputs in fp32/fp16/bf16; states and sums in fp32; `out` in u's dtype and the last state (b, d, n) in fp32,
as mamba-ssm's reference returns them. Complex A is refused.

Layout. A program owns BLOCK_D channels of one sequence and walks the sequence in chunks of CHUNK steps; each
thread owns one channel and holds all its states for the chunk in registers, a (BLOCK_D, N, CHUNK) tile with only
the channel axis across threads. So the recurrence over a chunk is an in-thread `tl.associative_scan` (it lowers
to a chain of FMAs), the sum over states is in-thread, and the state is carried to the next chunk in registers.
Triton picks that layout because u and delta are loaded as (BLOCK_D, 1, CHUNK) tiles, 16 bytes per channel and
chunk; every other tensor is made to follow it. The forward costs one exp2 per (channel, step, state): on an
H100/H200 the special-function units, not memory, bound it at large shapes.

Backward (reverse scan over chunks, last to first): the forward stores each channel's state every SEGMENT steps;
the backward re-runs each segment forward from its stored state, keeping the chunk-start states in a per-program
scratch buffer, then walks its chunks backwards, recomputing the states of each chunk and running the adjoint
recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} as a reverse scan. Sums over channels (dB, dC when B/C vary
with the input) are reduced within the program and written per channel block, sums over the batch (dA, dD, the
bias, constant B/C) per sequence; torch adds the partial sums, so the gradients are deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------------- building blocks


@triton.jit
def _recurrence(a_l, b_l, a_r, b_r):
    """h -> a h + b for a span, composed with the next span: the first-order linear recurrence of the states."""
    return a_l * a_r, a_r * b_l + b_r


@triton.jit
def _adjoint(first_r, coef_r, off_r, first_l, coef_l, off_l):
    """The adjoint recurrence g_t = c_t + a_{t+1} g_{t+1}, scanned right to left (Triton's reverse scan calls
    combine(later span, earlier span)). A span [i..j] is (a_i, prod a_{i+1..j}, offset): g_i = offset + prod * X,
    where X = a_{j+1} g_{j+1} enters from the right. Keeping the span's first decay avoids shifting a by one step."""
    bridge = coef_l * first_r
    return first_l, bridge * coef_r, off_l + bridge * off_r


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1] within 4 ulp: 2 atanh(s), s = e / (2 + e) <= 1/3, summed to s^13. By hand because
    tl.log lowers to a ~25-instruction routine, as costly per step as the scan of four states."""
    s = e / (2.0 + e)
    s2 = s * s
    series = ((((((2.0 / 13.0) * s2 + 2.0 / 11.0) * s2 + 2.0 / 9.0) * s2 + 2.0 / 7.0) * s2 + 2.0 / 5.0) * s2
              + 2.0 / 3.0) * s2 + 2.0
    return series * s


@triton.jit
def _softplus(x):
    # torch's softplus (beta 1, threshold 20) to fp32 rounding: log(1 + exp(x)) without overflow; x > 20 gives x
    return tl.maximum(x, 0.0) + _log1p_unit(tl.exp2(tl.abs(x) * -LOG2E))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(x * -LOG2E))


@triton.jit
def _first(x, at_first):
    """x[..., 0] of a (BLOCK_D, N, CHUNK) tile: the chunk axis lies within a thread, so this is a register pick."""
    return tl.sum(tl.where(at_first, x, 0.0), axis=2)


@triton.jit
def _last(x, at_last):
    return tl.sum(tl.where(at_last, x, 0.0), axis=2)


@triton.jit
def _row_pointers(ptr, batch, stride_b, stride_d, rows3):
    """Pointers to the first step of each channel of one sequence of a (b, d, l) tensor, in 64-bit arithmetic."""
    return ptr + batch * stride_b + rows3.to(tl.int64) * stride_d


@triton.jit
def _chunk_loads(u_rows, delta_rows, z_rows, B_base, C_base, s_B_n, s_C_n, row_valid, states, state_valid, steps,
                 length, VARIABLE_B: tl.constexpr, VARIABLE_C: tl.constexpr, HAS_Z: tl.constexpr):
    """A chunk's inputs as stored (u, delta, z, B, C; 0.0 for those not read), nothing read past the end. u, delta
    and z are (BLOCK_D, 1, CHUNK) tiles, 16 bytes per channel: this load shape fixes the kernels' layout."""
    steps_valid = steps < length
    mask3 = row_valid[:, None, None] & steps_valid[None, None, :]
    steps3 = steps[None, None, :]
    u = tl.load(u_rows + steps3, mask=mask3, other=0.0)
    delta = tl.load(delta_rows + steps3, mask=mask3, other=0.0)
    z = tl.load(z_rows + steps3, mask=mask3, other=0.0) if HAS_Z else 0.0
    matrix_mask = state_valid[:, None] & steps_valid[None, :]
    B = tl.load(B_base + states[:, None] * s_B_n + steps[None, :], mask=matrix_mask, other=0.0) \
        if VARIABLE_B else 0.0
    C = tl.load(C_base + states[:, None] * s_C_n + steps[None, :], mask=matrix_mask, other=0.0) \
        if VARIABLE_C else 0.0
    return u, delta, z, B, C


@triton.jit
def _per_channel(ptr, stride_d, stride_n, rows, row_valid, states, state_valid):
    """A (d, n) tensor's rows of this program as a (BLOCK_D, N, 1) fp32 tile."""
    return tl.load(ptr + rows[:, None] * stride_d + states[None, :] * stride_n,
                   mask=row_valid[:, None] & state_valid[None, :], other=0.0).to(tl.float32)[:, :, None]


@triton.jit
def _channel_constants(A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, s_A_d, s_A_n, s_B_d, s_B_n, s_C_d, s_C_n, rows,
                       row_valid, states, state_valid, VARIABLE_B: tl.constexpr, VARIABLE_C: tl.constexpr,
                       HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """What a program reads once: A log2(e), D, the delta bias, and B and C where constant (else 0.0)."""
    # exp(delta A) is taken as exp2(delta A log2(e)), as mamba-ssm's CUDA kernel does
    A2 = _per_channel(A_ptr, s_A_d, s_A_n, rows, row_valid, states, state_valid) * LOG2E
    rows3, row_valid3 = rows[:, None, None], row_valid[:, None, None]
    skip = tl.load(D_ptr + rows3, mask=row_valid3, other=0.0) if HAS_D else 0.0
    bias = tl.load(bias_ptr + rows3, mask=row_valid3, other=0.0) if HAS_BIAS else 0.0
    B = 0.0 if VARIABLE_B else _per_channel(B_ptr, s_B_d, s_B_n, rows, row_valid, states, state_valid)
    C = 0.0 if VARIABLE_C else _per_channel(C_ptr, s_C_d, s_C_n, rows, row_valid, states, state_valid)
    return A2, skip, bias, B, C


@triton.jit
def _matrix(loaded, constant, VARIABLE: tl.constexpr):
    """B or C of a chunk as a tile broadcasting against (BLOCK_D, N, CHUNK)."""
    return loaded.to(tl.float32)[None, :, :] if VARIABLE else constant


@triton.jit
def _discretize(delta_loaded, u_loaded, bias, mask3, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta + bias, the step size delta, u) in fp32; delta is 0 past the end, so padded steps keep the state."""
    raw = delta_loaded.to(tl.float32) + bias if HAS_BIAS else delta_loaded.to(tl.float32)
    delta = tl.where(mask3, _softplus(raw) if SOFTPLUS else raw, 0.0)
    return raw, delta, u_loaded.to(tl.float32)


@triton.jit
def _chunk_states(delta, u, A2, Bm, h, at_first):
    """(decay, input term delta B u, states h_t) of a chunk, (BLOCK_D, N, CHUNK), from the state h before it."""
    decay = tl.exp2(delta * A2)
    drive = (delta * u) * Bm
    # the incoming state enters through the first step's input, so the scan needs no correction afterwards
    _, states = tl.associative_scan((decay, tl.where(at_first, decay * h[:, :, None] + drive, drive)), axis=2,
                                    combine_fn=_recurrence)
    return decay, drive, states


# ------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr, last_ptr,
        dim, length, channels_per_group, n_segments,
        s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_o_b, s_o_d, s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_n, s_B_d, s_C_b, s_C_g, s_C_n, s_C_d,
        DSTATE: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEGMENT: tl.constexpr,
        VARIABLE_B: tl.constexpr, VARIABLE_C: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr, STORE_LAST: tl.constexpr):
    """out (b, d, l) in out's dtype; optionally the fp32 state entering every segment, (b, d, n_segments, N), and
    the last state (b, d, DSTATE). Grid: (channel blocks, batch)."""
    pid_d, pid_b = tl.program_id(0), tl.program_id(1)
    batch = pid_b.to(tl.int64)
    rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid = rows < dim
    rows3, row_valid3 = rows[:, None, None], row_valid[:, None, None]
    states_n = tl.arange(0, N)
    state_valid = states_n < DSTATE
    chunk_steps = tl.arange(0, CHUNK)
    at_first = (chunk_steps == 0)[None, None, :]
    at_last = (chunk_steps == CHUNK - 1)[None, None, :]
    A2, skip, bias, B_const, C_const = _channel_constants(
        A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, s_A_d, s_A_n, s_B_d, s_B_n, s_C_d, s_C_n, rows, row_valid, states_n,
        state_valid, VARIABLE_B, VARIABLE_C, HAS_D, HAS_BIAS)
    group = (pid_d * BLOCK_D) // channels_per_group  # one group per program (the host sizes BLOCK_D so)
    B_base = B_ptr + batch * s_B_b + group * s_B_g
    C_base = C_ptr + batch * s_C_b + group * s_C_g
    u_rows = _row_pointers(u_ptr, batch, s_u_b, s_u_d, rows3)
    delta_rows = _row_pointers(delta_ptr, batch, s_dt_b, s_dt_d, rows3)
    z_rows = _row_pointers(z_ptr, batch, s_z_b, s_z_d, rows3)
    out_rows = _row_pointers(out_ptr, batch, s_o_b, s_o_d, rows3)
    h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    # each chunk's loads are issued one chunk ahead, so that they are in flight while the chunk before computes
    u_next, delta_next, z_next, B_next, C_next = _chunk_loads(
        u_rows, delta_rows, z_rows, B_base, C_base, s_B_n, s_C_n, row_valid, states_n, state_valid, chunk_steps,
        length, VARIABLE_B, VARIABLE_C, HAS_Z)
    for start in range(0, length, CHUNK):
        u_loaded, delta_loaded, z_loaded, B_loaded, C_loaded = u_next, delta_next, z_next, B_next, C_next
        u_next, delta_next, z_next, B_next, C_next = _chunk_loads(
            u_rows, delta_rows, z_rows, B_base, C_base, s_B_n, s_C_n, row_valid, states_n, state_valid,
            start + CHUNK + chunk_steps, length, VARIABLE_B, VARIABLE_C, HAS_Z)
        if STORE_STATES:
            if start % SEGMENT == 0:  # the state entering each segment, for the backward
                tl.store(states_ptr + ((batch * dim + rows[:, None]) * n_segments + start // SEGMENT) * N
                         + states_n[None, :], h, mask=row_valid[:, None])
        steps3 = (start + chunk_steps)[None, None, :]
        mask3 = row_valid3 & (steps3 < length)
        _, delta, u = _discretize(delta_loaded, u_loaded, bias, mask3, HAS_BIAS, SOFTPLUS)
        _, _, hs = _chunk_states(delta, u, A2, _matrix(B_loaded, B_const, VARIABLE_B), h, at_first)
        h = _last(hs, at_last)  # padded steps carry the state, so the last step holds the final one
        y = tl.sum(hs * _matrix(C_loaded, C_const, VARIABLE_C), axis=1, keep_dims=True)
        if HAS_D:
            y += skip * u
        if HAS_Z:  # silu in fp32, as mamba-ssm's CUDA kernel (its reference computes it in z's dtype)
            z = z_loaded.to(tl.float32)
            y *= z * _sigmoid(z)
        tl.store(out_rows + steps3, y.to(out_ptr.dtype.element_ty), mask=mask3)
    if STORE_LAST:
        tl.store(last_ptr + (batch * dim + rows[:, None]) * DSTATE + states_n[None, :], h,
                 mask=row_valid[:, None] & state_valid[None, :])


# ------------------------------------------------------------------------------------------------------ backward


@triton.jit
def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, scratch_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        dim, length, channels_per_group, n_segments,
        s_u_b, s_u_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_do_b, s_do_d, s_g_b, s_g_d, s_A_d, s_A_n,
        s_B_b, s_B_g, s_B_n, s_B_d, s_C_b, s_C_g, s_C_n, s_C_d,
        DSTATE: tl.constexpr, N: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SEGMENT: tl.constexpr,
        VARIABLE_B: tl.constexpr, VARIABLE_C: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """du, ddelta, dz (b, d, l) in their tensors' dtypes, strides (s_g_b, s_g_d, 1); fp32 partial sums: dA
    (b, d, N), dD and dbias (b, d), dB/dC (b, d, N) when constant, else (b, channel blocks, N, l)."""
    pid_d, pid_b = tl.program_id(0), tl.program_id(1)
    n_blocks = tl.num_programs(0)
    batch = pid_b.to(tl.int64)
    rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid = rows < dim
    rows3, row_valid3 = rows[:, None, None], row_valid[:, None, None]
    states_n = tl.arange(0, N)
    state_valid = states_n < DSTATE
    chunk_steps = tl.arange(0, CHUNK)
    at_first = (chunk_steps == 0)[None, None, :]
    at_last = (chunk_steps == CHUNK - 1)[None, None, :]
    A2, skip, bias, B_const, C_const = _channel_constants(
        A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr, s_A_d, s_A_n, s_B_d, s_B_n, s_C_d, s_C_n, rows, row_valid, states_n,
        state_valid, VARIABLE_B, VARIABLE_C, HAS_D, HAS_BIAS)
    group = (pid_d * BLOCK_D) // channels_per_group  # one group per program (the host sizes BLOCK_D so)
    B_base = B_ptr + batch * s_B_b + group * s_B_g
    C_base = C_ptr + batch * s_C_b + group * s_C_g
    u_rows = _row_pointers(u_ptr, batch, s_u_b, s_u_d, rows3)
    delta_rows = _row_pointers(delta_ptr, batch, s_dt_b, s_dt_d, rows3)
    z_rows = _row_pointers(z_ptr, batch, s_z_b, s_z_d, rows3)
    dout_rows = _row_pointers(dout_ptr, batch, s_do_b, s_do_d, rows3)
    du_rows = _row_pointers(du_ptr, batch, s_g_b, s_g_d, rows3)
    ddelta_rows = _row_pointers(ddelta_ptr, batch, s_g_b, s_g_d, rows3)
    dz_rows = _row_pointers(dz_ptr, batch, s_g_b, s_g_d, rows3)
    per_channel = batch * dim + rows[:, None]
    # this program's chunk-entry states of one segment; each thread reads back only what it wrote
    scratch = scratch_ptr + (batch * n_blocks + pid_d) * (SEGMENT // CHUNK) * BLOCK_D * N \
        + tl.arange(0, BLOCK_D)[:, None] * N + states_n[None, :]
    # block partial sums over the sequence (and over channels for dB, dC in the tiles below)
    dA_acc = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    dB_acc = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    dC_acc = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    carry = tl.zeros((BLOCK_D, N), dtype=tl.float32)  # decay_{t+1} g_{t+1}, entering a chunk from the next one
    for segment_back in range(0, n_segments):
        segment = n_segments - 1 - segment_back
        seg_start = segment * SEGMENT
        n_chunks = tl.cdiv(tl.minimum(SEGMENT, length - seg_start), CHUNK)
        # the segment forward again from its stored state, keeping each chunk's entering state
        h = tl.load(states_ptr + (per_channel * n_segments + segment) * N + states_n[None, :],
                    mask=row_valid[:, None], other=0.0)
        for k in range(0, n_chunks):
            tl.store(scratch + k * BLOCK_D * N, h)
            steps = seg_start + k * CHUNK + chunk_steps
            u_loaded, delta_loaded, _, B_loaded, _ = _chunk_loads(
                u_rows, delta_rows, z_rows, B_base, C_base, s_B_n, s_C_n, row_valid, states_n, state_valid, steps,
                length, VARIABLE_B, False, False)
            _, delta, u = _discretize(delta_loaded, u_loaded, bias, row_valid3 & (steps[None, None, :] < length),
                                      HAS_BIAS, SOFTPLUS)
            _, _, hs = _chunk_states(delta, u, A2, _matrix(B_loaded, B_const, VARIABLE_B), h, at_first)
            h = _last(hs, at_last)
        # then its chunks last to first
        for k_back in range(0, n_chunks):
            k = n_chunks - 1 - k_back
            steps = seg_start + k * CHUNK + chunk_steps
            steps_valid = steps < length
            steps3 = steps[None, None, :]
            mask3 = row_valid3 & (steps3 < length)
            u_loaded, delta_loaded, z_loaded, B_loaded, C_loaded = _chunk_loads(
                u_rows, delta_rows, z_rows, B_base, C_base, s_B_n, s_C_n, row_valid, states_n, state_valid, steps,
                length, VARIABLE_B, VARIABLE_C, HAS_Z)
            raw, delta, u = _discretize(delta_loaded, u_loaded, bias, mask3, HAS_BIAS, SOFTPLUS)
            Bm = _matrix(B_loaded, B_const, VARIABLE_B)
            Cm = _matrix(C_loaded, C_const, VARIABLE_C)
            decay, drive, hs = _chunk_states(delta, u, A2, Bm, tl.load(scratch + k * BLOCK_D * N), at_first)
            dout = tl.load(dout_rows + steps3, mask=mask3, other=0.0).to(tl.float32)
            if HAS_Z:
                z = z_loaded.to(tl.float32)
                gate = _sigmoid(z)
                y = tl.sum(hs * Cm, axis=1, keep_dims=True)
                if HAS_D:
                    y += skip * u
                dz = dout * y * gate * (1.0 + z * (1.0 - gate))
                tl.store(dz_rows + steps3, dz.to(dz_ptr.dtype.element_ty), mask=mask3)
                dy = dout * z * gate
            else:
                dy = dout
            # adjoint states g_t = dL/dh_t: C_t dy_t + decay_{t+1} g_{t+1}, the next chunk's part entering last
            ones = tl.full((BLOCK_D, N, CHUNK), 1.0, tl.float32)
            _, _, g = tl.associative_scan((decay, ones, tl.where(at_last, Cm * dy + carry[:, :, None], Cm * dy)),
                                          axis=2, combine_fn=_adjoint, reverse=True)
            carry = _first(decay * g, at_first)
            # d h_t / d decay_t = h_{t-1} = (h_t - drive_t) / decay_t, so g_t h_{t-1} decay_t = g_t (h_t - drive_t)
            g_decay = g * (hs - drive)
            g_B = tl.sum(g * Bm, axis=1, keep_dims=True)
            ddelta = tl.sum(g_decay * A2, axis=1, keep_dims=True) * LN2 + u * g_B
            du = delta * g_B
            dA_acc += tl.sum(g_decay * delta, axis=2)
            if VARIABLE_B:
                tl.store(dB_ptr + ((batch * n_blocks + pid_d) * N + states_n[:, None]) * length + steps[None, :],
                         tl.sum(g * (delta * u), axis=0), mask=steps_valid[None, :])
            else:
                dB_acc += tl.sum(g * (delta * u), axis=2)
            if VARIABLE_C:
                tl.store(dC_ptr + ((batch * n_blocks + pid_d) * N + states_n[:, None]) * length + steps[None, :],
                         tl.sum(hs * dy, axis=0), mask=steps_valid[None, :])
            else:
                dC_acc += tl.sum(hs * dy, axis=2)
            if HAS_D:
                du += skip * dy
                dD_acc += tl.sum(dy * u, axis=2)
            if SOFTPLUS:
                ddelta *= _sigmoid(raw)
            ddelta = tl.where(mask3, ddelta, 0.0)
            dbias_acc += tl.sum(ddelta, axis=2)
            tl.store(du_rows + steps3, du.to(du_ptr.dtype.element_ty), mask=mask3)
            tl.store(ddelta_rows + steps3, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask3)
    tl.store(dA_ptr + per_channel * N + states_n[None, :], dA_acc, mask=row_valid[:, None])
    if not VARIABLE_B:
        tl.store(dB_ptr + per_channel * N + states_n[None, :], dB_acc, mask=row_valid[:, None])
    if not VARIABLE_C:
        tl.store(dC_ptr + per_channel * N + states_n[None, :], dC_acc, mask=row_valid[:, None])
    if HAS_D:
        tl.store(dD_ptr + per_channel, dD_acc, mask=row_valid[:, None])
    if HAS_BIAS:
        tl.store(dbias_ptr + per_channel, dbias_acc, mask=row_valid[:, None])


# --------------------------------------------------------------------------------------------------- host side


def _check(u, delta, A, B, C, D, z, delta_bias) -> None:
    """One-line errors for what mamba-ssm's kernel would reject or we do not cover, before any work."""
    if A.is_complex():
        raise NotImplementedError("Triton selective scan: complex A is not supported (mamba-ssm's real-A models only)")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective scan: u and delta must be (batch, dim, length), got {tuple(u.shape)} and "
                         f"{tuple(delta.shape)}")
    batch, dim, length = u.shape
    if length == 0 or batch == 0:
        raise ValueError(f"selective scan: empty input {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective scan: A must be (dim={dim}, d_state), got {tuple(A.shape)}")
    dstate = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = {2: M.shape == (dim, dstate), 3: M.shape == (batch, dstate, length),
              4: M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (dstate, length) and M.shape[1] > 0
              and dim % M.shape[1] == 0}.get(M.dim(), False)
        if not ok:
            raise ValueError(f"selective scan: {name} must be (dim, d_state), (batch, d_state, length) or (batch, "
                             f"groups, d_state, length) with groups dividing dim={dim}; got {tuple(M.shape)}")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and vector.shape != (dim,):
            raise ValueError(f"selective scan: {name} must be ({dim},), got {tuple(vector.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


class Tiles(NamedTuple):
    """How the kernels cut the work. The defaults come from compiling for sm_90 and reading registers and SASS
    (one warp of 32 channels per program: no spills, no cross-warp barriers, many small programs to balance the
    SMs); tests pass tiny tiles to get several programs, chunks and segments out of tiny inputs."""
    block_d: int = 32  # channels per program, a power of two (one per thread up to 32 per warp)
    chunk: int | None = None  # forward steps per chunk; None: 16 bytes of the widest (b, d, l) input
    backward_chunk: int = 2  # the backward holds ~7 (block, d_state, chunk) tiles: more steps would spill
    segment: int = 64  # steps between the states the forward keeps for the backward (fp32, d_state per channel)
    maxnreg: int | None = None  # register cap per thread (fewer registers, more resident warps, maybe spills)
    length_multiple: int = 16  # the scan runs on inputs padded at the end to a multiple of this many steps (1: never)


def _groups(M: torch.Tensor) -> int:
    return M.shape[1] if M.dim() == 4 else 1


def _launch(u, A, B, C, tiles: Tiles, chunk: int) -> dict:
    """The kernels' shape arguments: channels per program (dividing the group size when B/C come in groups, so
    that one program reads one group), warps, padded d_state, steps per chunk and segment."""
    dim = u.shape[1]
    groups = max(_groups(B), _groups(C))
    block = min(tiles.block_d, triton.next_power_of_2(dim))
    if groups > 1:
        block = min(block, (dim // groups) & -(dim // groups))  # the largest power of two dividing the group
    if tiles.segment % chunk:
        raise ValueError(f"selective scan tiles: segment {tiles.segment} is not a multiple of the chunk {chunk}")
    launch = dict(N=triton.next_power_of_2(A.shape[1]), BLOCK_D=block, CHUNK=chunk, SEGMENT=tiles.segment,
                  num_warps=max(1, block // 32))
    return launch if tiles.maxnreg is None else dict(launch, maxnreg=tiles.maxnreg)


def _vector_chunk(*tensors: torch.Tensor) -> int:
    """Steps per chunk: 16 bytes of the widest (b, d, l) input per channel, one vector load along l."""
    return 16 // max(t.element_size() for t in tensors if t is not None)


def _strides_bcl(M: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, group, state, channel) strides of B or C in any of its three layouts (0 where it has no such axis)."""
    if M.dim() == 2:
        return 0, 0, M.stride(1), M.stride(0)
    if M.dim() == 3:
        return M.stride(0), 0, M.stride(1), 0
    return M.stride(0), M.stride(1), M.stride(2), 0


def _contiguous_l(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, store_states, store_last, tiles: Tiles):
    """(out, the states entering each segment or None, the last state or None)."""
    batch, dim, length = u.shape
    launch = _launch(u, A, B, C, tiles, tiles.chunk or _vector_chunk(u, delta, z))
    n_segments = triton.cdiv(length, tiles.segment)
    f32 = dict(device=u.device, dtype=torch.float32)
    out = torch.empty((batch, dim, length), device=u.device, dtype=u.dtype)
    states = torch.empty((batch, dim, n_segments, launch["N"]), **f32) if store_states else None
    last = torch.empty((batch, dim, A.shape[1]), **f32) if store_last else None
    zz = z if z is not None else u  # pointers the kernel does not read get any tensor
    _scan_fwd_kernel[(triton.cdiv(dim, launch["BLOCK_D"]), batch)](
        u, delta, A, B, C, D if D is not None else u, zz, delta_bias if delta_bias is not None else u, out,
        states if states is not None else out, last if last is not None else out,
        dim, length, dim // max(_groups(B), _groups(C)), n_segments,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
        out.stride(0), out.stride(1), A.stride(0), A.stride(1), *_strides_bcl(B), *_strides_bcl(C),
        DSTATE=A.shape[1], VARIABLE_B=B.dim() > 2, VARIABLE_C=C.dim() > 2, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        STORE_STATES=store_states, STORE_LAST=store_last, **launch)
    return out, states, last


def _matrix_grad(partial: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """dB or dC in M's layout and dtype from the kernel's fp32 partial sums: (batch, dim, N) per sequence when M
    is constant, else (batch, channel blocks, N, length) per block (blocks in channel order, so per group)."""
    if M.dim() == 2:
        return partial.sum(0)[:, :M.shape[1]].to(M.dtype)
    batch, n_blocks, n_pad, length = partial.shape
    groups = _groups(M)
    grad = partial.view(batch, groups, n_blocks // groups, n_pad, length).sum(2)[:, :, :M.shape[-2]]
    return (grad if M.dim() == 4 else grad[:, 0]).to(M.dtype)


def _backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, dout, tiles: Tiles):
    batch, dim, length = u.shape
    launch = _launch(u, A, B, C, tiles, tiles.backward_chunk)
    block, n_pad = launch["BLOCK_D"], launch["N"]
    n_blocks = triton.cdiv(dim, block)
    f32 = dict(device=u.device, dtype=torch.float32)
    du = torch.empty((batch, dim, length), device=u.device, dtype=u.dtype)
    ddelta = torch.empty((batch, dim, length), device=u.device, dtype=delta.dtype)
    dz = torch.empty((batch, dim, length), device=u.device, dtype=z.dtype) if z is not None else None
    dA = torch.empty((batch, dim, n_pad), **f32)
    dB = torch.empty((batch, n_blocks, n_pad, length) if B.dim() > 2 else (batch, dim, n_pad), **f32)
    dC = torch.empty((batch, n_blocks, n_pad, length) if C.dim() > 2 else (batch, dim, n_pad), **f32)
    dD = torch.empty((batch, dim), **f32) if D is not None else None
    dbias = torch.empty((batch, dim), **f32) if delta_bias is not None else None
    scratch = torch.empty((batch * n_blocks * (tiles.segment // tiles.backward_chunk) * block * n_pad,), **f32)
    zz = z if z is not None else u
    _scan_bwd_kernel[(n_blocks, batch)](
        u, delta, A, B, C, D if D is not None else u, zz, delta_bias if delta_bias is not None else u, dout, states,
        scratch, du, ddelta, dz if dz is not None else du, dA, dB, dC, dD if dD is not None else dA,
        dbias if dbias is not None else dA,
        dim, length, dim // max(_groups(B), _groups(C)), states.shape[2],
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
        dout.stride(0), dout.stride(1), du.stride(0), du.stride(1), A.stride(0), A.stride(1),
        *_strides_bcl(B), *_strides_bcl(C),
        DSTATE=A.shape[1], VARIABLE_B=B.dim() > 2, VARIABLE_C=C.dim() > 2, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), **launch)
    return (du, ddelta, dA.sum(0)[:, :A.shape[1]].to(A.dtype), _matrix_grad(dB, B), _matrix_grad(dC, C),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)


class SelectiveScanFn(torch.autograd.Function):
    """mamba-ssm's `SelectiveScanFn` on the Triton kernels. As there, the last state gets no gradient. Called
    through `selective_scan_fn`, which checks the arguments (`_check`) before it pads them."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False, tiles=Tiles()):
        u, delta, B, C, z = (_contiguous_l(t) for t in (u, delta, B, C, z))
        D, delta_bias = (t.contiguous() if t is not None else None for t in (D, delta_bias))
        needs_grad = any(ctx.needs_input_grad[:8])
        out, states, last = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, needs_grad,
                                     return_last_state, tiles)
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus, ctx.tiles = delta_softplus, tiles
        if return_last_state:
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *unused_last_state_grad):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = _backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states, _contiguous_l(dout),
                          ctx.tiles)
        return (*grads, None, None, None)


# delta on the padded steps: with the softplus, delta + bias rounds to a step of exactly 0 (softplus(-1e4) is 0 in
# fp32 for any bias below ~9.9e3; mamba-ssm initialises it to softplus^-1 of dt in [0.001, 0.1]), so exp(delta A) = 1
# and delta B u = 0: the state passes those steps unchanged, and so does every gradient. (-inf would hold for any
# bias and passes the interpreted tests too; -1e4 is what the GPU check ran.)
NO_STEP = -1e4


def _padding(length: int, tiles: Tiles, delta_softplus: bool, delta_bias) -> int:
    """Steps to append so that the length is a multiple of tiles.length_multiple. Why: Triton specialises integer
    arguments on divisibility by 16; at a length (and so row strides) not known to be a multiple of 16, the masks
    along the sequence and the row starts are not provably aligned and every load of u, delta, z, B, C is split
    into single elements. Measured on an H200 (mamba-2.8b's mixer, batch 8, bf16; experiments/gpu/mamba1_lengths.py),
    the unpadded scan took 11x as long per token at lengths 1860 and 1043 as at 1856 and 1040; the padded copies of
    u, delta, z, B and C cost ~15 % of the mixer at those lengths (a mixer whose input is padded instead, ~2 %).
    Without the softplus a delta bias would make the padded steps decay the state, so that case runs unpadded."""
    if delta_bias is not None and not delta_softplus:
        return 0
    return -length % tiles.length_multiple


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, tiles: Tiles | None = None):
    """mamba-ssm's `selective_scan_fn` (same arguments and results) on the Triton kernels above, on inputs padded
    at the end to a multiple of 16 steps (`_padding`: the same outputs, last state and gradients, bit for bit)."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    tiles = tiles or Tiles()
    length = u.shape[-1]
    pad = _padding(length, tiles, delta_softplus, delta_bias)
    if pad:
        along = lambda t, value=0.0: t if t is None or t.dim() == 2 else F.pad(t, (0, pad), value=value)  # noqa: E731
        u, z, B, C = along(u), along(z), along(B), along(C)
        delta = along(delta, NO_STEP if delta_softplus else 0.0)
    result = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, tiles)
    if not pad:
        return result
    if return_last_state:
        return result[0][..., :length], result[1]
    return result[..., :length]
