"""CUDA graph capture of the measured forwards (ssmcompress.metrics.capture) on a GPU: per model and method, the
replayed logits against the eager forward's (the same kernels on the same input: equal), whether the reducer's
checks pass on the replay's values, and the eager and replayed latencies side by side (median of 10 calls each,
interleaved), so that what the capture removes (launches and host work) is visible per model size.

    python experiments/gpu/check_capture.py OUT.jsonl [models] [methods] [batch] [length]
    python experiments/gpu/check_capture.py capture.jsonl mamba-130m,mamba2-130m,granite-4.0-h-1b ours,evit 1 2048
"""
import json
import statistics
import sys

import torch
from hydra import compose, initialize_config_dir

from ssmcompress import hosts, reduction
from ssmcompress.config import CONF_DIR, register_resolvers, to_dict
from ssmcompress.metrics import capture, efficiency


def config(model_name: str, *overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=[f"model={model_name}", "model.random_init=true", "benchmark=efficiency",
                                            *overrides])


def check(model_name: str, methods: list[str], batch: int, length: int) -> list[dict]:
    base = config(model_name)
    host = hosts.of(base.model)
    model = host.load_model(base.model.path, "cuda", "bfloat16", True, config=to_dict(base.model).get("config")).eval()
    info = host.model_info(model)
    ids = efficiency.synthetic_batch(info["vocab_size"], batch, length, "cuda")
    rows = []
    for method in ["dense"] + methods:
        reducer = None if method == "dense" else reduction.from_config(
            model, config(model_name, f"method={method}", "ratio=0.3"), info)
        forward = (lambda x: host.logits(model, x)) if reducer is None else (lambda x: reducer(x).logits)
        with torch.no_grad():
            eager = forward(ids).float()
        replay, failure = capture.graphed(forward, ids)
        row = dict(model=model_name, method=method, batch=batch, length=length, captured=failure is None,
                   failure=failure, device=torch.cuda.get_device_name())
        if failure is None:
            replayed = replay(ids).float()
            if reducer is not None:
                reducer.settle_captured()  # the reducer's checks (planned counts, finite importance) on the replay
            row["max_abs_diff"] = (replayed - eager).abs().max().item()
            row["equal"] = bool(torch.equal(replayed, eager))
            times = efficiency.time_forwards({"eager": forward, "graph": replay}, ids, warmup=2, repeats=10,
                                             progress=False)
            row.update({f"{name}_ms": 1000 * statistics.median(t) for name, t in times.items()})
            row["graph_speedup"] = row["eager_ms"] / row["graph_ms"]
            del replay
        if reducer is not None:
            reducer.remove()
        print(json.dumps(row), flush=True)
        rows.append(row)
    del model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    out = sys.argv[1]
    models = (sys.argv[2] if len(sys.argv) > 2 else "mamba-130m,mamba2-130m,granite-4.0-h-1b").split(",")
    methods = (sys.argv[3] if len(sys.argv) > 3 else "ours,evit").split(",")
    batch, length = (int(x) for x in sys.argv[4:6]) if len(sys.argv) > 5 else (1, 2048)
    register_resolvers()
    with open(out, "w") as f:
        for model_name in models:
            for row in check(model_name, methods, batch, length):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
