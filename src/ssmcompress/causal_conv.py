"""The short causal depthwise convolution of Mamba layers, with its SiLU, in one Triton kernel: what causal-conv1d's
`causal_conv1d_fn` computes, for a GPU where that package is not installed.

Written by hand because causal-conv1d ships as a CUDA extension built from source (a long compile per GPU
architecture) and neither mamba-ssm nor transformers has a Triton version: without it both run torch's conv1d
(cuDNN's depthwise kernel, about 9 % of a 2048-token forward of a Mamba-2 hybrid on a GPU) and then a separate
SiLU over the same tensor. The kernel reads the input once and writes the activated output once.

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W-1) + k])       (x = 0 before t = 0)

x: (batch, dim, length) in any strides (the models pass a transpose of a (batch, length, dim) tensor); weight
(dim, W); bias (dim,) or None; activation None, "silu" or "swish". Products and sums in float32 starting from the
bias, one rounding to x's dtype at the end; torch's conv rounds the same sum in its own order, so the two agree
within the dtype's rounding. The output has x's layout (a transpose of (batch, length, dim) stays one), so a caller
that transposes it back gets a contiguous tensor.

Route: mamba-ssm's Mamba modules and transformers' SSM modules call it through ssmcompress.compat, on CUDA tensors
only; CPU tensors run `causal_conv1d_reference`, the computation those modules do without causal-conv1d.
On CPU tensors the kernel itself needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                            seq_idx: Tensor | None = None) -> Tensor:
    """What mamba-ssm's and transformers' Mamba layers compute without causal-conv1d: torch's conv1d padded on both
    sides, cut to the first `length` outputs, then the activation."""
    _check(x, weight, activation, seq_idx)
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1,
                   groups=x.shape[1])[..., :x.shape[-1]]
    return (F.silu(out) if activation is not None else out).to(x.dtype)


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                     seq_idx: Tensor | None = None) -> Tensor:
    """The convolution (module docstring) in one Triton kernel; causal-conv1d's signature, without packed
    sequences (`seq_idx`)."""
    _check(x, weight, activation, seq_idx)
    if not INTERPRETED and not x.is_cuda:
        raise RuntimeError("the Triton causal conv needs CUDA tensors; on a CPU use causal_conv1d_reference or run "
                           "Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    batch, dim, length = x.shape
    out = torch.empty_like(x)  # x's strides: a transposed (batch, length, dim) input gives a transposed output
    block_l, block_d = (triton.next_power_of_2(length), triton.next_power_of_2(dim)) if INTERPRETED else (64, 128)
    grid = (batch, triton.cdiv(length, block_l), triton.cdiv(dim, block_d))
    _conv_kernel[grid](x, weight, bias if bias is not None else weight, out, dim, length,
                       *x.stride(), *weight.stride(), *out.stride(),
                       WIDTH=weight.shape[-1], HAS_BIAS=bias is not None, SILU=activation is not None,
                       BLOCK_L=block_l, BLOCK_D=block_d, num_warps=4)
    return out


def _check(x: Tensor, weight: Tensor, activation: str | None, seq_idx: Tensor | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if seq_idx is not None:
        raise NotImplementedError("packed sequences (seq_idx) need causal-conv1d's own kernel")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"x must be (batch, dim, length) and weight (dim, width), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")


@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, dim, length, s_xb, s_xd, s_xl, s_wd, s_wk, s_ob, s_od, s_ol,
                 WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = d < dim
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    x_row = x_ptr + row * s_xb + d[None, :] * s_xd
    for k in tl.static_range(WIDTH):
        source = t - (WIDTH - 1) + k
        valid = ((source >= 0) & (source < length))[:, None] & d_valid[None, :]
        x = tl.load(x_row + source[:, None] * s_xl, mask=valid, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d * s_wd + k * s_wk, mask=d_valid, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    out = out_ptr + row * s_ob + t[:, None] * s_ol + d[None, :] * s_od
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(t < length)[:, None] & d_valid[None, :])


# triton.jit decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET)
INTERPRETED = not isinstance(_conv_kernel, JITFunction)
