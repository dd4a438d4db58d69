"""Benchmarks: the paper's six tasks as configured, the datasets check before any work, the harness end to end."""
import math
from pathlib import Path

import pytest
import yaml

from conftest import TOKENIZER_DIR, compose_config, tiny_model
from evaluation.fake_reducer import DropTokens
from ssmcompress import hub, models, runner, tracking
from ssmcompress.hosts import mamba_ssm
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
        # what the pinned lm-eval loads: dataset and config
        assert benchmark["datasets"][task] == [lm_eval_config["dataset_path"], lm_eval_config.get("dataset_name")]
        reported = {m["metric"] for m in lm_eval_config["metric_list"]}
        assert benchmark["main_metric"][task] in reported
        assert set(benchmark["extra_metrics"].get(task, [])) <= reported


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """The hub cannot be reached (offline mode), and the datasets cache is an empty folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "datasets_cache", lambda: tmp_path / "datasets")
    return tmp_path / "datasets"


def cache_dataset(cache, path: str, name: str | None):
    (cache / path.replace("/", "___") / (name or "default") / "0.0.0" / "abc123").mkdir(parents=True)


def test_missing_hub_datasets_fail_before_any_work_with_what_to_do(no_hub, tiny_mamba2_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "prepare", lambda cfg: pytest.fail("work started"))
    cfg = compose_config(["benchmark=paper6", f"model.path={tiny_mamba2_dir}", "logger=none",
                          f"results_dir={tmp_path}/results"])
    with pytest.raises(ConfigError) as error:
        runner.run(cfg, run_dir=tmp_path / "run")
    message = str(error.value)
    assert "\n" not in message and "EleutherAI/lambada_openai (default)" in message and "Rowan/hellaswag" in message
    assert "offline mode" in message and "hub access" in message and "benchmark=offline" in message
    assert not tracking.load(tmp_path / "results")


def test_each_dataset_config_a_task_needs_is_checked(no_hub):
    """ARC-Easy cached is not ARC-Challenge cached: the check goes by (dataset, config)."""
    benchmark = compose_config(["benchmark=paper6", "benchmark.tasks=[arc_easy,arc_challenge]"])
    cache_dataset(no_hub, "allenai/ai2_arc", "ARC-Easy")
    with pytest.raises(ConfigError, match=r"needs the datasets allenai/ai2_arc \(ARC-Challenge\), but offline"):
        harness.check_config(benchmark)
    cache_dataset(no_hub, "allenai/ai2_arc", "ARC-Challenge")
    harness.check_config(benchmark)


def test_cached_datasets_switch_a_process_without_hub_to_offline_mode(no_hub, monkeypatch):
    switched = []
    monkeypatch.setattr(hub, "use_cached_datasets_only", lambda: switched.append(True))
    with pytest.raises(ConfigError, match="org/two"):
        hub.require_datasets([("org/one", None), ("org/two", None)], "two")
    for name in ("org/one", "org/two"):
        cache_dataset(no_hub, name, None)
    hub.require_datasets([("org/one", None), ("org/two", None)], "two")
    assert switched == [True]


def test_benchmarks_without_hub_datasets_ask_no_hub(monkeypatch):
    monkeypatch.setattr(hub, "probe", lambda *args, **kwargs: pytest.fail("the hub was contacted"))
    harness.check_config(compose_config([]))


def test_tasks_lm_eval_does_not_know_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="lm-eval knows no task, group or tag 'nope'.*mqar"):
        harness.check_config(compose_config(["benchmark.tasks=[mqar,nope]"]))


def test_a_task_whose_data_file_is_missing_is_refused(tmp_path):
    import shutil

    tasks = tmp_path / "tasks"
    shutil.copytree(Path(to_dict(compose_config([]).benchmark)["include_path"]), tasks)
    (tasks / "mqar.jsonl").unlink()
    with pytest.raises(ConfigError, match="task mqar: data file .*mqar.jsonl does not exist"):
        harness.check_config(compose_config([f"benchmark.include_path={tasks}", "benchmark.tasks=[mqar]"]))


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
    for task, values in dense.metrics.items():
        for metric, value in values.items():
            assert reduced.metrics[task][metric] == pytest.approx(value, rel=1e-4)
    for task in offline_benchmark["tasks"]:
        assert len((tmp_path / "reduced" / f"samples_{task}.jsonl").read_text().splitlines()) == 3
        main = offline_benchmark["main_metric"][task]
        # per-document values of the main metric, in document order, averaging to lm-eval's own figure
        assert reduced.samples[task]["doc_id"] == [0, 1, 2]
        assert sum(reduced.samples[task][main]) / 3 == pytest.approx(reduced.metrics[task][main])
        assert reduced.stderr[task][main] is not None and reduced.stderr[task][main] >= 0


def test_token_perplexity_is_the_per_token_form_of_lm_evals_word_perplexity(offline_benchmark):
    model, tokenizer = tiny_model(2, seed=2), models.load_tokenizer(str(TOKENIZER_DIR))
    result = harness.evaluate(model, tokenizer, {**offline_benchmark, "tasks": ["shakespeare_lastword"]})
    lastword = result.metrics["shakespeare_lastword"]
    logliks = result.samples["shakespeare_lastword"]["perplexity"]  # each target word's log-likelihood
    assert lastword["perplexity"] == pytest.approx(math.exp(-sum(logliks) / len(logliks)))
    tokens = lastword["perplexity"] ** (1 / 1.0)
    assert 1 < lastword["token_perplexity"] < tokens  # a word has one or more tokens
    assert result.stderr["shakespeare_lastword"]["token_perplexity"] > 0


def test_headline_averages_the_main_metric_of_each_task(offline_benchmark):
    metrics = {task: {"acc": 0.5, "acc_norm": 0.25, "perplexity": 9.0, "token_perplexity": 3.0}
               for task in offline_benchmark["tasks"]}
    row = harness.headline(metrics, offline_benchmark)
    expected = [metrics[t][offline_benchmark["main_metric"][t]] for t in offline_benchmark["tasks"]]
    assert row["average"] == pytest.approx(sum(expected) / len(expected))
    assert row["shakespeare_lastword/perplexity"] == 9.0


@pytest.mark.parametrize("name", ["mamba2-tiny", "hybrid-tiny"])
def test_generation_tasks_run_with_reduction_and_do_not_depend_on_the_batch(single_thread, name):
    """benchmark=offline_gen: MQAR and story QA answered by lm-eval's generate_until, through the reducer's prefill
    (mamba-ssm's decoding for the bundled Mamba-2, transformers' generate for the bundled hybrid)."""
    from ssmcompress import hosts, reduction

    cfg = compose_config([f"model={name}", "benchmark=offline_gen", "benchmark.limit=6", "method=ours", "ratio=0.3"])
    host = hosts.of(cfg.model)
    model, tokenizer = host.load_model(cfg.model.path, "cpu", "float32"), models.load_tokenizer(cfg.model.tokenizer)
    reducer = reduction.from_config(model, cfg, host.model_info(model))
    try:
        scores = [harness.evaluate(model, tokenizer, {**to_dict(cfg.benchmark), "batch_size": size}, reducer=reducer)
                  for size in (1, 6)]
    finally:
        reducer.remove()
    assert scores[0].metrics == scores[1].metrics
    assert set(scores[0].metrics) == {"mqar_gen", "story_qa_gen"}
    assert scores[0].samples["mqar_gen"]["doc_id"] == list(range(6))
    assert reducer.describe()["observed"]["achieved_ratio"] > 0.25


def test_ruler_is_lm_evals_own_tasks_given_the_models_tokenizer_and_the_lengths():
    """benchmark=ruler names lm-eval's RULER tasks; the harness hands them the benchmark's metadata with the model's
    tokenizer (by name, as lm-eval's command line passes model_args), which RULER's generators load."""
    cfg = compose_config(["benchmark=ruler"])
    benchmark = to_dict(cfg.benchmark)
    tokenizer = models.load_tokenizer(str(TOKENIZER_DIR))
    metadata = harness.task_metadata(benchmark, tokenizer)
    assert yaml.safe_load(metadata) == {"max_seq_lengths": [4096, 8192], "tokenizer": str(TOKENIZER_DIR)}
    manager = harness.task_manager(None, metadata)  # lm-eval's whole index, as the evaluation builds it
    assert set(benchmark["tasks"]) <= set(manager.all_tasks) and manager.metadata["max_seq_lengths"] == [4096, 8192]
    given = dict(benchmark, metadata={"tokenizer": "EleutherAI/gpt-neox-20b", "max_seq_lengths": [1024]})
    assert yaml.safe_load(harness.task_metadata(given, tokenizer))["tokenizer"] == "EleutherAI/gpt-neox-20b"
    assert harness.task_metadata(to_dict(compose_config([]).benchmark), tokenizer) is None  # offline: none


def test_longbench_is_lm_evals_own_longbench_e():
    """benchmark=longbench names lm-eval's LongBench-E tasks (the subset LongMamba evaluates), each scored by its
    `score`, found in lm-eval's index without a download."""
    benchmark = to_dict(compose_config(["benchmark=longbench"]).benchmark)
    manager = harness.task_manager(None, None)
    assert set(benchmark["tasks"]) <= set(manager.all_tasks)
    assert set(benchmark["main_metric"]) == set(benchmark["tasks"]) and set(benchmark["main_metric"].values()) == {"score"}
    assert len(benchmark["tasks"]) == 13 and all(task.endswith("_e") for task in benchmark["tasks"])
