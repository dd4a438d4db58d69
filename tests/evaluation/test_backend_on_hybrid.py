"""The lm-eval backend on the bundled SSM-attention hybrid (a transformers model): its dense scores are lm-eval's own
`hf` backend's on the same checkpoint, and reduced scores and generations do not depend on the batch."""
import pytest

from conftest import compose_config
from ssmcompress import models, reduction
from ssmcompress.config import ASSETS, to_dict
from ssmcompress.evaluation import harness
from ssmcompress.evaluation.lm_backend import ReducedHFLM, backend_for
from ssmcompress.hosts import transformers as hf

HYBRID = ASSETS / "models" / "hybrid-tiny"


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on one thread (conftest.single_thread)."""


@pytest.fixture(scope="module")
def hybrid():
    return hf.load_model(str(HYBRID), "cpu", "float32"), models.load_tokenizer(str(HYBRID))


def benchmark(*overrides):
    return to_dict(compose_config(["model=hybrid-tiny", "benchmark.limit=8", *overrides]).benchmark)


def test_dense_scores_are_lm_evals_own_hf_backend(hybrid):
    from lm_eval import simple_evaluate

    model, tokenizer = hybrid
    assert backend_for(model) is ReducedHFLM
    ours = harness.evaluate(model, tokenizer, benchmark())
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={HYBRID},dtype=float32,device=cpu",
                             tasks=benchmark()["tasks"], task_manager=harness.task_manager(benchmark()["include_path"]),
                             limit=8, batch_size=8, log_samples=True)
    compared = 0
    for task, values in ours.metrics.items():
        for metric, value in values.items():
            if f"{metric},none" in theirs["results"][task]:  # lm-eval's own metrics (ours adds token perplexity)
                assert value == pytest.approx(theirs["results"][task][f"{metric},none"], rel=1e-6), (task, metric)
                compared += 1
        rows = sorted(theirs["samples"][task], key=lambda row: row["doc_id"])
        main = benchmark()["main_metric"][task]
        assert ours.samples[task][main] == pytest.approx([row[main] for row in rows], rel=1e-6), task
    assert compared >= 5


def test_reduced_scores_do_not_depend_on_the_batch(hybrid):
    model, tokenizer = hybrid
    cfg = compose_config(["model=hybrid-tiny", "method=ours", "ratio=0.3"])
    reducer = reduction.from_config(model, cfg, hf.model_info(model))
    try:
        scores = [harness.evaluate(model, tokenizer, benchmark(f"benchmark.batch_size={size}"), reducer=reducer)
                  for size in (1, 8)]
    finally:
        reducer.remove()
    for task, values in scores[0].metrics.items():
        for metric, value in values.items():
            assert scores[1].metrics[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_lm_evals_model_args_build_the_hybrids_backend(monkeypatch):
    import huggingface_hub
    from lm_eval import simple_evaluate

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    output = simple_evaluate(model="ssmcompress", model_args="pretrained=hybrid-tiny,method=ours,ratio=0.3,device=cpu",
                             tasks=["mqar"], limit=4, task_manager=harness.task_manager(benchmark()["include_path"]),
                             batch_size=4, bootstrap_iters=0)
    assert output["config"]["reduction"]["method"] == "ours"
    assert 0 <= output["results"]["mqar"]["acc,none"] <= 1
