"""The main job end to end on a tiny model: accuracy through lm-eval, a record in the store, W&B offline."""
import json
import os
import re

import pytest

from ssmcompress import runner, tracking
from ssmcompress.config import run_key, to_dict
from ssmcompress.errors import ConfigError, ModelSourceError
from conftest import compose_config


def tiny_overrides(model_dir, results_dir, *extra):
    return [f"model.path={model_dir}", f"results_dir={results_dir}", "benchmark.limit=6", "logger=none",
            "model.device=cpu", *extra]


def test_full_tiny_run_writes_one_record_and_samples(tiny_mamba2_dir, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_mamba2_dir, tmp_path / "results"))
    record = runner.run(cfg, run_dir=tmp_path / "run")
    stored = tracking.load(tmp_path / "results")
    assert len(stored) == 1 and stored[0]["run_id"] == record["run_id"] and stored[0]["key"] == run_key(cfg)
    tasks = list(cfg.benchmark.tasks)
    assert set(record["metrics"]) == set(tasks)
    assert 0 <= record["headline"]["average"] <= 1
    assert record["metrics"]["shakespeare_lastword"]["perplexity"] > 1
    assert stored[0]["config"]["model"]["path"] == str(tiny_mamba2_dir)
    for task in tasks:
        rows = (tmp_path / "run" / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(rows) == 6 and "resps" in json.loads(rows[0])


def test_skip_existing_does_not_duplicate(tiny_mamba2_dir, tmp_path):
    overrides = tiny_overrides(tiny_mamba2_dir, tmp_path, "benchmark.tasks=[mqar]", "skip_existing=true")
    assert runner.run(compose_config(overrides), run_dir=tmp_path / "a") is not None
    assert runner.run(compose_config(overrides), run_dir=tmp_path / "b") is None
    assert len(tracking.load(tmp_path)) == 1


def test_wandb_offline_run_is_written(tiny_mamba2_dir, tmp_path):
    overrides = tiny_overrides(tiny_mamba2_dir, tmp_path, "benchmark.tasks=[mqar]", "logger=wandb",
                               "logger.mode=offline")
    runner.run(compose_config(overrides), run_dir=tmp_path / "run")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))


BAD_INPUTS = [  # (overrides, what the one-line error says)
    (["benchmark.limit=0"], "benchmark.limit must be an integer >= 1"),
    (["benchmark.limit=-3"], "benchmark.limit must be an integer >= 1"),
    (["benchmark.limit=abc"], "benchmark.limit must be an integer >= 1, got 'abc'"),
    (["benchmark.batch_size=0"], "benchmark.batch_size must be an integer >= 1"),
    (["benchmark.batch_size=-1"], "benchmark.batch_size must be an integer >= 1"),
    (["benchmark.tasks=[nope]"], "lm-eval knows no task, group or tag 'nope'"),
    (["benchmark.tasks=[]"], "benchmark.tasks must be a non-empty list"),
    (["seed=abc"], "seed must be an integer, got 'abc'"),
    (["model.max_length=0"], "model.max_length must be an integer >= 1"),
    (["protocol=fuzzy"], "unknown protocol"),
    (["model.dtype=int8"], "invalid dtype"),
    (["model.device=tpu"], "invalid device"),
    (["method=ours"], "method=ours needs ratio"),
    (["method=ours", "ratio=1.5"], "0 < ratio < 1"),
    (["method=official", "method.reduce_ratio=1.5"], "reduce_ratio must be a number with 0 < x <= 1"),
    (["skip_existing=maybe"], "skip_existing must be true or false"),
    (["benchmark=efficiency", "benchmark.measure.shape.cpu.batch_size=0"], "shape.cpu.batch_size must be an integer >= 1"),
    (["benchmark=efficiency", "benchmark.measure.shape.cpu.length=0"], "shape.cpu.length must be an integer >= 1"),
    (["benchmark=efficiency", "benchmark.measure.repeats=0"], "benchmark.measure.repeats must be an integer >= 1"),
    (["model=local"], "model.path must be set"),
    (["benchmark=efficiency", "method=ours", "ratio=0.3", "method.strict=true", "benchmark.measure.shape.cpu.length=5"],
     "strict=true: a sequence of 5 tokens is too short for ratio=0.3"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Any work (loading a model) fails the test: bad input must be refused before it."""
    monkeypatch.setattr(runner, "prepare", lambda cfg: pytest.fail("work started before the input was refused"))


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_refused_in_one_line_before_any_work(overrides, message, no_work, tmp_path):
    cfg = compose_config(["logger=none", f"results_dir={tmp_path}/results", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        runner.run(cfg, run_dir=tmp_path / "run")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "results").exists()


def test_unusable_model_sources_are_refused_before_any_work(no_work, tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        runner.run(compose_config([f"model.path={tmp_path}", "logger=none"]), run_dir=tmp_path / "r")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"d_model": 64, "n_layer": ')
    (broken / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="cannot be read as JSON") as error:
        runner.run(compose_config(["model=local", f"model.path={broken}", "logger=none"]), run_dir=tmp_path / "r")
    assert "\n" not in str(error.value)
    # an architecture without released weights (mamba3-1.3b) runs with random weights only
    with pytest.raises(ModelSourceError, match="has no released weights"):
        runner.run(compose_config(["model=mamba3-1.3b", "model.random_init=false", "logger=none"]),
                   run_dir=tmp_path / "r")


def test_a_truncated_weights_file_is_one_line_and_no_record(tiny_mamba2_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_mamba2_dir, tmp_path / "copy")
    weights = copy / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = compose_config(["model=local", f"model.path={copy}", "logger=none", f"results_dir={tmp_path}/results"])
    with pytest.raises(ModelSourceError, match="truncated or corrupt") as error:
        runner.run(cfg, run_dir=tmp_path / "run")
    assert "\n" not in str(error.value) and not tracking.load(tmp_path / "results")


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_an_unwritable_results_dir_is_refused_before_any_work(kind, no_work, tmp_path):
    target = tmp_path / "results"
    if kind == "file":
        target.write_text("not a directory")
    else:
        target.mkdir()
        target.chmod(0o500)
        if os.access(target, os.W_OK):  # root ignores permissions: make the parent a file instead
            target = tmp_path / "a-file" / "results"
            (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="results_dir"):
        runner.run(compose_config(["logger=none", f"results_dir={target}"]), run_dir=tmp_path / "run")


def test_layers_empty_warns_that_the_run_is_dense(tmp_path, caplog):
    from ssmcompress import reduction

    cfg = compose_config(["method=ours", "ratio=0.3", "layers=[]", "model.random_init=true"])
    reduction.check_config(cfg, to_dict(cfg.model)["config"])
    assert "layers=[] selects no reduction layer" in caplog.text


def test_official_accepts_its_codes_reduce_ratio_without_a_ratio():
    from ssmcompress import reduction

    cfg = compose_config(["method=official", "method.reduce_ratio=0.9", "model.random_init=true"])
    reduction.check_config(cfg, to_dict(cfg.model)["config"])


def test_the_title_names_the_pruner():
    record = dict(model="m", method="dense", ratio=None, pruner="multi", sparsity=0.5, benchmark="b",
                  protocol="exact", timings={"total_s": 1.0})
    assert runner.summary_table(record).splitlines()[0] == "m | dense | pruner multi sparsity 0.5 | b | protocol exact"


def test_unknown_model_or_benchmark_is_a_hydra_error():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        compose_config(["model=mamba9-huge"])
    with pytest.raises(MissingConfigException):
        compose_config(["benchmark=nope"])
