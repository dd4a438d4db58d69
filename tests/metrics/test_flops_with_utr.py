"""FLOPs of a real reduction method (UTR): fvcore, the analytic ruler and the reducer's own books agree."""
import pytest

from conftest import compose_config, tiny_model
from ssmcompress import metrics, reduction
from ssmcompress.hosts import mamba_ssm


def test_utr_flops_agree_across_fvcore_the_analytic_model_and_the_reducer():
    model = tiny_model(2)
    info = mamba_ssm.model_info(model)
    cfg = compose_config(["method=ours", "ratio=0.3", "benchmark=efficiency", "benchmark.measure.efficiency=false",
                          "benchmark.measure.shape.cpu.length=256"])
    reducer = reduction.from_config(model, cfg, info)
    try:
        fl = metrics.from_config(model, reducer, cfg, info)["flops"]
        observed = reducer.describe()["observed"]
    finally:
        reducer.remove()
    assert fl["achieved_ratio"] == pytest.approx(0.3, abs=0.01)  # the budget's promise at a long sequence
    assert fl["achieved_ratio"] == pytest.approx(observed["achieved_ratio"], abs=1e-9)
    assert fl["reduction_overhead"] > 0
    assert fl["achieved_ratio_with_overhead"] == pytest.approx(observed["achieved_ratio_with_overhead"], abs=1e-9)
    assert abs(fl["fvcore"]["deviation"]["reduced"]) < 0.02  # fvcore sees the reducer's own work too
    assert fl["tokens_per_layer"][0] == 256 and fl["tokens_per_layer"][-1] < 256


@pytest.mark.parametrize("method", ["official", "evit", "tome", "pumer", "random", "prune_only", "merge_only", "early",
                                    "early_merge", "strided", "late", "ceiling"])
def test_every_method_can_be_counted_by_fvcore(method):
    """fvcore traces the reduced forward with torch.jit: a method must use traceable ops (no tensor & bool)."""
    model = tiny_model(2)
    info = mamba_ssm.model_info(model)
    cfg = compose_config([f"method={method}", "ratio=0.3", "benchmark=efficiency", "benchmark.measure.efficiency=false",
                          "benchmark.measure.shape.cpu.length=128"])
    reducer = reduction.from_config(model, cfg, info)
    try:
        fl = metrics.from_config(model, reducer, cfg, info)["flops"]
    finally:
        reducer.remove()
    assert fl["fvcore"]["reduced"] < fl["fvcore"]["dense"]
