"""lm-eval's own Python API and command line with the `ssmcompress` model built from string model_args: the same
model, reducer and scores as the main job's path."""
import subprocess
import sys

import pytest

import ssmcompress  # noqa: F401  (registers the lm-eval model)
from conftest import compose_config
from ssmcompress import lmeval, runner
from ssmcompress.config import REPO, to_dict
from ssmcompress.errors import ConfigError
from ssmcompress.evaluation import harness

TASKS = str(REPO / "src" / "ssmcompress" / "assets" / "tasks" / "offline")


def test_model_args_become_the_main_jobs_overrides():
    assert lmeval.overrides_from_args(dict(pretrained="mamba2-tiny", method="ours", ratio=0.3, layers="[2;5;8]",
                                           dtype="float32", sparsity="2:4", pruner="wanda")) == [
        "model=mamba2-tiny", "method=ours", "ratio=0.3", "layers=[2,5,8]", "model.dtype=float32", "sparsity=2:4",
        "pruner=wanda", "logger=none"]
    assert lmeval.overrides_from_args(dict(pretrained="/data/m", **{"method.q": 0.8}))[:3] == [
        "model=local", "model.path=/data/m", "method.q=0.8"]
    assert "model.tokenizer=EleutherAI/gpt-neox-20b" in lmeval.overrides_from_args(dict(pretrained="org/hub-model"))
    with pytest.raises(ConfigError, match="unknown model_args key 'ratoi'"):
        lmeval.overrides_from_args(dict(pretrained="mamba2-tiny", ratoi=0.3))
    with pytest.raises(ConfigError, match="need pretrained="):
        lmeval.overrides_from_args(dict(method="ours"))


def test_bad_model_args_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="method=ours needs ratio"):
        lmeval.SsmcompressLM.create_from_arg_string("pretrained=mamba2-tiny,method=ours")
    with pytest.raises(ConfigError, match="model_args: .*nope"):
        lmeval.SsmcompressLM.create_from_arg_string("pretrained=mamba2-tiny,method=nope,ratio=0.3")


def test_simple_evaluate_with_model_args_scores_as_the_main_job(tiny_mamba2_dir, monkeypatch):
    import huggingface_hub
    from lm_eval import simple_evaluate

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    args = f"pretrained={tiny_mamba2_dir},method=ours,ratio=0.3,device=cpu"
    output = simple_evaluate(model="ssmcompress", model_args=args, tasks=["mqar", "story_qa"], limit=6,
                             task_manager=harness.task_manager(TASKS), batch_size=4, bootstrap_iters=0)
    cfg = compose_config(["model=local", f"model.path={tiny_mamba2_dir}", "method=ours", "ratio=0.3",
                          "model.device=cpu", "benchmark.limit=6", "benchmark.tasks=[mqar,story_qa]",
                          "benchmark.batch_size=4"])
    prepared = runner.prepare(cfg)
    expected = harness.evaluate(prepared.model, prepared.tokenizer, to_dict(cfg.benchmark),
                                reducer=prepared.reducer).metrics
    for task in ("mqar", "story_qa"):
        assert output["results"][task]["acc,none"] == expected[task]["acc"]
    assert output["config"]["model_source"] == str(tiny_mamba2_dir)
    assert output["config"]["reduction"]["method"] == "ours"


def test_the_lm_eval_command_line_runs_our_model():
    command = [sys.executable, "-m", "ssmcompress.lmeval", "--model", "ssmcompress", "--model_args",
               "pretrained=mamba2-tiny,method=evit,ratio=0.2,device=cpu", "--tasks", "mqar", "--include_path",
               TASKS, "--limit", "4", "--batch_size", "4"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mqar" in result.stdout and "acc" in result.stdout


def test_lm_evals_default_device_falls_back_as_its_hf_backend_does():
    # lm-eval's command line passes cuda:0; its hf backend takes a device index the machine lacks as "the best there is"
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"
    assert lmeval.lm_eval_device(missing) == "auto"
    assert lmeval.lm_eval_device("cuda") == "cuda" and lmeval.lm_eval_device("cpu") == "cpu"
