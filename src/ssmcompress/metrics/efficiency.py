"""Latency, throughput and peak memory of forwards on synthetic inputs (weights do not change these numbers).

Protocol, for every forward measured (dense, reduced and the ceiling, same process, same input):
- latency: `warmup` calls each, then `repeats` rounds that call the forwards in turn (dense, reduced, dense, ...)
  so that drift (clocks, other jobs) hits all alike; the median is reported. On a GPU each call is timed with a
  pair of CUDA events; on a CPU with `time.perf_counter` (CPU ops are synchronous).
- throughput: input tokens per second, batch x length / median latency.
- reduction overhead (reduced forward only): `repeats` extra calls with the reducer's stopwatch on, which sums the
  time inside its hooks (CUDA events in stream order, or perf_counter); reported in ms and as a share of the
  dense latency (the target: at most 2 %).
- peak memory, one extra call each: on a GPU torch.cuda's allocator statistics, reset before the call
  (`reset_peak_memory_stats`), as the peak (`max_memory_allocated`) and the peak minus what was allocated just
  before the call (the weights and the input: the forward's activation memory); on a CPU the
  process's peak resident set (VmHWM), reset before the call through /proc/self/clear_refs (Linux) after
  `malloc_trim` hands freed memory back, as the peak and the peak minus the resident set before the call.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import itertools
import re
import statistics
import time
from pathlib import Path

import torch

from ssmcompress import architecture, causal_conv, compat
from ssmcompress.metrics import capture as capture_lib
from ssmcompress.records import NOT_REPRESENTATIVE
from ssmcompress.reduction import kernels
from ssmcompress.timing import Stopwatch

MIB = 2 ** 20


def synthetic_batch(vocab_size: int, batch_size: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """Random token ids in [1, vocab_size) (0 is lm-eval's padding id), reproducible for a seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch_size, length), generator=generator).to(device)


def kernel_paths(model, info: dict, device: torch.device) -> dict:
    """The implementation each op of the forwards ran, as record keys: `scan_kernel`, `conv_kernel` and, on hybrids,
    `attention_kernel` (a pure-torch path on a GPU carries NOT_REPRESENTATIVE)."""
    paths = dict(scan_kernel=scan_kernel(info, device))
    if info.get("mamba_version") == 3:  # its decoding step has a kernel of its own (generation)
        paths["decode_kernel"] = ("pure-torch reference (CPU)" if device.type != "cuda" else
                                  "mamba-ssm CuTe Mamba-3 step" if compat.HAS_MAMBA3_STEP else
                                  f"pure-torch Mamba-3 step (no CuTe kernel): {NOT_REPRESENTATIVE}")
    if info.get("family") == "hf":
        paths.update(transformers_paths(model, info, device))
    elif device.type == "cuda":
        paths["conv_kernel"] = "causal-conv1d CUDA" if compat.HAS_CAUSAL_CONV1D else TRITON_CONV
    if device.type == "cuda" and info.get("family") != "hf" and architecture.attention_layers(info):
        paths["attention_kernel"] = ("flash-attn" if importlib.util.find_spec("flash_attn") else
                                     "torch SDPA (mamba-ssm's MHA without flash-attn)")
    return paths


def transformers_paths(model, info: dict, device: torch.device) -> dict:
    """Per op, what a transformers model's routed kernel functions ran on `device` (compat.route_transformers), and
    its attention implementation (`config._attn_implementation`)."""
    module = importlib.import_module(type(model).__module__)
    paths = {}
    for key, names in (("scan_kernel", ("mamba2_chunk_scan", "mamba_selective_scan")),
                       ("conv_kernel", ("causal_conv1d_fn",))):
        for name in names:
            found = compat.transformers_kernel(module, name)
            if found is not None:
                paths[key] = _describe(found, name, device)
                break
    paths["norm_kernel"] = norm_kernel(module, device)
    if architecture.attention_layers(info):
        implementation = getattr(model.config, "_attn_implementation", None) or "eager"
        paths["attention_kernel"] = ATTENTION.get(implementation, implementation) + (
            f": {NOT_REPRESENTATIVE}" if device.type == "cuda" and implementation == "eager" else "")
    return paths


def norm_kernel(module, device: torch.device) -> str:
    """What a transformers modeling module's RMSNorm modules run on `device` (compat.route_transformers: mamba-ssm's
    Triton norms for the two forms the SSM families share, transformers' code for any other)."""
    if device.type != "cuda":
        return "pure-torch reference (CPU)"
    norms = {name: getattr(cls.forward, "_ssmcompress_routed", False) for name, cls in vars(module).items()
             if isinstance(cls, type) and name.endswith(("RMSNorm", "RMSNormGated"))}
    routed, other = [n for n, r in norms.items() if r], [n for n, r in norms.items() if not r]
    if not routed:
        return "transformers' pure-torch RMSNorm"
    return "mamba-ssm Triton RMSNorm" + (f" ({', '.join(routed)}); transformers' pure torch ({', '.join(other)})"
                                         if other else "")


TRITON_CONV = "ssmcompress Triton causal conv (conv and SiLU in one kernel)"
ATTENTION = {"sdpa": "torch SDPA", "eager": "eager (pure-torch matmul and softmax)",
             "flash_attention_2": "flash-attn 2", "flash_attention_3": "flash-attn 3", "flex_attention": "torch flex"}


def _describe(found: tuple, name: str, device: torch.device) -> str:
    resolved, pure = found
    if device.type != "cuda":
        return "pure-torch reference (CPU)"
    if resolved.__module__ == causal_conv.__name__:
        return TRITON_CONV
    if resolved is pure:
        return f"transformers' pure-torch {name}: {NOT_REPRESENTATIVE}"
    return f"{resolved.__module__}.{resolved.__qualname__}"


def scan_kernel(info: dict, device: torch.device) -> str:
    """Which scan implementation the forwards ran (compat.py routes per device): latency means little without a
    kernel, e.g. Mamba-1 on mamba-ssm's reference scan runs a Python loop over tokens."""
    if device.type != "cuda":
        return "pure-torch reference (CPU)"
    if info.get("family") == "hf":
        return "transformers' own kernel choice (mamba-ssm's where it imports)"
    if info["mamba_version"] == 2:
        return "mamba-ssm Triton SSD"
    if info["mamba_version"] == 3 and "mimo_rank" not in info:
        return "mamba-ssm Triton Mamba-3 SISO"
    if info["mamba_version"] == 3:  # compat runs the pure-torch layer where TileLang is missing
        return ("mamba-ssm TileLang Mamba-3 MIMO" if compat.HAS_MAMBA3_MIMO else
                f"pure-torch Mamba-3 MIMO (no TileLang): {NOT_REPRESENTATIVE}")
    return {"cuda": "mamba-ssm CUDA selective scan",
            "triton": "ssmcompress Triton selective scan",
            "parallel": f"mambapy parallel scan (pure torch): {NOT_REPRESENTATIVE}",
            "ref": f"pure-torch reference selective scan: {NOT_REPRESENTATIVE}"}[compat.mamba1_scan(device)]


def reduction_kernels(device: torch.device) -> str:
    """Which path the reducer's matching and merging ran (kernels.ROUTE): a reduction overhead measured on a GPU
    through the pure-torch references is several times the fused kernels' (float32 copies, a similarity matrix)."""
    if kernels.fused_on(device):
        return "fused Triton kernels"
    return "pure-torch reference" + (f": {NOT_REPRESENTATIVE}" if device.type == "cuda" else " (CPU)")


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


# -------------------------------------------------------------------------------------------------- latency


def time_call(forward, input_ids: torch.Tensor) -> float:
    """Seconds one forward takes."""
    if input_ids.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward(input_ids)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    start = time.perf_counter()
    forward(input_ids)
    return time.perf_counter() - start


def median_ms(call, device, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `call()` over `repeats` calls after `warmup` ones, each timed as `time_call` times a
    forward on `device` (the GPU scripts' kernel timings). Gradients stay on, so `call` may run a backward."""
    like = torch.empty(0, device=device)
    for _ in range(warmup):
        call()
    return 1000 * statistics.median(time_call(lambda _: call(), like) for _ in range(repeats))


def time_forwards(forwards: dict, input_ids: torch.Tensor, warmup: int, repeats: int,
                  progress: bool = True) -> dict[str, list[float]]:
    """Per forward, the seconds of each of `repeats` calls, after `warmup` calls; calls interleaved."""
    from tqdm.auto import tqdm

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    times = {name: [] for name in forwards}
    with torch.no_grad():
        for forward in forwards.values():
            for _ in range(warmup):
                forward(input_ids)
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        for _ in tqdm(range(repeats), desc="latency", disable=not progress, leave=False):
            for name, forward in forwards.items():
                times[name].append(time_call(forward, input_ids))
    return times


# --------------------------------------------------------------------------------------------------- memory


def peak_memory(forward, input_ids: torch.Tensor, boundaries=()) -> dict | None:
    """Peak bytes during one forward and the bytes held just before it (None where it cannot be measured); on a GPU
    with `boundaries` (stage_peaks) also each stage's peak, `stages`, from the same call (the peak is their maximum)."""
    with torch.no_grad():
        if input_ids.is_cuda:
            device = input_ids.device
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            if boundaries:
                stages = stage_peaks(boundaries, forward, input_ids)
                return dict(peak=max(stages), before=before, stages=stages)
            torch.cuda.reset_peak_memory_stats(device)
            output = forward(input_ids)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            del output
            return dict(peak=peak, before=before)
        gc.collect()
        _malloc_trim()
        if not _reset_peak_rss():
            return None
        before = _status_kib("VmRSS") * 1024
        output = forward(input_ids)
        peak = _status_kib("VmHWM") * 1024
        del output
        return dict(peak=peak, before=before)


def stage_peaks(boundaries, forward, input_ids: torch.Tensor) -> list[float] | None:
    """Peak bytes allocated in each stage of one forward on a GPU (None elsewhere). `boundaries` are the modules
    whose start begins a new stage: with a model's blocks and its lm_head, stage 0 is the embedding, stage i + 1
    block i (with whatever a reducer does at its start) and the last the head (logits). Where a forward's peak
    arises says what a reduction can save: a peak in the blocks before the first reduction layer is the same for
    every budget. torch.cuda's allocator statistics, read and reset at each boundary by a pre-hook that runs
    before any other (a reducer's included)."""
    if not input_ids.is_cuda:
        return None
    device = input_ids.device
    return _stage_peaks(boundaries, forward, input_ids, lambda: torch.cuda.max_memory_allocated(device),
                        lambda: torch.cuda.reset_peak_memory_stats(device))


def _stage_peaks(boundaries, forward, input_ids, read_peak, reset_peak) -> list[float]:
    peaks = []

    def boundary(module, args):
        peaks.append(read_peak())
        reset_peak()

    hooks = [module.register_forward_pre_hook(boundary, prepend=True) for module in boundaries]
    try:
        with torch.no_grad():
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            reset_peak()
            output = forward(input_ids)
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            del output
            peaks.append(read_peak())
    finally:
        for hook in hooks:
            hook.remove()
    if len(peaks) != len(boundaries) + 1:
        raise RuntimeError(f"the forward started {len(peaks) - 1} stages for {len(boundaries)} boundary modules; "
                           "stage peaks need one pass through each")
    return peaks


def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset per call; activation = peak - allocated before the call"
    if _reset_peak_rss():
        return "peak resident set (VmHWM), reset per call; activation = peak - resident set before the call"
    return "unavailable (needs Linux /proc/self/clear_refs)"


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1))


def _reset_peak_rss() -> bool:
    """Linux resets the process's peak RSS when "5" is written to clear_refs; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    # glibc keeps freed heap pages resident; without this, memory freed by an earlier forward would count in the
    # next one's "before" and hide its peak
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------- overhead


def reduction_seconds(reducer, forward, input_ids: torch.Tensor, repeats: int) -> float:
    """Median seconds per reduced forward spent in the reduction's own work (importance, matching, merging,
    gathers, its bookkeeping), from the reducer's stopwatch over `repeats` extra calls (after the timed ones, so
    the latencies above are measured without it)."""
    per_call = []
    with torch.no_grad():
        for _ in range(repeats):
            reducer.stopwatch = Stopwatch()
            try:
                forward(input_ids)
                per_call.append(reducer.stopwatch.seconds())
            finally:
                reducer.stopwatch = None
    return statistics.median(per_call)


# ---------------------------------------------------------------------------------------------------- report


def measure(forwards: dict, input_ids: torch.Tensor, warmup: int, repeats: int, weights: int,
            progress: bool = True, stages=None, capture: bool = False, settle: dict | None = None) -> dict:
    """Flat numbers for the record: per forward `<name>_latency_ms`, `<name>_tokens_per_s`, `<name>_peak_mib`,
    `<name>_activation_mib`, on a GPU with `stages` (stage_peaks' boundaries) also `<name>_stage_peak_mib` (from
    the same call) and `<name>_peak_stage` (the stage where the peak arises: with the blocks and the lm_head as
    boundaries, 0 embedding, i + 1 block i, the last the head), and, with both `dense` and `reduced`, `speedup`
    and `peak_memory_saving`; with a `ceiling` forward too, `ceiling_speedup` (dense / ceiling) and `of_ceiling`
    (speedup / ceiling_speedup: the share of what the kernels allow at that schedule that the method keeps).
    `capture`: the latencies are those of CUDA graph replays (metrics.capture; `settle` as in capture.graph_all),
    named by `forward_path`; memory is measured on eager calls after the graphs are freed (a graph's pool would count
    in the next forward's "before")."""
    batch_size, length = input_ids.shape
    timed, paths = capture_lib.graph_all(forwards, input_ids, settle) if capture else (forwards, None)
    times = time_forwards(timed, input_ids, warmup, repeats, progress)
    del timed
    if capture and input_ids.is_cuda:
        gc.collect()
        torch.cuda.empty_cache()
    out = dict(device=str(input_ids.device), batch_size=batch_size, length=length, warmup=warmup, repeats=repeats,
               memory_measure=memory_measure(input_ids.device), weights_mib=weights / MIB,
               forward_path=forward_path(paths))
    if paths is not None:
        out["forward_paths"] = paths
    if input_ids.is_cuda:
        out["device_name"] = torch.cuda.get_device_name(input_ids.device)
    for name, forward in forwards.items():
        latency = statistics.median(times[name])
        out[f"{name}_latency_ms"] = latency * 1000
        out[f"{name}_tokens_per_s"] = batch_size * length / latency
    out.update(memory_report(forwards, input_ids, stages))
    if "dense" in forwards and "reduced" in forwards:
        out["speedup"] = out["dense_latency_ms"] / out["reduced_latency_ms"]
        if "ceiling" in forwards:
            out["ceiling_speedup"] = out["dense_latency_ms"] / out["ceiling_latency_ms"]
            out["of_ceiling"] = out["speedup"] / out["ceiling_speedup"]
    out["latencies_ms"] = {name: [t * 1000 for t in values] for name, values in times.items()}
    return out


def forward_path(paths: dict | None) -> str:
    """One line for the record: how every timed forward ran. Some captured and some not: the latencies compare a
    replay with eager launches, marked NOT_REPRESENTATIVE."""
    if paths is None:
        return capture_lib.EAGER
    if len(set(paths.values())) == 1:  # all captured, or none for the same reason (no GPU)
        return next(iter(paths.values()))
    if all(path != capture_lib.CUDA_GRAPH for path in paths.values()):
        return f"{capture_lib.EAGER} (no forward could be captured; see forward_paths)"
    eager = ", ".join(name for name, path in paths.items() if path != capture_lib.CUDA_GRAPH)
    return f"mixed (eager: {eager}; see forward_paths): {NOT_REPRESENTATIVE}"


def memory_report(forwards: dict, input_ids: torch.Tensor, stages=None) -> dict:
    """Per forward `<name>_peak_mib` and `<name>_activation_mib` (one call each), on a GPU with `stages` also
    `<name>_stage_peak_mib` and `<name>_peak_stage` (see `measure`); with `dense` and `reduced`,
    `peak_memory_saving` and `activation_memory_saving`. Empty where memory cannot be measured."""
    out = {}
    for name, forward in forwards.items():
        memory = peak_memory(forward, input_ids, stages or ())
        if memory is None:
            continue
        out[f"{name}_peak_mib"] = memory["peak"] / MIB
        out[f"{name}_activation_mib"] = (memory["peak"] - memory["before"]) / MIB
        if "stages" in memory:
            peaks = memory["stages"]
            out[f"{name}_stage_peak_mib"] = [peak / MIB for peak in peaks]
            out[f"{name}_peak_stage"] = max(range(len(peaks)), key=peaks.__getitem__)
    if "dense_peak_mib" in out and "reduced_peak_mib" in out:
        out["peak_memory_saving"] = 1 - out["reduced_peak_mib"] / out["dense_peak_mib"]
        if out["dense_activation_mib"] > 0:
            out["activation_memory_saving"] = 1 - out["reduced_activation_mib"] / out["dense_activation_mib"]
    return out
