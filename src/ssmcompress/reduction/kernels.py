"""Fused Triton kernels for the reduction's own work on a GPU: matching and merging without float32 copies of the
streams, without the similarity matrix in memory, and without asking the host for any width.

Each kernel is the fused form of pure-torch functions in `merge`, which stay the reference and the CPU path:

- `best_match` = merge.best_match (ToMe's matching step): for every source slot, the most cosine-similar
  destination slot and that similarity. One program takes a block of a row's sources and sweeps a span of that
  row's destinations tile by tile, keeping a running maximum: the (sources x destinations) matrix never exists in
  memory, and the loop bounds are the row's counts, read on the device. The spans (enough programs to fill the GPU
  at batch 1 too) meet in an atomic maximum of one integer per source holding the score's bits above its column's
  complement: the best score, the lowest column among equal ones, in whatever order the spans finish; the spans are
  whole tiles, so every score is rounded as in one sweep and the result does not depend on their number.
  Arithmetic: dot products of the stream's own values, accumulated in float32 (bf16/fp16 operands: exact
  products, float32 sums, as tensor cores compute them; float32 operands: IEEE products, no TF32); a source's
  destinations are ranked by the dot product times the reciprocal of the destination's norm max(|x|, 1e-12), and
  the best is divided by the source's norm at the end (a positive factor common to all of a source's candidates
  does not change their order). The reference normalises first and multiplies unit vectors; the quantity is the
  same, the rounding is not: scores agree to a few float32 ulps times sqrt(d) (the tests hold 1e-6 at d <= 64).
  Ties: an exactly tied score goes to the lower destination slot, as the reference (first maximum, slot order).
  A near-tie, two destinations closer than that rounding difference, can go either way on the two paths.
- `average_gather` = merge.gather_slots(merge.average_into(...), source): the size-weighted average of every
  output slot with the slots merged into it, written straight into the compacted output. Arithmetic identical to
  average_into on the CPU: products w·x in float32, summed in slot order starting from the receiving slot's own
  term, one IEEE division, one rounding to the stream's dtype, no fused multiply-add; slots that receive nothing
  are copied exactly. So the kernel equals the reference bit for bit (values; an exact zero may differ in sign),
  whatever its blocks, which are therefore tuned on the GPU at hand (triton.autotune, once per width and dtype).
  Its table of senders per receiver (`sender_groups`, a stable counting sort) is built once per reduction layer
  for both streams.
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

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from ssmcompress import compat

ROUTE = "auto"  # "auto" | "fused" | "reference"
NORM_EPS = 1e-12  # torch.nn.functional.normalize's default, as the reference
ROUTES = ("auto", "fused", "reference")
NO_MATCH = -(2 ** 63)  # a source's packed (score, column) before any destination is seen: below every real one
LOW_BITS = 2 ** 32 - 1  # the column's half of it (int64 arguments: literals this wide would be unsigned 32-bit)
PROGRAMS_PER_SM = 4  # best_match's programs with work per multiprocessor (see _splits)
ARRANGE_MAX = 16384  # the longest row `arrange` takes in one program


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
def _best_match_kernel(x_ptr, norm_ptr, src_ptr, src_count_ptr, dst_ptr, dst_count_ptr, key_ptr,
                       n, d, stride_row, stride_slot, splits, low_bits,
                       WIDEN: tl.constexpr, BF16: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * BLOCK_M
    src_count = tl.load(src_count_ptr + row)
    dst_count = tl.load(dst_count_ptr + row)
    # this program's destinations: a span of whole BLOCK_N tiles, so the tiles (and each score's rounding) are
    # those of a single sweep whatever the number of spans
    span = tl.cdiv(tl.cdiv(dst_count, splits), BLOCK_N) * BLOCK_N
    lo = tl.program_id(2) * span
    hi = tl.minimum(lo + span, dst_count)
    if (first < src_count) & (lo < hi):
        m = first + tl.arange(0, BLOCK_M)
        m_ok = m < src_count
        src = tl.load(src_ptr + row * n + m, mask=m_ok, other=0)
        base = x_ptr + row * stride_row
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        column = tl.zeros((BLOCK_M,), tl.int64)  # loop-carried: one type throughout
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < hi
            dst = tl.load(dst_ptr + row * n + j, mask=j_ok, other=0)
            dst_scale = tl.math.div_rn(1.0, tl.load(norm_ptr + row * n + dst, mask=j_ok, other=1.0))
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
            # ranked without the source's norm, a positive factor common to all of a source's candidates (applied to
            # the best one at the end): one product per candidate in place of two IEEE divisions
            similarity = dot * dst_scale[None, :]
            # a NaN (from a non-finite stream) is no candidate; -0.0 and +0.0 are one score
            similarity = tl.where(similarity == 0.0, 0.0, similarity)
            similarity = tl.where(j_ok[None, :] & (similarity == similarity), similarity, float("-inf"))
            tile_best = tl.max(similarity, axis=1)
            tile_column = (tl.argmax(similarity, axis=1, tie_break_left=True) + start).to(tl.int64)
            better = tile_best > best  # strict: an equal score in a later tile keeps the lower slot
            column = tl.where(better, tile_column, column)
            best = tl.where(better, tile_best, best)
        # the spans' results meet in one integer per source: its score's bits, ordered as the floats are, above
        # the complement of its column, so the largest integer is the best score and, among equal scores, the lowest
        # column: the same choice as one sweep, in whatever order the spans finish
        key = (_float_order(best.to(tl.int32, bitcast=True)).to(tl.int64) << 32) | (low_bits - column)
        tl.atomic_max(key_ptr + row * n + src, key, mask=m_ok & (best > float("-inf")))


@triton.jit
def _best_match_finish_kernel(key_ptr, norm_ptr, dst_ptr, partner_ptr, score_ptr, n, no_match, low_bits,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = slot < n
    key = tl.load(key_ptr + row * n + slot, mask=ok, other=no_match)
    found = key != no_match
    scaled = _float_order((key >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    score = tl.math.div_rn(scaled, tl.load(norm_ptr + row * n + slot, mask=ok & found, other=1.0))
    column = low_bits - (key & low_bits)
    partner = tl.load(dst_ptr + row * n + column, mask=ok & found, other=0)
    tl.store(partner_ptr + row * n + slot, tl.where(found, partner, slot), mask=ok)
    tl.store(score_ptr + row * n + slot, tl.where(found, score, float("-inf")), mask=ok)


@triton.jit
def _float_order(bits):
    """A float32's bits (as int32) <-> an int32 ordered as the floats are (negative floats' magnitude bits
    flipped); its own inverse."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def best_match(metric: Tensor, src_index: Tensor, src_count: Tensor, dst_index: Tensor,
               dst_count: Tensor, splits: int | None = None) -> tuple[Tensor, Tensor]:
    """merge.best_match on packed sets: `src_index` / `dst_index` (b, n) each row's source / destination slots
    first, in slot order (merge.pack at full width), `src_count` / `dst_count` (b,) how many. Returns (partner,
    score) (b, n) as merge.best_match does. `splits`: spans each row's destinations are cut into, each swept by its
    own programs (default: enough programs to fill the GPU; the result does not depend on it)."""
    b, n, d = metric.shape
    x = metric if metric.stride(-1) == 1 else metric.contiguous()
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp(min=NORM_EPS)  # no float32 copy of x
    dst_index = dst_index.contiguous()
    key = torch.full((b, n), NO_MATCH, dtype=torch.int64, device=x.device)
    partner = torch.empty(b, n, dtype=torch.int64, device=x.device)
    score = torch.empty(b, n, dtype=torch.float32, device=x.device)
    wide = x.dtype == torch.float32
    block_m, block_n, block_k, warps = (32, 32, 32, 4) if wide else (64, 128, 64, 4)
    if INTERPRETED:  # fewer, larger programs (the blocks only group the work: a row's scores do not depend on them)
        block_m = block_n = min(64, max(16, triton.next_power_of_2(n)))
    if splits is None:
        splits = 2 if INTERPRETED else _splits(x.device, b * triton.cdiv(n, 2 * block_m), triton.cdiv(n, 2 * block_n))
    grid = (b, triton.cdiv(n, block_m), splits)
    _launch(_best_match_kernel, grid, x, norm, src_index.contiguous(), src_count.contiguous(),
            dst_index, dst_count.contiguous(), key, n, d, x.stride(0), x.stride(1), splits, LOW_BITS,
            WIDEN=not wide and INTERPRETED, BF16=x.dtype == torch.bfloat16,
            PRECISION="ieee" if wide or INTERPRETED else "tf32",  # tf32: unused by 16-bit operands
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)
    block = n if INTERPRETED else 1024
    _launch(_best_match_finish_kernel, (b, triton.cdiv(n, block)), key, norm, dst_index, partner, score, n,
            NO_MATCH, LOW_BITS, BLOCK=triton.next_power_of_2(block))
    return partner, score


