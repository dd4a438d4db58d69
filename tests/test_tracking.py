"""The results store under faults and concurrency: partial lines set aside, unreadable lines skipped, run keys claimed
by one live job at a time (released when it dies), W&B failures that lose nothing, W&B runs that can be told apart."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import compose_config
from ssmcompress import records, runner, tracking
from ssmcompress.config import run_key


def record(key: str, **extra) -> dict:
    """A valid record (records.Record) with run key `key`."""
    fields = dict(run_id=f"id-{key}", key=key, time="2026-12-01T00:00:00+0000", config={}, model="m", method="dense",
                  benchmark="b", protocol="exact", seed=0, pruner="none", timings={})
    return records.Record(**{**fields, **extra}).to_dict()


def test_an_append_after_a_partial_last_line_sets_it_aside(tmp_path, caplog):
    tracking.append(record("a"), tmp_path)
    store = tmp_path / tracking.STORE
    with open(store, "a") as f:
        f.write('{"key": "b", "run_id": "id-b", "metr')  # a writer killed mid-line
    assert [r["key"] for r in tracking.load(tmp_path)] == ["a"]  # readable records only, no crash
    assert "not records" in caplog.text
    tracking.append(record("c"), tmp_path)
    assert [r["key"] for r in tracking.load(tmp_path)] == ["a", "c"]  # the new record is not glued on
    assert store.read_text().count("\n") == 2 and store.read_text().endswith("\n")
    (rejected,) = [json.loads(line) for line in (tmp_path / tracking.REJECTED).read_text().splitlines()]
    assert rejected["line"] == '{"key": "b", "run_id": "id-b", "metr' and "no newline" in rejected["reason"]
    assert "incomplete" in caplog.text


def test_a_complete_last_record_without_its_newline_gets_one_and_stays(tmp_path):
    store = tmp_path / tracking.STORE
    store.write_text(json.dumps(record("a")) + "\n" + json.dumps(record("b")))  # saved by an editor, no final newline
    assert [r["key"] for r in tracking.load(tmp_path)] == ["a", "b"]
    tracking.append(record("c"), tmp_path)
    assert [r["key"] for r in tracking.load(tmp_path)] == ["a", "b", "c"]
    assert store.read_text().count("\n") == 3 and not (tmp_path / tracking.REJECTED).exists()


def test_unreadable_lines_in_the_middle_are_skipped_and_reported(tmp_path, caplog):
    store = tmp_path / tracking.STORE
    store.write_text(json.dumps(record("a")) + "\nnot json\n[1, 2]\n" + json.dumps({"key": "c"}) + "\n"
                     + json.dumps(record("b")) + "\n")
    assert [r["key"] for r in tracking.load(tmp_path)] == ["a", "b"]
    assert "skipped 3 line(s) that are not records [2, 3, 4]" in caplog.text


def _append_many(directory, start, count):
    for i in range(start, start + count):
        tracking.append(record(f"k{i}", tag="x" * 5000), directory)


def test_concurrent_writers_never_interleave(tmp_path):
    processes = [multiprocessing.Process(target=_append_many, args=(tmp_path, 100 * p, 25)) for p in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    keys = [r["key"] for r in tracking.load(tmp_path)]
    assert sorted(keys) == sorted(f"k{100 * p + i}" for p in range(4) for i in range(25))
    assert not (tmp_path / tracking.REJECTED).exists()


def _hold_claim(directory, key, ready):
    with tracking.claim(directory, key) as claimed:
        assert claimed
        ready.set()
        time.sleep(600)


def test_a_claim_is_exclusive_and_dies_with_its_holder(tmp_path):
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_claim, args=(tmp_path, "k", ready))
    holder.start()
    assert ready.wait(60)
    with tracking.claim(tmp_path, "k") as claimed:
        assert not claimed  # another live process holds it
    with tracking.claim(tmp_path, "other") as claimed:
        assert claimed
    os.kill(holder.pid, signal.SIGKILL)  # a job killed without any clean-up
    holder.join(60)
    with tracking.claim(tmp_path, "k") as claimed:
        assert claimed


def tiny_job(model_dir, results_dir, *extra):
    return compose_config([f"model.path={model_dir}", f"results_dir={results_dir}", "benchmark.limit=2",
                           "benchmark.tasks=[mqar]", "benchmark.measure.enabled=false", "model.device=cpu", *extra])


def test_a_job_skips_a_key_another_live_job_holds(tiny_mamba2_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = tiny_job(tiny_mamba2_dir, tmp_path / "results", "logger=none", "skip_existing=true")
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_claim, args=(tmp_path / "results", run_key(cfg), ready))
    holder.start()
    try:
        assert ready.wait(60)
        assert runner.run(cfg, run_dir=tmp_path / "run") is None
        assert "another job is running" in caplog.text and tracking.load(tmp_path / "results") == []
    finally:
        holder.kill()
        holder.join(60)
    assert runner.run(cfg, run_dir=tmp_path / "run") is not None  # the claim died with its holder


def test_a_failing_wandb_loses_no_record(tiny_mamba2_dir, tmp_path, monkeypatch, caplog):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("W&B service unreachable")

    monkeypatch.setattr(tracking, "WandbLogger", Broken)
    cfg = tiny_job(tiny_mamba2_dir, tmp_path / "results", "logger=wandb", "logger.mode=offline")
    result = runner.run(cfg, run_dir=tmp_path / "run")
    (stored,) = tracking.load(tmp_path / "results")
    assert stored["run_id"] == result["run_id"] and stored["metrics"]["mqar"]["acc"] == result["metrics"]["mqar"]["acc"]
    assert "W&B logging failed" in caplog.text and "python -m ssmcompress.tracking wandb" in caplog.text


def test_stored_records_can_be_logged_to_wandb_later(tmp_path):
    stored = record("0123456789abcdef", model="m", method="ours", ratio=0.3, benchmark="offline",
                    config={"seed": 0}, headline={"average": 0.5})
    tracking.append(stored, tmp_path / "results")
    assert tracking.main(["wandb", "--results", str(tmp_path / "results"), "--mode", "offline",
                          "--dir", str(tmp_path / "wandb")]) == 0
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_bad_logger_settings_are_refused_before_any_work(tmp_path, monkeypatch):
    from ssmcompress.errors import ConfigError

    monkeypatch.setattr(runner, "prepare", lambda cfg: pytest.fail("work started"))
    with pytest.raises(ConfigError, match="W&B rejects the logger settings.*mode") as error:
        runner.run(compose_config([f"results_dir={tmp_path}", "logger.mode=bogus"]), run_dir=tmp_path / "r")
    assert "\n" not in str(error.value)


def test_wandb_runs_are_named_grouped_and_tagged_per_configuration():
    base = dict(model="mamba2-tiny", benchmark="offline", pruner="none", tag="main", sweep=None)
    dense = tracking.wandb_identity(dict(base, key="1" * 16, method="dense", ratio=None))
    ours = tracking.wandb_identity(dict(base, key="2" * 16, method="ours", ratio=0.3))
    pruned = tracking.wandb_identity(dict(base, key="3" * 16, method="ours", ratio=0.3, pruner="multi",
                                          sparsity="2:4", tag=None, sweep="2026-12-01/10-00-00"))
    assert len({dense["name"], ours["name"], pruned["name"]}) == 3
    assert ours["name"] == "mamba2-tiny-ours-r0.3-22222222" and ours["group"] == "main"
    assert pruned["group"] == "2026-12-01/10-00-00"  # no tag: the sweep's folder
    assert {"model:mamba2-tiny", "method:ours", "ratio:0.3", "pruner:multi", "sparsity:2:4"} <= set(pruned["tags"])
    assert ours["job_type"] == "offline"


def test_the_wandb_config_carries_the_run_key_and_commit(tiny_mamba2_dir, tmp_path, monkeypatch):
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    import wandb
    monkeypatch.setattr(wandb, "init", init)
    cfg = tiny_job(tiny_mamba2_dir, tmp_path / "results", "logger=wandb", "logger.mode=offline", "tag=mine")
    result = runner.run(cfg, run_dir=tmp_path / "run")
    assert seen["config"]["run"]["key"] == result["key"] == run_key(cfg)
    assert seen["config"]["run"]["git"]["commit"] == result["git"]["commit"]
    assert seen["group"] == "mine" and seen["name"].endswith(result["key"][:8])
    assert len(tracking.load(tmp_path / "results")) == 1


def test_random_weights_follow_the_run_seed(tmp_path):
    from ssmcompress.hosts import mamba_ssm

    config = compose_config(["model.random_init=true"]).model.config
    config = {**dict(config), "n_layer": 2, "d_model": 32, "ssm_cfg": dict(config.ssm_cfg)}
    weights = [mamba_ssm.load_model("unused", "cpu", "float32", random_init=True, config=config, seed=seed)
               .backbone.layers[0].mixer.in_proj.weight for seed in (0, 0, 1)]
    assert (weights[0] == weights[1]).all() and not (weights[0] == weights[2]).all()


def test_the_record_says_how_random_weights_were_drawn(tmp_path):
    overrides = ["model.random_init=true", "model.config.n_layer=2", "benchmark=efficiency", "logger=none",
                 f"results_dir={tmp_path}", "benchmark.measure.shape.cpu.length=16", "benchmark.measure.repeats=1",
                 "benchmark.measure.warmup=0", "benchmark.measure.fvcore=false"]
    three = runner.run(compose_config([*overrides, "seed=3"]), run_dir=tmp_path / "run3")
    four = runner.run(compose_config([*overrides, "seed=4"]), run_dir=tmp_path / "run4")
    assert three["model_init"] == dict(random=True, seed=3) and four["model_init"] == dict(random=True, seed=4)
    assert three["key"] != four["key"]
