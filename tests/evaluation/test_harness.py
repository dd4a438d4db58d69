"""Benchmarks: the paper's six tasks as configured, the datasets check before any work, the harness end to end."""
import time
from pathlib import Path

import pytest
import yaml

from conftest import TOKENIZER_DIR, compose_config, tiny_model
from evaluation.fake_reducer import DropTokens
from ssmcompress import models, runner, tracking
from ssmcompress.config import ConfigError, to_dict
from ssmcompress.evaluation import harness

LM_EVAL_TASK_FILES = {"lambada_openai": "lambada/lambada_openai.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                      "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml",
                      "arc_challenge": "arc/arc_challenge.yaml", "winogrande": "winogrande/default.yaml"}


def lm_eval_task(name: str) -> dict:
    """lm-eval's own YAML for a task, with `include` resolved (enough for these six)."""
    import lm_eval

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    path = Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_TASK_FILES[name]
    config = yaml.load(path.read_text(), Loader=Loader)
    if "include" in config:
        config = {**yaml.load((path.parent / config["include"]).read_text(), Loader=Loader), **config}
    return config


def test_paper6_is_the_papers_six_tasks_with_their_metrics_and_datasets():
    benchmark = to_dict(compose_config(["benchmark=paper6"]).benchmark)
    assert benchmark["tasks"] == list(LM_EVAL_TASK_FILES)
    assert benchmark["main_metric"] == {"lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc",
                                        "arc_easy": "acc", "arc_challenge": "acc_norm", "winogrande": "acc"}
    assert benchmark["extra_metrics"] == {"lambada_openai": ["perplexity"]}
    for task in benchmark["tasks"]:
        lm_eval_config = lm_eval_task(task)
        assert lm_eval_config["task"] == task
        assert benchmark["datasets"][task] == lm_eval_config["dataset_path"]  # what the pinned lm-eval loads
        reported = {m["metric"] for m in lm_eval_config["metric_list"]}
        assert benchmark["main_metric"][task] in reported
        assert set(benchmark["extra_metrics"].get(task, [])) <= reported


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(harness, "datasets_cache", lambda: tmp_path / "datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    switched = []
    monkeypatch.setattr(harness, "use_cached_datasets_only", lambda: switched.append(True))
    return tmp_path / "datasets", switched


def test_missing_hub_datasets_fail_fast_with_what_to_do(no_hub, tiny_mamba2_dir, tmp_path):
    cfg = compose_config(["benchmark=paper6", f"model.path={tiny_mamba2_dir}", "logger=none",
                          f"results_dir={tmp_path}/results"])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        runner.run(cfg, run_dir=tmp_path / "run")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "\n" not in message and "EleutherAI/lambada_openai" in message and "Rowan/hellaswag" in message
    assert "hub access" in message and "benchmark=offline" in message
    assert not tracking.load(tmp_path / "results")


def test_cached_datasets_are_used_offline(no_hub):
    cache, switched = no_hub
    benchmark = dict(name="two", datasets={"a": "org/one", "b": "org/two"})
    with pytest.raises(ConfigError, match="org/two"):
        harness.check_datasets(benchmark)
    for name in ("org___one", "org___two"):
        (cache / name / "default" / "0.0.0" / "abc123").mkdir(parents=True)
    harness.check_datasets(benchmark)
    assert switched == [True]


def test_benchmarks_without_hub_datasets_need_no_check(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: pytest.fail("the hub was contacted"))
    harness.check_datasets(to_dict(compose_config([]).benchmark))


@pytest.fixture(scope="module")
def offline_benchmark():
    benchmark = to_dict(compose_config(["benchmark.limit=3"]).benchmark)
    return benchmark


def test_harness_scores_a_reduced_model_exactly_where_nothing_kept_changes(offline_benchmark, tmp_path):
    # tokens removed after the last block leave every kept position's logits as they were: same metrics
    model, tokenizer = tiny_model(2, seed=2), models.load_tokenizer(str(TOKENIZER_DIR))
    dense = harness.evaluate(model, tokenizer, offline_benchmark, samples_dir=tmp_path / "dense")
    reducer = DropTokens(model, layer=model.config.n_layer - 1, count=2)
    reduced = harness.evaluate(model, tokenizer, offline_benchmark, reducer=reducer, protocol="exact",
                               samples_dir=tmp_path / "reduced")
    assert reducer.calls > 0
    for task, values in dense.items():
        for metric, value in values.items():
            assert reduced[task][metric] == pytest.approx(value, rel=1e-4)
    for task in offline_benchmark["tasks"]:
        assert len((tmp_path / "reduced" / f"samples_{task}.jsonl").read_text().splitlines()) == 3


def test_headline_averages_the_main_metric_of_each_task(offline_benchmark):
    metrics = {task: {"acc": 0.5, "acc_norm": 0.25, "perplexity": 9.0} for task in offline_benchmark["tasks"]}
    row = harness.headline(metrics, offline_benchmark)
    expected = [metrics[t][offline_benchmark["main_metric"][t]] for t in offline_benchmark["tasks"]]
    assert row["average"] == pytest.approx(sum(expected) / len(expected))
    assert row["shakespeare_lastword/perplexity"] == 9.0