def _splits(device: torch.device, programs: int, most: int) -> int:
    """Destination spans per row so that about PROGRAMS_PER_SM programs with sources to match run on every
    multiprocessor: a batch of one row of 2048 tokens has 16 blocks of sources, a fraction of a large GPU's
    multiprocessors, and one sweep each would leave the rest idle. At most `most`, one tile each."""
    units = _multiprocessors(torch.cuda.current_device() if device.index is None else device.index)
    return max(1, min(most, triton.cdiv(PROGRAMS_PER_SM * units, max(programs, 1))))


@lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---------------------------------------------------------------------------------------------- merging


@triton.jit
def _average_gather_kernel(x_ptr, out_ptr, source_ptr, weight_ptr, merged_ptr, first_ptr, count_ptr, sender_ptr,
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
    listed = tl.load(count_ptr + row * n + slot, mask=out_ok, other=0)
    first = tl.load(first_ptr + row * n + slot, mask=out_ok, other=0)
    weight = tl.load(weight_ptr + row * n + slot, mask=out_ok, other=1.0)
    total = _widen(own, BF16) * weight[:, None]
    mass = weight
    received = tl.zeros((BLOCK_R,), tl.int1)
    for i in range(0, tl.max(listed, axis=0)):  # each slot's senders, in slot order
        sender = tl.load(sender_ptr + row * n + first + i, mask=i < listed, other=0)
        # the senders are those of both streams: this stream averages in the ones it merges
        active = (i < listed) & (tl.load(merged_ptr + row * n + sender, mask=i < listed, other=0) != 0)
        sender_weight = tl.load(weight_ptr + row * n + sender, mask=active, other=0.0)
        value = tl.load(base + sender[:, None] * stride_slot, mask=ok & active[:, None], other=0.0)
        # rows without an i-th sender keep their sum as it is (adding a masked 0 would turn -0.0 into +0.0)
        total = tl.where(active[:, None], total + _widen(value, BF16) * sender_weight[:, None], total)
        mass = tl.where(active, mass + sender_weight, mass)
        received = received | active
    average = tl.math.div_rn(total, mass[:, None])
    average = _to_bfloat16(average) if BF16 else average.to(own.dtype)
    result = tl.where(received[:, None], average, own)
    tl.store(out_ptr + (row * k + outputs[:, None]) * d + columns[None, :], result, mask=ok)


# ---------------------------------------------------------------------------------------------- arranging


@triton.jit
def _arrange_kernel(first_ptr, second_ptr, out_ptr, n, width, HAS_SECOND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, BLOCK)
    ok = slot < n
    first = tl.load(first_ptr + row * n + slot, mask=ok, other=0).to(tl.int32)
    before_first = tl.cumsum(first, 0) - first
    first_count = tl.sum(first, 0)
    if HAS_SECOND:
        second = tl.load(second_ptr + row * n + slot, mask=ok, other=0).to(tl.int32)
        before_second = tl.cumsum(second, 0) - second
        rest = first_count + tl.sum(second, 0) + slot - before_first - before_second
        place = tl.where(first != 0, before_first, tl.where(second != 0, first_count + before_second, rest))
    else:
        place = tl.where(first != 0, before_first, first_count + slot - before_first)
    tl.store(out_ptr + row * width + place, slot.to(tl.int64), mask=ok & (place < width))


def arrange(first: Tensor, second: Tensor | None, width: int) -> Tensor:
    """merge.arrange's permutation, its first `width` places, in one program per row (rows of at most ARRANGE_MAX
    slots): the running counts of the groups in registers, where the pure-torch form takes a dozen launches."""
    b, n = first.shape
    out = torch.empty(b, width, dtype=torch.int64, device=first.device)
    block = triton.next_power_of_2(n)
    _launch(_arrange_kernel, (b,), first.contiguous(), (first if second is None else second).contiguous(), out, n,
            width, HAS_SECOND=second is not None, BLOCK=block,
            num_warps=min(16, max(4, block // 512)))  # a few dozen slots per thread, whatever the row's length
    return out


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


def sender_groups(target: Tensor, merged: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each slot's senders (the slots merged into it), grouped by receiver and in slot order within a group (a
    stable counting sort): (senders, first, count), (b, n) each: the senders in that order, and per slot where its
    group starts and how long it is. One table serves both streams: pass the union of their merged slots."""
    b, n = target.shape
    receiver = torch.where(merged, target, n)
    senders = torch.sort(receiver.to(torch.int32), dim=1, stable=True).indices  # 32-bit keys: half the passes
    count = torch.zeros(b, n + 1, dtype=torch.int64, device=target.device).scatter_add_(
        1, receiver, torch.ones_like(receiver))[:, :n].contiguous()
    return senders, count.cumsum(1) - count, count


def average_gather(x: Tensor, source: Tensor, target: Tensor, merged: Tensor, weights: Tensor,
                   groups: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """merge.gather_slots(merge.average_into(x, target, merged, weights), source) in one pass: (b, k, d) in x's
    dtype, for x (b, n, d), source (b, k), target / merged / weights (b, n). `groups`: sender_groups of these
    merged slots or of a superset of them (the other stream's too), else built here."""
    b, n, d = x.shape
    k = source.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    senders, first, count = sender_groups(target, merged) if groups is None else groups
    out = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    args = (x, out, source.contiguous(), weights.float().contiguous(), merged.contiguous(), first, count, senders,
            n, k, d, x.stride(0), x.stride(1))
    if INTERPRETED:  # a program per row: the interpreter's cost is per operation, whatever the block
        block_r, block_d = triton.next_power_of_2(k), triton.next_power_of_2(d)
        _launch(_average_gather_kernel, (b, triton.cdiv(k, block_r), triton.cdiv(d, block_d)), *args,
                BF16=x.dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    else:  # blocks tuned per width and dtype on the GPU at hand: they group the work, the values do not depend on them
        grid = lambda meta: (b, triton.cdiv(k, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
        _launch(_AVERAGE_GATHER_TUNED, grid, *args, BF16=x.dtype == torch.bfloat16)
    return out


# ---------------------------------------------------------------------------------------------- launching

# triton.jit decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET)
INTERPRETED = not isinstance(_best_match_kernel, JITFunction)
# average_gather's blocks, timed once per (d, dtypes) on the GPU (triton.autotune): rows per program x columns
_AVERAGE_GATHER_TUNED = _average_gather_kernel if INTERPRETED else triton.autotune(
    [triton.Config({"BLOCK_R": rows, "BLOCK_D": columns}, num_warps=warps)
     for rows, columns, warps in ((4, 512, 4), (8, 256, 4), (16, 128, 4), (2, 1024, 4), (8, 512, 8), (16, 256, 8),
                                  (32, 128, 8))], key=["d"])(_average_gather_kernel)


def _launch(kernel, grid, *args, **options):
    if not INTERPRETED and not args[0].is_cuda:
        raise RuntimeError("the fused reduction kernels need CUDA tensors; on a CPU use the reference path "
                           "(kernels.ROUTE = 'reference') or run Triton's interpreter (TRITON_INTERPRET=1 set before "
                           "triton is imported)")
    # products and sums rounded separately, as the references compute them (the compiler would fuse them to FMAs)
    kernel[grid](*args, **options, enable_fp_fusion=False)
