"""Where a reduced forward's time goes, to explain a missed speed target: torch.profiler over
one dense and one reduced forward of a random-weight model, per method, after warm-up.

    python experiments/gpu/profile_reduction.py OUT.txt [model] [methods] [batch] [length]
    python experiments/gpu/profile_reduction.py profile.txt mamba2-2.7b ours,random 8 2048     # on a GPU
    python experiments/gpu/profile_reduction.py profile.txt granite-4.0-h-1b ours 8 2048       # a transformers hybrid

Prints, per forward: the latency, the reduction's own time (the reducer's stopwatch), the number of host-device
synchronisations inside the reduction hooks, the operators ranked by device time (self), so that the time
the reduction adds can be split into its kernels and the host waits between them, and the operators (by input
shape) ranked by the memory they allocate.
"""
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

from ssmcompress import hosts, reduction
from ssmcompress.config import CONF_DIR, register_resolvers, to_dict
from ssmcompress.metrics import efficiency
from ssmcompress.timing import Stopwatch



def main() -> None:
    out, model_name = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mamba2-2.7b"
    methods = (sys.argv[3] if len(sys.argv) > 3 else "ours,random").split(",")
    batch, length = (int(x) for x in sys.argv[4:6]) if len(sys.argv) > 5 else (8, 2048)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    register_resolvers()
    lines = []
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        base = compose("config", overrides=[f"model={model_name}", "model.random_init=true"])
    dtype = "bfloat16" if device == "cuda" else "float32"
    host = hosts.of(base.model)  # any model config: mamba-ssm's models and transformers' SSMs and hybrids alike
    model = host.load_model(base.model.path, device, dtype, True, config=to_dict(base.model).get("config")).eval()
    info = host.model_info(model)
    ids = efficiency.synthetic_batch(info["vocab_size"], batch, length, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for method in ["dense"] + methods:
        reducer = None
        if method != "dense":
            with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
                cfg = compose("config", overrides=[f"model={model_name}", "model.random_init=true",
                                                   f"method={method}", "ratio=0.3"])
            reducer = reduction.from_config(model, cfg, info)
        forward = (lambda x: host.logits(model, x)) if reducer is None else (lambda x: reducer(x).logits)
        times = efficiency.time_forwards({method: forward}, ids, warmup=2, repeats=3, progress=False)[method]
        lines.append(f"== {model_name} {method}@0.3 ({batch}x{length}, {dtype}, {device}): median "
                     f"{1000 * statistics.median(times):.1f} ms")
        if reducer is not None:
            reducer.stopwatch = Stopwatch()
            if device == "cuda":
                syncs = count_syncs(lambda: forward(ids))
            else:
                syncs = None
                with torch.no_grad():
                    forward(ids)
            lines.append(f"reduction's own time {1000 * reducer.stopwatch.seconds():.2f} ms over "
                         f"{len(reducer.stopwatch.spans)} spans; host-device synchronisations in the forward: {syncs}")
            reducer.stopwatch = None
        with torch.no_grad(), profile(activities=activities, profile_memory=True) as prof:
            forward(ids)
            if device == "cuda":
                torch.cuda.synchronize()
        lines.append(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
        # what each operator allocates (the peak-memory question: which step of a reduction layer holds the most)
        memory = "self_cuda_memory_usage" if device == "cuda" else "self_cpu_memory_usage"
        lines.append(prof.key_averages(group_by_input_shape=True).table(sort_by=memory, row_limit=15,
                                                                       max_name_column_width=60))
        if reducer is not None:
            reducer.remove()
        print("\n".join(lines[-3:]), flush=True)
    Path(out).write_text("\n".join(lines))


def count_syncs(call) -> int:
    """Host-device synchronisations during `call()` (torch.cuda's sync debug mode counts them as warnings)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            call()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


if __name__ == "__main__":
    main()
