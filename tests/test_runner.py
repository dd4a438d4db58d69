"""The main job end to end on a tiny model: accuracy through lm-eval, a record in the store, W&B offline."""
import json

import pytest

from ssmcompress import runner, tracking
from ssmcompress.config import ConfigError, run_key
from ssmcompress.models import ModelSourceError
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


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        runner.run(compose_config([f"model.path={tmp_path}", "logger=none"]), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="needs ratio"):
        runner.run(_with_method(compose_config(["logger=none"]), "ours"), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="0 < ratio < 1"):
        runner.run(_with_method(compose_config(["logger=none", "ratio=1.5"]), "ours"), run_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="unknown protocol"):
        runner.run(compose_config(["logger=none", "protocol=fuzzy"]), run_dir=tmp_path / "r")
    with pytest.raises(ModelSourceError, match="invalid dtype"):
        runner.run(compose_config(["logger=none", "model.dtype=int8"]), run_dir=tmp_path / "r")
    assert not tracking.load(tmp_path)


def _with_method(cfg, name):
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.method.name = name
    return cfg


def test_unknown_model_or_benchmark_is_a_hydra_error():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException):
        compose_config(["model=mamba9-huge"])
    with pytest.raises(MissingConfigException):
        compose_config(["benchmark=nope"])
