"""The runner's measurement hook: FLOPs (analytic and fvcore) and efficiency of the dense and the reduced model."""
import time

import pytest
import torch

from conftest import compose_config, tiny_model
from evaluation.fake_reducer import DropTokens
from ssmcompress import flops, metrics, records, reduction
from ssmcompress.hosts import mamba_ssm
from ssmcompress.errors import ConfigError


def efficiency_config(*extra):
    return compose_config(["benchmark=efficiency", "benchmark.measure.shape.cpu.length=48",
                           "benchmark.measure.shape.cpu.batch_size=2", "benchmark.measure.warmup=0",
                           "benchmark.measure.repeats=2", *extra])


def test_dense_model_reports_flops_and_efficiency():
    model = tiny_model(2)
    info = mamba_ssm.model_info(model)
    out = metrics.from_config(model, None, efficiency_config(), info)
    fl = out["flops"]
    assert (fl["batch_size"], fl["length"]) == (2, 48)
    assert fl["dense"] == fl["reduced"] == flops.dense_flops(info, 48) and fl["achieved_ratio"] == 0
    assert abs(fl["fvcore"]["deviation"]["dense"]) < 0.02
    eff = out["efficiency"]
    assert eff["dense_latency_ms"] > 0 and "reduced_latency_ms" not in eff and eff["device"] == "cpu"
    assert eff["scan_kernel"] == "pure-torch reference (CPU)"
    assert eff["weights_mib"] == pytest.approx(sum(p.numel() * 4 for p in model.parameters()) / 2 ** 20)


def test_reduced_model_reports_the_achieved_ratio_by_the_budget_ruler():
    model = tiny_model(2)
    info = mamba_ssm.model_info(model)
    reducer = DropTokens(model, layer=1, count=16, match=True)
    out = metrics.from_config(model, reducer, efficiency_config(), info)
    fl = out["flops"]
    assert fl["tokens_per_layer"] == [48, 48, 32, 32] and fl["logits_tokens"] == 32
    dense = flops.dense_flops(info, 48)
    expected = flops.forward_flops(info, [48, 48, 32, 32], 32)["total"]  # the model's work, as the budget counts
    overhead = flops.bipartite_matching_flops(48, 64)
    assert fl["reduced"] == pytest.approx(expected) and fl["reduction_overhead"] == overhead
    assert fl["achieved_ratio"] == pytest.approx(1 - expected / dense)
    assert fl["achieved_ratio_with_overhead"] == pytest.approx(1 - (expected + overhead) / dense)
    # fvcore counts the reducer's similarity matmul as well
    assert abs(fl["fvcore"]["deviation"]["reduced"]) < 0.02
    assert fl["fvcore"]["achieved_ratio"] == pytest.approx(fl["achieved_ratio_with_overhead"], abs=0.01)
    rows = metrics.per_layer_rows(fl)
    assert [r["tokens"] for r in rows] == [48, 48, 32, 32]
    assert rows[3]["reduced_flops"] < rows[3]["dense_flops"] and rows[0]["reduced_flops"] == rows[0]["dense_flops"]
    eff = out["efficiency"]
    assert eff["speedup"] == pytest.approx(eff["dense_latency_ms"] / eff["reduced_latency_ms"])
    text = "\n".join(metrics.summary_lines(out))
    for needle in ("FLOPs / sequence", "achieved ratio", "tokens per layer", "latency ms", "speedup", "tokens/s"):
        assert needle in text


def test_overhead_is_taken_from_the_reducer_or_recorded_as_not_counted():
    model = tiny_model(2)
    out = metrics.from_config(model, DropTokens(model, layer=1, count=8), efficiency_config(
        "benchmark.measure.efficiency=false", "benchmark.measure.fvcore=false"), mamba_ssm.model_info(model))
    assert out["flops"]["reduction_overhead"] == 0.0 and "efficiency" not in out and "fvcore" not in out["flops"]

    class WithoutOverhead:
        def __call__(self, input_ids, lengths=None, protect=None):
            raise AssertionError("not called")

    assert metrics.reduction_overhead(WithoutOverhead(), [1]) is None


