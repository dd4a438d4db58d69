"""How many kernels a reduction layer launches, per method, on the fused route: the part of the reduction's own time
that does not shrink with the model (each launch costs a few microseconds on a GPU, replayed or not), counted on any
machine. The fused kernels run under Triton's interpreter on a CPU; every torch operator that is not a view or an
allocation counts as one launch (a torch sort is several on a GPU: counted once), every Triton kernel as one.

    TRITON_INTERPRET=1 python experiments/count_launches.py OUT.jsonl [model] [methods] [batch] [length]
    TRITON_INTERPRET=1 python experiments/count_launches.py results/launches.jsonl      # mamba2-tiny, 2 x 256

Appends one JSON line per method to OUT: the commit of the code counted, the launches per reduction layer (the
importance capture and the layer's decision, merge and compaction), split into torch operators and Triton kernels,
and the operators that launched most.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from ssmcompress import hosts, reduction
from ssmcompress.config import CONF_DIR, register_resolvers, to_dict
from ssmcompress.metrics import efficiency
from ssmcompress.reduction import kernels, patch

# operators that launch nothing on a GPU: views and allocations
NO_LAUNCH = {"view", "expand", "slice", "select", "unsqueeze", "squeeze", "transpose", "t", "as_strided", "alias",
             "permute", "unbind", "split", "_unsafe_view", "detach", "empty", "empty_like", "empty_strided",
             "_reshape_alias", "lift_fresh", "view_as", "reshape", "flatten", "contiguous"}


class Launches(TorchDispatchMode):
    """Counts torch operators that launch a kernel, and Triton kernels (kernels._launch), while `counting`."""

    def __init__(self):
        super().__init__()
        self.ops, self.counting, self.in_triton = Counter(), False, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.counting and not self.in_triton and name not in NO_LAUNCH:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def counting(call, meter: Launches):
    """`call`, counting while it runs."""
    def wrapped(*args, **kwargs):
        meter.counting = True
        try:
            return call(*args, **kwargs)
        finally:
            meter.counting = False
    return wrapped


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise SystemExit("set TRITON_INTERPRET=1 (the fused kernels on a CPU) or run on a GPU")
    out = Path(sys.argv[1])
    model_name = sys.argv[2] if len(sys.argv) > 2 else "mamba2-tiny"
    methods = (sys.argv[3] if len(sys.argv) > 3 else "ours,tome,pumer,evit,random,ceiling").split(",")
    batch, length = (int(x) for x in sys.argv[4:6]) if len(sys.argv) > 5 else (2, 256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels.ROUTE = "fused"
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        base = compose("config", overrides=[f"model={model_name}", "model.random_init=true"])
    host = hosts.of(base.model)
    model = host.load_model(base.model.path, device, "float32", True, config=to_dict(base.model).get("config")).eval()
    info = host.model_info(model)
    ids = efficiency.synthetic_batch(info["vocab_size"], batch, length, device)
    source = Path(kernels.__file__).resolve().parents[3]
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(source), "status", "--porcelain", "src"], capture_output=True,
                                text=True).stdout.strip())
    meter = Launches()
    launch = kernels._launch

    def triton_launch(kernel, *args, **options):
        if meter.counting:
            meter.ops["triton:" + getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", "?"))] += 1
        meter.in_triton = True
        try:
            return launch(kernel, *args, **options)
        finally:
            meter.in_triton = False

    kernels._launch = triton_launch
    # the importance capture (a hook bound when the reducer is built, calling these by name)
    patch.importance_of = counting(patch.importance_of, meter)
    patch.delta_importance = counting(patch.delta_importance, meter)
    with out.open("a") as sink:
        for method in methods:
            with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
                cfg = compose("config", overrides=[f"model={model_name}", "model.random_init=true",
                                                   f"method={method}", "ratio=0.3"] + (["method.allow_accuracy=true"] if method == "ceiling" else []))
            reducer = reduction.from_config(model, cfg, info)
            reducer._reduce_step = counting(reducer._reduce_step, meter)  # each reduction layer
            meter.ops.clear()
            try:
                with meter, torch.no_grad():
                    reducer(ids)
            finally:
                reducer.remove()
            layers = len(reducer.setup.layers)
            triton = sum(count for name, count in meter.ops.items() if name.startswith("triton:"))
            total = sum(meter.ops.values())
            entry = dict(commit=commit, dirty=dirty, model=model_name, batch=batch, length=length, method=method,
                         layers=layers, per_layer=total / layers, torch_per_layer=(total - triton) / layers,
                         triton_per_layer=triton / layers, sorts_per_layer=meter.ops["sort"] / layers,
                         top={name: count / layers for name, count in meter.ops.most_common(40)})
            sink.write(json.dumps(entry) + "\n")
            print(f"{method}: {entry['per_layer']:.0f} launches per reduction layer ({entry['torch_per_layer']:.0f} "
                  f"torch, {entry['triton_per_layer']:.0f} Triton, {entry['sorts_per_layer']:.0f} sorts)", flush=True)


if __name__ == "__main__":
    main()
