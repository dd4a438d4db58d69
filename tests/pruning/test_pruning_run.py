"""from_config on tiny models (sparsity 0 is bit-identical, patterns and the record section, save and reload) and
one full run through the runner with held-out perplexity."""
import math

import pytest
import torch

from conftest import TOKENIZER_DIR, compose_config, save_tiny
from ssmcompress import models, pruning, runner, tracking
from ssmcompress.hosts import mamba_ssm
from ssmcompress.pruning.masks import follows_nm
from pruning_fixtures import one_thread  # noqa: F401

QUICK = ["pruner.calibration.samples=4", "pruner.calibration.length=32", "pruner.calibration.batch_size=2"]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(str(TOKENIZER_DIR))


def prune(model_dir, tokenizer, name, sparsity, *overrides):
    quick = QUICK if name != "magnitude" else []
    cfg = compose_config([f"model.path={model_dir}", "logger=none", f"pruner={name}", f"sparsity={sparsity}",
                          *quick, *overrides])
    pruning.check_config(cfg, mamba_ssm.load_config(str(model_dir)))
    model = mamba_ssm.load_model(str(model_dir), "cpu", "float32")
    return model, pruning.from_config(model, tokenizer, cfg)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "multi"])
def test_sparsity_zero_leaves_the_model_bit_identical(tiny_mamba2_dir, tokenizer, name):
    before = state(mamba_ssm.load_model(str(tiny_mamba2_dir), "cpu", "float32"))
    model, summary = prune(tiny_mamba2_dir, tokenizer, name, 0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert summary["achieved_sparsity"] == 0.0 and summary["sparsity"] == "0"


@pytest.mark.parametrize("name,sparsity", [("wanda", "2:4"), ("sparsegpt", "4:8"), ("multi", "2:4"),
                                           ("multi", "0.5"), ("magnitude", "0.5")])
def test_pruned_layers_and_the_record_section(tiny_mamba2_dir, tokenizer, name, sparsity):
    before = state(mamba_ssm.load_model(str(tiny_mamba2_dir), "cpu", "float32"))
    model, summary = prune(tiny_mamba2_dir, tokenizer, name, sparsity)
    assert summary["pruner"] == name and summary["sparsity"] == sparsity
    assert summary["targets"] == ["in_proj", "out_proj"]
    assert len(summary["layers"]) == 2 * 4 and summary["achieved_sparsity"] == pytest.approx(0.5)
    assert 0 < summary["model_fraction"] < summary["achieved_sparsity"]
    assert summary["seconds"]["total"] > 0 and summary["saved_to"] is None
    if name == "magnitude":
        assert summary["calibration"] is None and summary["mean_error"] is None
    else:
        assert summary["calibration"] == dict(source="shakespeare", samples=4, length=32, seed=0, batch_size=2,
                                              tokens=128)
        assert 0 < summary["mean_error"] < 1
    after = model.state_dict()
    for key, value in after.items():
        layer = key.removesuffix(".weight")
        if layer in summary["layers"]:
            report = summary["layers"][layer]
            assert report["sparsity"] == pytest.approx(0.5) and report["zeros"] == int((value == 0).sum())
            if ":" in sparsity:
                n, m = map(int, sparsity.split(":"))
                assert follows_nm(value, n, m)
        else:  # conv1d, A_log, D, dt_bias, norms, embeddings: untouched
            assert torch.equal(before[key], value), key


def test_mamba1_every_target(tiny_mamba1_dir, tokenizer):
    model, summary = prune(tiny_mamba1_dir, tokenizer, "multi", "2:4",
                           "pruner.targets=[in_proj,x_proj,dt_proj,out_proj]")
    assert summary["targets"] == ["in_proj", "x_proj", "dt_proj", "out_proj"] and len(summary["layers"]) == 16
    assert all(r["sparsity"] == 0.5 and r["error"] is not None for r in summary["layers"].values())
    assert follows_nm(model.backbone.layers[2].mixer.dt_proj.weight, 2, 4)


def test_saved_pruned_model_reloads_bit_identical(tiny_mamba2_dir, tokenizer, tmp_path):
    model, summary = prune(tiny_mamba2_dir, tokenizer, "sparsegpt", "0.5", f"pruner.save_dir={tmp_path / 'pruned'}")
    assert summary["saved_to"] == str(tmp_path / "pruned")
    reloaded = mamba_ssm.load_model(summary["saved_to"], "cpu", "float32")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert models.load_tokenizer(summary["saved_to"]).vocab_size == tokenizer.vocab_size
    layer = reloaded.backbone.layers[1].mixer.out_proj.weight
    assert (layer == 0).float().mean() == 0.5


def test_runner_prunes_then_evaluates_held_out_perplexity(tmp_path):
    model_dir = save_tiny(tmp_path / "model", 2, seed=1)
    overrides = [f"model.path={model_dir}", f"results_dir={tmp_path / 'results'}", "logger=none", "model.device=cpu",
                 "benchmark=pruning", "benchmark.limit=3", "benchmark.measure.repeats=1", "pruner=multi",
                 "sparsity=2:4", *QUICK, f"pruner.save_dir={tmp_path / 'pruned'}"]
    record = runner.run(compose_config(overrides), run_dir=tmp_path / "run")
    stored = tracking.load(tmp_path / "results")[0]
    assert stored["pruner"] == "multi" and stored["sparsity"] == "2:4" and "prune_s" in stored["timings"]
    assert stored["pruning"]["achieved_sparsity"] == 0.5 and stored["pruning"]["saved_to"] == str(tmp_path / "pruned")
    assert record["metrics"]["shakespeare_ppl"]["word_perplexity"] > 1
    headline = record["headline"]
    assert "shakespeare_ppl" not in headline and headline["shakespeare_ppl/word_perplexity"] > 1
    accuracies = [headline[t] for t in ("shakespeare_lastword", "shakespeare_continuation", "mqar", "story_qa")]
    assert headline["average"] == pytest.approx(sum(accuracies) / 4)
    # the saved model is a model source like any other
    dense = runner.run(compose_config([f"model.path={tmp_path / 'pruned'}", f"results_dir={tmp_path / 'r2'}",
                                       "logger=none", "model.device=cpu", "benchmark=pruning",
                                       "benchmark.tasks=[shakespeare_ppl]", "benchmark.limit=3"]),
                       run_dir=tmp_path / "run2")
    assert dense["metrics"]["shakespeare_ppl"] == pytest.approx(record["metrics"]["shakespeare_ppl"])


def test_headline_skips_tasks_without_a_main_metric():
    """#8's held-out perplexity task has no accuracy: its perplexities are extra columns, not part of the average."""
    from ssmcompress.evaluation import harness

    benchmark = dict(tasks=["ppl", "a", "b"], main_metric={"a": "acc", "b": "acc_norm"},
                     extra_metrics={"ppl": ["word_perplexity"], "a": ["perplexity"]})
    metrics = {"ppl": {"word_perplexity": 40.0}, "a": {"acc": 0.5, "perplexity": 9.0}, "b": {"acc_norm": 0.25}}
    assert harness.headline(metrics, benchmark) == {"ppl/word_perplexity": 40.0, "a": 0.5, "a/perplexity": 9.0,
                                                    "b": 0.25, "average": 0.375}
    only_ppl = harness.headline({"ppl": {"word_perplexity": 40.0}}, {**benchmark, "tasks": ["ppl"]})
    assert only_ppl["ppl/word_perplexity"] == 40.0 and "ppl" not in only_ppl and math.isnan(only_ppl["average"])