def test_a_reducer_that_stays_active_outside_its_calls_is_refused():
    model = tiny_model(2)
    reducer = DropTokens(model, layer=0, count=4, persistent=True)
    try:
        with pytest.raises(RuntimeError, match="dense forward returned fewer positions"):
            metrics.from_config(model, reducer, efficiency_config(), mamba_ssm.model_info(model))
    finally:
        reducer.remove()


def test_measurement_can_be_switched_off():
    model = tiny_model(2)
    assert metrics.from_config(model, None, efficiency_config("benchmark.measure.enabled=false"),
                               mamba_ssm.model_info(model)) == {}


def test_the_reduction_overhead_is_timed_without_changing_the_outputs():
    from ssmcompress import reduction
    from ssmcompress.metrics import efficiency
    from ssmcompress.timing import Stopwatch

    model = tiny_model(2, n_layer=12)
    info = mamba_ssm.model_info(model)
    cfg = efficiency_config("method=ours", "ratio=0.3", "benchmark.measure.fvcore=false",
                            "benchmark.measure.ceiling=false")
    reducer = reduction.from_config(model, cfg, info)
    ids = efficiency.synthetic_batch(info["vocab_size"], 2, 48, "cpu")
    plain = reducer(ids).logits
    reducer.stopwatch = Stopwatch()
    timed = reducer(ids).logits
    spans = len(reducer.stopwatch.spans)
    reducer.stopwatch = None
    assert torch.equal(plain, timed)
    assert spans == 2 * len(reducer.setup.layers) + 1  # importance + reduction per layer, bookkeeping once
    # the reduction's own time is a part of its call's time (measured around that same call: no comparison of two
    # separately timed runs, which load on the machine could reorder)
    reducer.stopwatch = Stopwatch()
    start = time.perf_counter()
    reducer(ids)
    wall = time.perf_counter() - start
    own, reducer.stopwatch = reducer.stopwatch.seconds(), None
    assert 0 < own <= wall
    eff = metrics.from_config(model, reducer, cfg, info)["efficiency"]
    assert eff["reduction_ms"] > 0 and reducer.stopwatch is None
    assert eff["reduction_kernels"] == "pure-torch reference (CPU)"  # recorded beside the overhead it explains
    assert eff["reduction_overhead"] == pytest.approx(eff["reduction_ms"] / eff["dense_latency_ms"])
    assert "reduction overhead" in "\n".join(metrics.summary_lines({"efficiency": eff}))
    assert "reduction kernels" not in "\n".join(metrics.summary_lines({"efficiency": eff}))  # a CPU run: as it should
    on_gpu = dict(eff, reduction_kernels=f"pure-torch reference: {records.NOT_REPRESENTATIVE}")
    (line,) = [line for line in metrics.summary_lines({"efficiency": on_gpu}) if "reduction kernels" in line]
    assert line.split() == ["reduction", "kernels", "pure-torch", "reference:", "not", "representative"]


@pytest.mark.parametrize("schedule", ["smooth", "chunk"])
def test_efficiency_times_the_ceiling_beside_the_method(schedule, single_thread):
    """benchmark=efficiency times the ceiling at the method's schedule in the same interleaved loop; the record
    says how much of the ceiling's speed-up the method keeps, and the model is left as it was."""
    from ssmcompress import reduction

    model = tiny_model(2)  # reduction layers 1, 2, 3 of 4
    info = mamba_ssm.model_info(model)
    cfg = efficiency_config("method=ours", "ratio=0.3", f"schedule={schedule}", "benchmark.measure.fvcore=false")
    reducer = reduction.from_config(model, cfg, info)
    try:
        out = metrics.from_config(model, reducer, cfg, info)
    finally:
        reducer.remove()
    eff = out["efficiency"]
    assert len(eff["latencies_ms"]["ceiling"]) == len(eff["latencies_ms"]["reduced"]) == 2
    assert eff["ceiling_speedup"] == pytest.approx(eff["dense_latency_ms"] / eff["ceiling_latency_ms"])
    assert eff["of_ceiling"] == pytest.approx(eff["speedup"] / eff["ceiling_speedup"])
    assert eff["ceiling_achieved_ratio"] == pytest.approx(out["flops"]["achieved_ratio"])  # the same counts
    assert "ceiling_peak_mib" in eff or "dense_peak_mib" not in eff
    assert "of the ceiling" in "\n".join(metrics.summary_lines(out))
    assert not any(block._forward_hooks or block.mixer.out_proj._forward_pre_hooks for block in model.backbone.layers)


