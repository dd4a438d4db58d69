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
- `merge_stream` = merge.merge_stream (merge.average_into, merge.carry_sizes and the gathers of both at the output
  slots): the size-weighted average of every output slot with the slots merged into it and its carried size,
  written straight into the compacted output. Arithmetic identical to average_into on the CPU: products w·x in
  float32, summed in slot order starting from the receiving slot's own term, one IEEE division, one rounding to the
  stream's dtype, no fused multiply-add; slots that receive nothing are copied exactly; sizes summed in the same
  order. So the kernel equals the reference bit for bit (values; an exact zero may differ in sign), whatever its
  blocks, which are therefore tuned on the GPU at hand (triton.autotune, once per width and dtype). Its table of
  senders per receiver (`sender_groups`, a sort of (receiver, slot) keys in one program per row) is built once per
  reduction layer for both streams. With nothing merged (pruning) it is the gather of the kept slots alone.
  torch's index_add on a GPU adds with atomics in no fixed order, so there the reference can differ by a rounding
  where a slot receives two or more tokens; the kernel's order is fixed.
- `select` = merge.lowest / merge.highest: the count-th key found by bisection over the keys' order in one program
  per row, the tied slots at it taken in slot order: the stable sort's selection without sorting.
- `arrange` = merge.arrange (pack, compact): the ordering of slots by group from running counts, one program per row.
- `importance` = patch.importance_of (clip, l1): the mean of max(y, 0) or |y| without a clamped copy of y.

Every kernel reads only its own row: a row's result never depends on the other rows of its batch, nor on the
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
ARRANGE_MAX = 16384  # the longest row the one-program-per-row kernels (arrange, select, sender_groups) take


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


