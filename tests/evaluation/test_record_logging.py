"""A run's numbers end up, the same, in the printed table, the results store and W&B; an interrupted run leaves none."""
import json

import pytest
from omegaconf import open_dict

from conftest import compose_config
from evaluation.fake_reducer import DropTokens
from ssmcompress import metrics, reduction, runner, tracking


def reduced_config(model_dir, results_dir, *extra):
    cfg = compose_config([f"model.path={model_dir}", f"results_dir={results_dir}", "model.device=cpu", "ratio=0.3",
                          "benchmark.limit=3", "benchmark.measure.repeats=2", *extra])
    with open_dict(cfg):
        cfg.method.name = "fake-drop"
    return cfg


@pytest.fixture
def fake_reduction(monkeypatch):
    """The runner builds the test reducer (2 tokens removed after block 1) instead of a real method."""
    monkeypatch.setattr(reduction, "from_config", lambda model, cfg, info, tokenizer=None: DropTokens(model, 1, 2, match=True))
    monkeypatch.setattr(reduction, "check_config", lambda cfg, model_config: None, raising=False)


def as_stored(record):
    return json.loads(json.dumps(record, sort_keys=True, default=float))


def test_reduced_run_prints_stores_and_logs_the_same_numbers(fake_reduction, tiny_mamba2_dir, tmp_path, caplog):
    caplog.set_level("INFO")  # the summary is logged: on the console and in Hydra's run.log
    cfg = reduced_config(tiny_mamba2_dir, tmp_path / "results", "logger=wandb", "logger.mode=offline")
    record = runner.run(cfg, run_dir=tmp_path / "run")
    printed = caplog.text
    for needle in ("shakespeare_lastword", "average", "FLOPs / sequence", "achieved ratio", "FLOPs (fvcore)",
                   "tokens per layer", "latency ms", "speedup", "peak memory MiB"):
        assert needle in printed
    assert 0 < record["flops"]["achieved_ratio"] < 0.3 and record["efficiency"]["reduced_latency_ms"] > 0
    assert record["reduction"] == dict(method="drop-test", layer=1, count=2)
    for field in ("model", "method", "ratio", "layers", "benchmark", "protocol", "seed"):
        assert field in record
    assert record["git"]["commit"] and record["env"]["device"] == "cpu"
    (stored,) = tracking.load(tmp_path / "results")
    assert stored == as_stored(record)
    # W&B (offline): the per-layer table holds the record's per-layer numbers
    (table,) = (tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/flops/per_layer_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["layer", "tokens", "dense_flops", "reduced_flops"]
    assert logged["data"] == [list(row.values()) for row in metrics.per_layer_rows(stored["flops"])]


def test_wandb_summary_holds_the_records_numbers(tmp_path):
    record = dict(key="k", metrics={"task": {"acc": 0.5}}, headline={"average": 0.5},
                  flops=dict(dense=10.0, reduced=7.0, achieved_ratio=0.3, tokens_per_layer=[4, 2],
                             per_layer=dict(dense=[4.0, 4.0], reduced=[4.0, 2.0])),
                  efficiency=dict(dense_latency_ms=2.0, reduced_latency_ms=1.0, speedup=2.0, device="cpu"),
                  timings=dict(total_s=1.0))
    record.update(run_id="r", model="m", method="dense", ratio=None, benchmark="b", pruner="none", config={"a": 1})
    logger = tracking.WandbLogger(dict(project="test", mode="offline"), record, tmp_path)
    try:
        logger.log(record)
        summary = logger.run.summary
        assert summary["flops/dense"] == 10.0 and summary["flops/achieved_ratio"] == 0.3
        assert summary["efficiency/speedup"] == 2.0 and summary["metrics/task/acc"] == 0.5
        assert summary["headline/average"] == 0.5 and summary["key"] == "k"
    finally:
        logger.finish()


def test_efficiency_benchmark_measures_without_accuracy(tiny_mamba2_dir, tmp_path):
    cfg = compose_config([f"model.path={tiny_mamba2_dir}", f"results_dir={tmp_path}", "logger=none",
                          "benchmark=efficiency", "benchmark.measure.shape.cpu.length=32",
                          "benchmark.measure.warmup=1", "benchmark.measure.repeats=2"])
    record = runner.run(cfg, run_dir=tmp_path / "run")
    assert record["metrics"] is None and record["benchmark"] == "efficiency"
    assert record["flops"]["length"] == 32 and record["efficiency"]["dense_tokens_per_s"] > 0
    assert tracking.load(tmp_path) == [as_stored(record)]


def test_interrupted_run_leaves_no_record(fake_reduction, tiny_mamba2_dir, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics, "from_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.run(reduced_config(tiny_mamba2_dir, tmp_path, "logger=none"), run_dir=tmp_path / "run")
    assert tracking.load(tmp_path) == []