def test_the_ceiling_is_not_timed_where_it_is_off_or_alone(single_thread):
    from ssmcompress import reduction

    model = tiny_model(2)
    info = mamba_ssm.model_info(model)
    for extra in (["method=ours", "benchmark.measure.ceiling=false"], ["method=ceiling"]):
        cfg = efficiency_config("ratio=0.3", "benchmark.measure.fvcore=false", *extra)
        reducer = reduction.from_config(model, cfg, info)
        try:
            eff = metrics.from_config(model, reducer, cfg, info)["efficiency"]
        finally:
            reducer.remove()
        assert "ceiling_latency_ms" not in eff and "of_ceiling" not in eff and "speedup" in eff


def test_mixer_rows_adds_the_peak_memory_of_sliced_mixers(monkeypatch):
    model = tiny_model(2)
    info = mamba_ssm.model_info(model)
    rows_seen = []
    mixer_class = type(model.backbone.layers[0].mixer)
    forward = mixer_class.forward
    monkeypatch.setattr(mixer_class, "forward",
                        lambda self, u, *a, **k: rows_seen.append(u.shape[0]) or forward(self, u, *a, **k))
    cfg = efficiency_config("benchmark.measure.fvcore=false", "benchmark.measure.mixer_rows=1")
    eff = metrics.from_config(model, DropTokens(model, layer=1, count=16), cfg, info)["efficiency"]
    assert eff["mixer_rows"] == 1
    assert 1 in rows_seen and 2 in rows_seen  # the whole-batch forwards, then the sliced ones
    assert {"sliced_dense_peak_mib", "sliced_reduced_peak_mib", "sliced_peak_memory_saving"} <= set(eff)
    assert not any("forward" in vars(block.mixer) for block in model.backbone.layers)


def test_mixer_rows_below_one_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="mixer_rows must be an integer >= 1"):
        metrics.check_config(efficiency_config("benchmark.measure.mixer_rows=0"), {})


def test_reduction_rows_slice_the_reduction_in_the_sliced_measurement_only(single_thread):
    model = tiny_model(2, n_layer=12)
    info = mamba_ssm.model_info(model)
    cfg = efficiency_config("method=ours", "ratio=0.3", "benchmark.measure.fvcore=false",
                            "benchmark.measure.ceiling=false", "benchmark.measure.mixer_rows=1",
                            "benchmark.measure.reduction_rows=1")
    reducer = reduction.from_config(model, cfg, info)
    seen = []
    function = reducer.setup.function
    reducer.setup.function = lambda tokens, n, **params: seen.append(tokens.valid.shape[0]) or function(
        tokens, n, **params)
    eff = metrics.from_config(model, reducer, cfg, info)["efficiency"]
    reducer.remove()
    assert eff["reduction_rows"] == 1 and reducer.row_slices is None
    assert 1 in seen and 2 in seen  # the sliced measurement's layers saw one row at a time, the others both
    assert "sliced_peak_memory_saving" in eff


def test_reduction_rows_without_mixer_rows_is_refused():
    with pytest.raises(ConfigError, match="set both"):
        metrics.check_config(efficiency_config("benchmark.measure.reduction_rows=4"), {})


def test_mixer_rows_on_a_transformers_model_is_refused():
    with pytest.raises(ConfigError, match="no meaning for a transformers model"):
        metrics.check_config(efficiency_config("model=tiny-opt", "benchmark.measure.mixer_rows=4"), {})