def fused_per_row(x: Tensor) -> bool:
    """Whether `x` (b, n) goes through the kernels that hold a whole row in one program: fused, n <= ARRANGE_MAX."""
    return fused(x) and x.shape[-1] <= ARRANGE_MAX


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
def _merge_stream_kernel(x_ptr, out_ptr, sizes_ptr, out_sizes_ptr, source_ptr, weight_ptr, merged_ptr, first_ptr,
                         count_ptr, sender_ptr, n, k, d, stride_row, stride_slot, MERGES: tl.constexpr,
                         BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    outputs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    columns = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    out_ok = outputs < k
    ok = out_ok[:, None] & (columns < d)[None, :]
    # the sizes: once per output slot, by its first block of columns
    sizes_ok = out_ok & (tl.zeros_like(outputs) + tl.program_id(2) == 0)
    slot = tl.load(source_ptr + row * k + outputs, mask=out_ok, other=0)
    base = x_ptr + row * stride_row + columns[None, :]
    own = tl.load(base + slot[:, None] * stride_slot, mask=ok, other=0.0)
    own_size = tl.load(sizes_ptr + row * n + slot, mask=sizes_ok, other=0.0)
    if MERGES:
        listed = tl.load(count_ptr + row * n + slot, mask=out_ok, other=0)
        first = tl.load(first_ptr + row * n + slot, mask=out_ok, other=0)
        weight = tl.load(weight_ptr + row * n + slot, mask=out_ok, other=1.0)
        # carried sizes as merge.carry_sizes: a merged slot's own size moves out of it (sizes - sizes · merged)
        own_merged = tl.load(merged_ptr + row * n + slot, mask=sizes_ok, other=0) != 0
        size = tl.where(own_merged, own_size - own_size, own_size)
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
            sender_size = tl.load(sizes_ptr + row * n + sender, mask=active & sizes_ok, other=0.0)
            size = tl.where(active, size + sender_size, size)
        average = tl.math.div_rn(total, mass[:, None])
        average = _to_bfloat16(average) if BF16 else average.to(own.dtype)
        own = tl.where(received[:, None], average, own)
        own_size = size
    tl.store(out_ptr + (row * k + outputs[:, None]) * d + columns[None, :], own, mask=ok)
    tl.store(out_sizes_ptr + row * k + outputs, own_size, mask=sizes_ok)


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
    _launch(_arrange_kernel, (b,), first.contiguous(), (first if second is None else second).contiguous(), out, n,
            width, HAS_SECOND=second is not None, **_row_program(n))
    return out


def _row_program(n: int) -> dict:
    """The block and warps of a program that holds a row of n slots: a few dozen slots per thread, whatever n."""
    block = triton.next_power_of_2(n)
    return dict(BLOCK=block, num_warps=min(16, max(4, block // 512)))


@triton.jit
def _row_flags(flags_ptr, row, n, slot, ok):
    """A row's boolean mask, False beyond its n slots."""
    return ok & (tl.load(flags_ptr + row * n + slot, mask=ok, other=0) != 0)


# ---------------------------------------------------------------------------------------------- importance


@triton.jit
def _importance_kernel(y_ptr, out_ptr, rows, d, stride_row, CLIP: tl.constexpr, ABS: tl.constexpr,
                       BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    total = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for k0 in range(0, d, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        value = _widen(tl.load(y_ptr + r[:, None] * stride_row + k[None, :], mask=r_ok[:, None] & (k < d)[None, :],
                               other=0.0), BF16)
        if CLIP:  # max(y, 0) that keeps a NaN, as torch.clamp does (the finiteness check must see it)
            value = tl.where(value < 0.0, 0.0, value)
        if ABS:
            value = tl.abs(value)
        total += value
    tl.store(out_ptr + r, tl.math.div_rn(tl.sum(total, axis=1), d.to(tl.float32)), mask=r_ok)


def importance(y: Tensor, metric: str) -> Tensor:
    """patch.importance_of for `clip` and `l1` (`raw` too, though torch's mean reads y once already): the mean over
    the last dim of max(y, 0), |y| or y, in float32, in one read of y (torch's clamp / abs would first write a copy of it: at 2.7b and 8 x 2048 tokens, 168 MB per
    reduction layer). The same quantity summed in another order: within a few float32 ulps of torch's."""
    d = y.shape[-1]
    flat = y.reshape(-1, d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    out = torch.empty(y.shape[:-1], dtype=torch.float32, device=y.device)
    block_r, block_d = (triton.next_power_of_2(max(rows, 1)), triton.next_power_of_2(d)) if INTERPRETED else (4, 512)
    _launch(_importance_kernel, (triton.cdiv(rows, block_r),), flat, out, rows, d, flat.stride(0),
            CLIP=metric == "clip", ABS=metric == "l1", BF16=y.dtype == torch.bfloat16, BLOCK_R=block_r,
            BLOCK_D=block_d, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------- selecting


@triton.jit
def _select_kernel(key_ptr, eligible_ptr, count_ptr, out_ptr, n, lowest_key, highest_key, LARGEST: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, BLOCK)
    ok = slot < n
    eligible = _row_flags(eligible_ptr, row, n, slot, ok)
    key = tl.load(key_ptr + row * n + slot, mask=ok, other=0.0)
    # ordered as a stable sort compares them: -0.0 and +0.0 equal, every NaN above +inf
    key = tl.where(key == 0.0, 0.0, key)
    bits = tl.where(key != key, 0x7FC00000, key.to(tl.int32, bitcast=True))
    order = _float_order(bits)
    if LARGEST:  # the largest keys first: the reversed order (~x reverses int32 order exactly)
        order = ~order
    order = order.to(tl.int64)
    count = tl.load(count_ptr + row)
    # the count-th smallest key among the eligible ones: the least value with at least `count` keys at or below it,
    # by bisection over the keys' range (at most 32 halvings, each one count over the row in registers)
    lo = tl.min(tl.where(eligible, order, highest_key), 0)
    hi = tl.max(tl.where(eligible, order, lowest_key), 0)
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if tl.sum((eligible & (order <= mid)).to(tl.int32), 0) >= count:
            hi = mid
        else:
            lo = mid + 1
    below = eligible & (order < lo)
    tied = (eligible & (order == lo)).to(tl.int32)
    need = count - tl.sum(below.to(tl.int32), 0)  # of the keys equal to the threshold, the first `need` in slot order
    chosen = below | ((tied != 0) & (tl.cumsum(tied, 0) - tied < need))
    tl.store(out_ptr + row * n + slot, chosen.to(tl.int8), mask=ok)


def select(key: Tensor, count: Tensor, eligible: Tensor, largest: bool) -> Tensor:
    """merge.lowest (largest=False) / merge.highest (True) in one program per row (rows of at most ARRANGE_MAX
    slots): the `count[row]` eligible slots with the smallest / largest float32 key, ties to the lower slot, the
    same selection as the stable sort there (-0.0 equals +0.0, NaN ranks above +inf) without sorting: the count-th
    key is found by bisection over the keys' order and the tied slots at it are taken in slot order."""
    b, n = key.shape
    out = torch.empty(b, n, dtype=torch.int8, device=key.device)
    _launch(_select_kernel, (b,), key.float().contiguous(), eligible.contiguous(), count.contiguous(), out, n,
            -(2 ** 31), 2 ** 31 - 1, LARGEST=largest, **_row_program(n))
    return out.view(torch.bool)


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


@triton.jit
def _sender_groups_kernel(target_ptr, merged_ptr, senders_ptr, first_ptr, count_ptr, n, low_bits,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, BLOCK)
    ok = slot < n
    merged = _row_flags(merged_ptr, row, n, slot, ok)
    target = tl.load(target_ptr + row * n + slot, mask=ok, other=0)
    # senders grouped by receiver, in slot order within a group: one sort of (receiver, slot) keys; the slots that
    # send nothing (receiver n) and the block's spare lanes come after every sender
    receiver = tl.where(merged, target, n).to(tl.int64)
    ordered = tl.sort((receiver << 32) | slot.to(tl.int64))
    tl.store(senders_ptr + row * n + slot, ordered & low_bits, mask=ok)
    # each receiver's number of senders: a histogram over the lanes, where a slot that sends nothing is counted at
    # its own lane and taken off again (no lane is out of range, whatever n)
    count = tl.histogram(tl.where(merged, target, slot).to(tl.int32), BLOCK) - (~merged).to(tl.int32)
    tl.store(count_ptr + row * n + slot, count.to(tl.int64), mask=ok)
    tl.store(first_ptr + row * n + slot, (tl.cumsum(count, 0) - count).to(tl.int64), mask=ok)


def sender_groups(target: Tensor, merged: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each slot's senders (the slots merged into it), grouped by receiver and in slot order within a group:
    (senders, first, count), (b, n) each: the senders in that order (then the other slots), and per slot where its
    group starts and how long it is. One table serves both streams: pass the union of their merged slots. One
    program per row (rows of at most ARRANGE_MAX slots), else a stable sort and a count in torch."""
    b, n = target.shape
    if n > ARRANGE_MAX:
        receiver = torch.where(merged, target, n)
        senders = torch.sort(receiver.to(torch.int32), dim=1, stable=True).indices  # 32-bit keys: half the passes
        count = torch.zeros(b, n + 1, dtype=torch.int64, device=target.device).scatter_add_(
            1, receiver, torch.ones_like(receiver))[:, :n].contiguous()
        return senders, count.cumsum(1) - count, count
    senders, first, count = (torch.empty(b, n, dtype=torch.int64, device=target.device) for _ in range(3))
    _launch(_sender_groups_kernel, (b,), target.contiguous(), merged.contiguous(), senders, first, count, n, LOW_BITS,
            **_row_program(n))
    return senders, first, count


def merge_stream(x: Tensor, sizes: Tensor, source: Tensor, target: Tensor | None = None,
                 merged: Tensor | None = None, weights: Tensor | None = None,
                 groups: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """merge.merge_stream in one pass: the output slots `source` (b, k) of a stream x (b, n, d) after merging, in
    x's dtype, and of its float32 sizes (b, n) carried; target / merged / weights (b, n) as merge.average_into, or
    None: nothing is merged (a gather). `groups`: sender_groups of these merged slots or of a superset of them (the
    other stream's too), else built here."""
    b, n, d = x.shape
    k = source.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    out_sizes = torch.empty(b, k, dtype=torch.float32, device=x.device)
    merges = merged is not None
    if merges:
        senders, first, count = sender_groups(target, merged) if groups is None else groups
        weights, merged = weights.float().contiguous(), merged.contiguous()
    else:  # never read
        senders = first = count = weights = merged = source
    args = (x, out, sizes.float().contiguous(), out_sizes, source.contiguous(), weights, merged, first, count, senders,
            n, k, d, x.stride(0), x.stride(1))
    if INTERPRETED:  # a program per row: the interpreter's cost is per operation, whatever the block
        block_r, block_d = triton.next_power_of_2(k), triton.next_power_of_2(d)
        _launch(_merge_stream_kernel, (b, triton.cdiv(k, block_r), triton.cdiv(d, block_d)), *args, MERGES=merges,
                BF16=x.dtype == torch.bfloat16, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    else:  # blocks tuned per width and dtype on the GPU at hand: they group the work, the values do not depend on them
        grid = lambda meta: (b, triton.cdiv(k, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
        _launch(_MERGE_STREAM_TUNED, grid, *args, MERGES=merges, BF16=x.dtype == torch.bfloat16)
    return out, out_sizes


# ---------------------------------------------------------------------------------------------- launching

# triton.jit decides at decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET)
INTERPRETED = not isinstance(_best_match_kernel, JITFunction)
# merge_stream's blocks, timed once per (d, dtypes) on the GPU (triton.autotune): rows per program x columns
_MERGE_STREAM_TUNED = _merge_stream_kernel if INTERPRETED else triton.autotune(
    [triton.Config({"BLOCK_R": rows, "BLOCK_D": columns}, num_warps=warps)
     for rows, columns, warps in ((4, 512, 4), (8, 256, 4), (16, 128, 4), (2, 1024, 4), (8, 512, 8), (16, 256, 8),
                                  (32, 128, 8))], key=["d"])(_merge_stream_kernel)


def _launch(kernel, grid, *args, **options):
    if not INTERPRETED and not args[0].is_cuda:
        raise RuntimeError("the fused reduction kernels need CUDA tensors; on a CPU use the reference path "
                           "(kernels.ROUTE = 'reference') or run Triton's interpreter (TRITON_INTERPRET=1 set before "
                           "triton is imported)")
    # products and sums rounded separately, as the references compute them (the compiler would fuse them to FMAs)
    kernel[grid](*args, **options, enable_fp_fusion=False)
