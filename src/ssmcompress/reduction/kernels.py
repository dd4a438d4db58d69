"""Fused Triton kernels for the reduction's own work on a GPU: matching and merging without float32 copies of the
streams, without the similarity matrix in memory, and without asking the host for any width.

Each kernel is the fused form of pure-torch functions in `merge`, which stay the reference and the CPU path:

- `best_match` = merge.best_match (ToMe's matching step): for every source slot, the most cosine-similar
  destination slot and that similarity. One program takes a block of a row's sources and sweeps that row's
  destinations block by block, keeping a running maximum: the (sources x destinations) matrix never exists in
  memory, and the loop bounds are the row's counts, read on the device.
  Arithmetic: dot products of the stream's own values, accumulated in float32 (bf16/fp16 operands: exact
  products, float32 sums, as tensor cores compute them; float32 operands: IEEE products, no TF32), then divided
  by both norms max(|x|, 1e-12). The reference normalises first and multiplies unit vectors; the quantity is the
  same, the rounding is not: scores agree to a few float32 ulps times sqrt(d) (the tests hold 1e-6 at d <= 64).
  Ties: an exactly tied score goes to the lower destination slot, as the reference (first maximum, slot order).
  A near-tie, two destinations closer than that rounding difference, can go either way on the two paths.
- `average_gather` = merge.gather_slots(merge.average_into(...), source): the size-weighted average of every
  output slot with the slots merged into it, written straight into the compacted output. Arithmetic identical to
  average_into on the CPU: products w·x in float32, summed in slot order starting from the receiving slot's own
  term, one IEEE division, one rounding to the stream's dtype, no fused multiply-add; slots that receive nothing
  are copied exactly. So the kernel equals the reference bit for bit (values; an exact zero may differ in sign).
  torch's index_add on a GPU adds with atomics in no fixed order, so there the reference can differ by a rounding
  where a slot receives two or more tokens; the kernel's order is fixed.

Both kernels read only their own row: a row's result never depends on the other rows of its batch, nor on the
batch's widths.

Route: `fused(x)` says whether x goes through these kernels. ROUTE "auto" follows ssmcompress.compat (CUDA tensors
run Triton, except under `compat.reference_kernels()`, e.g. while fvcore traces); "fused" / "reference" force one
path (tests, checks). Kernels on CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 set before this module
is imported (tests/conftest.py does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from ssmcompress import compat

ROUTE = "auto"  # "auto" | "fused" | "reference"
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default, as the reference
ROUTES = ("auto", "fused", "reference")


def fused_on(device: torch.device) -> bool:
    """Whether tensors on `device` go through the fused kernels (see ROUTE)."""
    if ROUTE not in ROUTES:
        raise ValueError(f"kernels.ROUTE must be one of {', '.join(ROUTES)}, got {ROUTE!r}")
    if ROUTE == "auto":
        return compat._triton_runs_on(device)  # read at call time: compat.reference_kernels() rebinds it
    return ROUTE == "fused"


def fused(x: Tensor) -> bool:
    """Whether `x` goes through the fused kernels (see ROUTE)."""
    return fused_on(x.device)


# ---------------------------------------------------------------------------------------------- best match


@triton.jit
def _best_match_kernel(x_ptr, norm_ptr, src_ptr, src_count_ptr, dst_ptr, dst_count_ptr, partner_ptr, score_ptr,
                       n, d, stride_row, stride_slot,
                       WIDEN: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK_M
    src_count = tl.load(src_count_ptr + row)
    if first < src_count:
        dst_count = tl.load(dst_count_ptr + row)
        m = first + tl.arange(0, BLOCK_M)
        m_ok = m < src_count
        src = tl.load(src_ptr + row * n + m, mask=m_ok, other=0)
        src_norm = tl.load(norm_ptr + row * n + src, mask=m_ok, other=1.0)
        base = x_ptr + row * stride_row
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        column = tl.zeros((BLOCK_M,), tl.int64)  # loop-carried: one type throughout
        for start in range(0, dst_count, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < dst_count
            dst = tl.load(dst_ptr + row * n + j, mask=j_ok, other=0)
            dst_norm = tl.load(norm_ptr + row * n + dst, mask=j_ok, other=1.0)
            dot = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in range(0, d, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < d
                a = tl.load(base + src[:, None] * stride_slot + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)
                b = tl.load(base + dst[None, :] * stride_slot + k[:, None], mask=k_ok[:, None] & j_ok[None, :],
                            other=0.0)
                if WIDEN:  # the interpreter's dot: float32 operands (exact), as tensor cores multiply 16-bit ones
                    a, b = _widen(a, BF16), _widen(b, BF16)
                dot = tl.dot(a, b, dot, input_precision=PRECISION)
            similarity = tl.math.div_rn(tl.math.div_rn(dot, src_norm[:, None]), dst_norm[None, :])
            similarity = tl.where(j_ok[None, :], similarity, float("-inf"))
            tile_best = tl.max(similarity, axis=1)
            tile_column = (tl.argmax(similarity, axis=1, tie_break_left=True) + start).to(tl.int64)
            better = tile_best > best  # strict: an equal score in a later block keeps the lower slot
            column = tl.where(better, tile_column, column)
            best = tl.where(better, tile_best, best)
        found = m_ok & (best > float("-inf"))
        partner = tl.load(dst_ptr + row * n + column, mask=found, other=0)
        tl.store(partner_ptr + row * n + src, tl.where(found, partner, src), mask=m_ok)
        tl.store(score_ptr + row * n + src, best, mask=m_ok)


def best_match(metric: Tensor, src_index: Tensor, src_count: Tensor, dst_index: Tensor,
               dst_count: Tensor) -> tuple[Tensor, Tensor]:
    """merge.best_match on packed sets: `src_index` / `dst_index` (b, n) each row's source / destination slots
    first, in slot order (merge.pack at full width), `src_count` / `dst_count` (b,) how many. Returns (partner,
    score) (b, n) as merge.best_match does."""
    b, n, d = metric.shape
    x = metric if metric.stride(-1) == 1 else metric.contiguous()
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp(min=NORM_EPS)  # no float32 copy of x
    partner = torch.arange(n, device=x.device).repeat(b, 1)
    score = torch.full((b, n), float("-inf"), device=x.device)
    wide = x.dtype == torch.float32
    block_m, block_n, block_k, warps = (32, 32, 32, 4) if wide else (64, 128, 64, 4)
    if INTERPRETED:  # fewer, larger programs (the blocks only group the work: a row's scores do not depend on them)
        block_m = block_n = min(64, max(16, triton.next_power_of_2(n)))
    grid = (b, triton.cdiv(n, block_m))
    _launch(_best_match_kernel, grid, x, norm, src_index.contiguous(), src_count.contiguous(),
            dst_index.contiguous(), dst_count.contiguous(), partner, score, n, d, x.stride(0), x.stride(1),
            WIDEN=not wide and INTERPRETED, BF16=x.dtype == torch.bfloat16,
            PRECISION="ieee" if wide or INTERPRETED else "tf32",  # tf32: unused by 16-bit operands
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)
    return partner, score


# ---------------------------------------------------------------------------------------------- merging


@triton.jit
def _average_gather_kernel(x_ptr, out_ptr, source_ptr, weight_ptr, first_ptr, count_ptr, sender_ptr,
                           n, k, d, stride_row, stride_slot, BF16: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    outputs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    columns = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    out_ok = outputs < k
    ok = out_ok[:, None] & (columns < d)[None, :]
    slot = tl.load(source_ptr + row * k + outputs, mask=out_ok, other=0)
    base = x_ptr + row * stride_row + columns[None, :]
    own = tl.load(base + slot[:, None] * stride_slot, mask=ok, other=0.0)
    received = tl.load(count_ptr + row * n + slot, mask=out_ok, other=0)
    first = tl.load(first_ptr + row * n + slot, mask=out_ok, other=0)
    weight = tl.load(weight_ptr + row * n + slot, mask=out_ok, other=1.0)
    total = _widen(own, BF16) * weight[:, None]
    mass = weight
    for i in range(0, tl.max(received, axis=0)):  # each slot's senders, in slot order
        active = i < received
        sender = tl.load(sender_ptr + row * n + first + i, mask=active, other=0)
        sender_weight = tl.load(weight_ptr + row * n + sender, mask=active, other=0.0)
        value = tl.load(base + sender[:, None] * stride_slot, mask=ok & active[:, None], other=0.0)
        # rows without an i-th sender keep their sum as it is (adding a masked 0 would turn -0.0 into +0.0)
        total = tl.where(active[:, None], total + _widen(value, BF16) * sender_weight[:, None], total)
        mass = tl.where(active, mass + sender_weight, mass)
    average = tl.math.div_rn(total, mass[:, None])
    average = _to_bfloat16(average) if BF16 else average.to(own.dtype)
    result = tl.where((received > 0)[:, None], average, own)
    tl.store(out_ptr + (row * k + outputs[:, None]) * d + columns[None, :], result, mask=ok)


# bfloat16 <-> float32 in integer arithmetic, exactly as torch and the GPU convert: Triton's interpreter truncates
# instead of rounding to nearest even, and mangles subnormals, so its own conversions would fail the CPU tests


@triton.jit
def _widen(x, BF16: tl.constexpr):
    """x as float32 (exact)."""
    if BF16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _to_bfloat16(x):
    """float32 -> bfloat16, rounded to nearest even; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


