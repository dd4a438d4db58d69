"""CUDA graph capture of the measured forwards: what makes a forward capturable is checked on a CPU (no op reads a
value back from the device, nothing is copied from the host), the capture itself on a GPU
(experiments/gpu/check_capture.py)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmcompress import reduction
from ssmcompress.hosts import mamba_ssm
from ssmcompress.hosts import transformers as hf
from ssmcompress.metrics import capture, efficiency
from ssmcompress.reduction import kernels, patch
from conftest import compose_config, tiny_model
from hosts.host_fixtures import build

# ops whose result the host must wait for (a value read back, a data-dependent shape) or that copy host data to the
# device: neither can be captured in a CUDA graph
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
              "aten::unique_consecutive", "aten::unique_dim", "aten::equal", "aten::is_nonzero"}


class HostReads(TorchDispatchMode):
    """Records every op of HOST_READS, every tensor made from Python data with more than one element (on a GPU, a
    copy from the host) and every repeat_interleave without a given output size."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        out = func(*args, **(kwargs or {}))
        if name in HOST_READS or (name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is None
                                  and isinstance(args[0], torch.Tensor) and args[0].dim() == 1 and len(args) == 1):
            self.found.append(name)
        if name == "aten::lift_fresh" and out.numel() > 1:
            self.found.append("a tensor made from host data")
        return out


@pytest.fixture(autouse=True)
def gpu_route(monkeypatch):
    """The reduction's fused kernels, as on a GPU (here under Triton's interpreter): the pure-torch references size
    their matrices from the data, which the GPU route never does."""
    monkeypatch.setattr(kernels, "ROUTE", "fused")


def host_reads(call, monkeypatch) -> list[str]:
    """The host reads during `call()` as a capture sees it (patch.capturing() true: the reducer defers its checks)."""
    with monkeypatch.context() as during:
        during.setattr(patch, "capturing", lambda: True)
        during.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("tolist() during a capturable forward"))
        with HostReads() as mode:
            call()
    return mode.found


SSM_METHODS = ["ours", "evit", "tome", "pumer", "random", "official", "ceiling", "decimamba"]


# Mamba-3 refuses importance=delta (tests/hosts/test_mamba3.py)
@pytest.mark.parametrize("generation, method", [(g, m) for g in (1, 2, 3) for m in SSM_METHODS
                                                if (g, m) != (3, "decimamba")])
def test_a_planned_reduced_forward_reads_nothing_back(generation, method, monkeypatch):
    model = tiny_model(generation, seed=1, n_layer=6)
    info = mamba_ssm.model_info(model)
    reducer = reduction.from_config(model, compose_config([f"method={method}", "ratio=0.3", "benchmark=efficiency"]), info)
    input_ids = torch.randint(1, 100, (2, 48))
    reducer(input_ids)  # the first call of a shape copies its per-row tables to the device (Reducer._on_device)
    assert host_reads(lambda: reducer(input_ids), monkeypatch) == []
    reducer.settle_captured()
    assert reducer.totals["calls"] == 2


@pytest.mark.parametrize("family", ["granitemoehybrid", "mamba2"])
@pytest.mark.parametrize("method", ["ours", "evit", "ceiling"])
def test_a_planned_reduced_forward_on_transformers_reads_nothing_back(family, method, monkeypatch):
    model = build(family)
    reducer = reduction.from_config(model, compose_config([f"method={method}", "ratio=0.3", "benchmark=efficiency"]), hf.model_info(model))
    input_ids = torch.randint(1, 100, (2, 48))
    reducer(input_ids)
    assert host_reads(lambda: reducer(input_ids), monkeypatch) == []


def test_the_dense_forward_reads_nothing_back(monkeypatch):
    model = tiny_model(2, seed=1, n_layer=4)
    assert host_reads(lambda: mamba_ssm.logits(model, torch.randint(1, 100, (2, 48))), monkeypatch) == []


def test_a_captured_call_is_settled_after_the_replay(monkeypatch):
    """Under a capture the reducer returns without its checks; settle_captured runs them on the graph's tensors and
    adds the call to the totals, as an uncaptured call would."""
    model = tiny_model(2, seed=1, n_layer=6)
    reducer = reduction.from_config(model, compose_config(["method=ours", "ratio=0.3"]), mamba_ssm.model_info(model))
    input_ids = torch.randint(1, 100, (2, 48))
    eager = reducer(input_ids)
    monkeypatch.setattr(patch, "capturing", lambda: True)
    captured = reducer(input_ids)
    assert reducer.totals["calls"] == 1
    assert torch.equal(captured.logits, eager.logits) and torch.equal(captured.positions, eager.positions)
    reducer.settle_captured()
    assert reducer.totals["calls"] == 2
    with pytest.raises(RuntimeError, match="no reducer call was captured"):
        reducer.settle_captured()


def test_without_a_gpu_the_forwards_run_eagerly_and_the_record_says_so():
    forwards = {"dense": lambda x: x + 1, "reduced": lambda x: x + 2}
    input_ids = torch.zeros(1, 4, dtype=torch.long)
    timed, paths = capture.graph_all(forwards, input_ids)
    assert timed == forwards
    assert set(paths.values()) == {"eager (CUDA graphs need a GPU)"}
    out = efficiency.measure(forwards, input_ids, warmup=0, repeats=1, weights=0, progress=False, capture=True)
    assert out["forward_path"] == "eager (CUDA graphs need a GPU)"
    assert out["forward_paths"] == paths
    assert efficiency.measure(forwards, input_ids, 0, 1, 0, progress=False)["forward_path"] == "eager"


def test_a_mixed_capture_is_marked_not_representative():
    paths = {"dense": capture.CUDA_GRAPH, "reduced": "eager (capture failed: x)"}
    line = efficiency.forward_path(paths)
    assert "eager: reduced" in line and "not representative" in line
    assert efficiency.forward_path({"dense": capture.CUDA_GRAPH}) == capture.CUDA_GRAPH
    failed = {"dense": "eager (capture failed: x)", "reduced": "eager (capture failed: y)"}
    assert efficiency.forward_path(failed).startswith("eager (no forward could be captured")
