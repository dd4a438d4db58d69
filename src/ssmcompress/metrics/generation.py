"""Generation speed and memory (benchmark=generation), as the paper measures efficiency: `batch_size` prompts of
`length` tokens, `new_tokens` generated after each (ssmcompress.generation: the prompt prefilled, reduced or not,
then the host's decoding from the cached states, with CUDA graphs on a GPU: mamba-ssm's captured steps,
transformers' static-cache steps compiled by its generate).

Measured in one process, dense, reduced and the ceiling (the prefill cut to the budget's counts, no decision)
interleaved as `efficiency.measure` does (warm-up, then `repeats` rounds in turn, medians; CUDA events on a GPU):
- prefill: the prompt's forward that fills the inference cache (logits of the last position only);
- generation: prefill + decoding, end to end; decode per token = (generation - prefill) / new_tokens;
- generated tokens/s = batch x new_tokens / generation time;
- peak memory of one generation: torch.cuda's allocator peak (reset before it), and that peak minus the weights;
- KV cache: the bytes of the attention layers' keys and values after the prefill (0 on a pure SSM, whose cached
  states do not grow with the prompt); with `expected_kv_saving` (the share of the attention layers' tokens the
  schedule removes) the record holds what the cache should save beside what it did.
The bound a reduction can reach: on a pure SSM, dense generation / (ceiling prefill + dense decoding), since decoding
from a cached state costs the same whatever the prompt's length; on a hybrid, whose attention layers decode over the
keys the prefill cached, dense generation / the ceiling's generation (its prefill, then decoding at its shorter
cache). `prefill_bound` is the former on both. No method exceeds its bound by more than noise.
"""
from __future__ import annotations

import statistics

import torch

from ssmcompress import generation
from ssmcompress.metrics import efficiency

MIB = efficiency.MIB


def measure(model, reducers: dict, input_ids: torch.Tensor, new_tokens: int, warmup: int, repeats: int,
            weights: int, progress: bool = True, expected_kv_saving: float | None = None) -> dict:
    """Flat numbers for the record, per variant of `reducers` ({"dense": None, "reduced": reducer, ...}):
    `<name>_prefill_ms`, `<name>_generation_ms`, `<name>_decode_ms_per_token`, `<name>_tokens_per_s`,
    `<name>_peak_mib`, `<name>_activation_mib`; with dense and reduced also `speedup`, `prefill_speedup` and, with
    a ceiling, the prefill-only `bound` and `of_bound` = speedup / bound."""
    batch_size, length = input_ids.shape
    calls = {}
    for name, reducer in reducers.items():
        calls[f"{name}_prefill"] = lambda ids, r=reducer: generation.prefill(model, ids, r)
        # CUDA-graph decoding on a GPU, on every host (transformers: its compiled static-cache steps)
        calls[f"{name}_generation"] = lambda ids, r=reducer: generation.generate(model, ids, new_tokens, r,
                                                                                 cg=ids.is_cuda)
    times = efficiency.time_forwards(calls, input_ids, warmup, repeats, progress)
    out = dict(device=str(input_ids.device), batch_size=batch_size, length=length, new_tokens=new_tokens,
               warmup=warmup, repeats=repeats, cuda_graphs=input_ids.is_cuda,
               weights_mib=weights / MIB,
               memory_measure=efficiency.memory_measure(input_ids.device))
    if input_ids.is_cuda:
        out["device_name"] = torch.cuda.get_device_name(input_ids.device)
    for name in reducers:
        pre, total = (statistics.median(times[f"{name}_{part}"]) for part in ("prefill", "generation"))
        out.update({f"{name}_prefill_ms": 1000 * pre, f"{name}_generation_ms": 1000 * total,
                    f"{name}_decode_ms_per_token": 1000 * (total - pre) / new_tokens,
                    f"{name}_tokens_per_s": batch_size * new_tokens / total})
        out[f"{name}_kv_cache_mib"] = generation.prefill_kv_cache_bytes(model, input_ids, reducers[name]) / MIB
        memory = efficiency.peak_memory(calls[f"{name}_generation"], input_ids)
        if memory is not None:
            out[f"{name}_peak_mib"] = memory["peak"] / MIB
            out[f"{name}_activation_mib"] = (memory["peak"] - weights) / MIB
    if "reduced" in reducers:
        out["speedup"] = out["dense_generation_ms"] / out["reduced_generation_ms"]
        out["prefill_speedup"] = out["dense_prefill_ms"] / out["reduced_prefill_ms"]
        if "dense_peak_mib" in out:
            out["peak_memory_saving"] = 1 - out["reduced_peak_mib"] / out["dense_peak_mib"]
        if out["dense_kv_cache_mib"]:
            out["kv_cache_saving"] = 1 - out["reduced_kv_cache_mib"] / out["dense_kv_cache_mib"]
            out["expected_kv_cache_saving"] = expected_kv_saving
    if "ceiling" in reducers:
        decode = out["dense_generation_ms"] - out["dense_prefill_ms"]
        out["prefill_bound"] = out["dense_generation_ms"] / (out["ceiling_prefill_ms"] + decode)
        out["ceiling_speedup"] = out["dense_generation_ms"] / out["ceiling_generation_ms"]
        # a hybrid's attention layers decode over the keys the prefill cached: the ceiling's shorter cache speeds
        # its decoding too, so its whole generation is the bound
        out["bound"] = out["ceiling_speedup"] if out["dense_kv_cache_mib"] else out["prefill_bound"]
        out["of_bound"] = out["speedup"] / out["bound"]
    out["times_ms"] = {name: [1000 * t for t in values] for name, values in times.items()}
    return out