def average_gather(x: Tensor, source: Tensor, target: Tensor, merged: Tensor, weights: Tensor) -> Tensor:
    """merge.gather_slots(merge.average_into(x, target, merged, weights), source) in one pass: (b, k, d) in x's
    dtype, for x (b, n, d), source (b, k), target / merged / weights (b, n)."""
    b, n, d = x.shape
    k = source.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # each slot's senders, grouped by receiver and in slot order within a group (a stable counting sort)
    receiver = torch.where(merged, target, n)
    senders = torch.sort(receiver, dim=1, stable=True).indices
    count = torch.zeros(b, n + 1, dtype=torch.int64, device=x.device).scatter_add_(
        1, receiver, torch.ones_like(receiver))[:, :n].contiguous()
    first = count.cumsum(1) - count
    out = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    if INTERPRETED:  # a program per row: the interpreter's cost is per operation, whatever the block
        block_r, block_d = triton.next_power_of_2(k), triton.next_power_of_2(d)
    else:
        block_r, block_d = 4, min(512, triton.next_power_of_2(d))
    grid = (b, triton.cdiv(k, block_r), triton.cdiv(d, block_d))
    _launch(_average_gather_kernel, grid, x, out, source.contiguous(), weights.float().contiguous(), first, count,
            senders, n, k, d, x.stride(0), x.stride(1), BF16=x.dtype == torch.bfloat16, BLOCK_R=block_r,
            BLOCK_D=block_d, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------- launching

# triton.jit decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET)
INTERPRETED = not isinstance(_best_match_kernel, JITFunction)


def _launch(kernel, grid, *args, **options):
    if not INTERPRETED and not args[0].is_cuda:
        raise RuntimeError("the fused reduction kernels need CUDA tensors; on a CPU use the reference path "
                           "(kernels.ROUTE = 'reference') or run Triton's interpreter (TRITON_INTERPRET=1 set before "
                           "triton is imported)")
    # products and sums rounded separately, as the references compute them (the compiler would fuse them to FMAs)
    kernel[grid](*args, **options, enable_fp_fusion=False)
