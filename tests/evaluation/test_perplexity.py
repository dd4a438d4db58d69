"""WikiText-2 / PTB / C4 perplexity by SparseGPT's protocol (evaluation/perplexity.py; its equality with SparseGPT's
own `opt_eval` is in tests/pruning/test_pruning_official.py), and its path through the harness."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TOKENIZER_DIR, compose_config
from hf_fixtures import tiny_hf_model
from ssmcompress import hub
from ssmcompress.hosts import transformers as hf
from ssmcompress.config import ConfigError, to_dict
from ssmcompress.evaluation import harness, perplexity

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


def test_windows_are_disjoint_and_drop_the_remainder():
    windows = perplexity.token_windows(list(range(50)), 16)
    assert windows.tolist() == [list(range(16)), list(range(16, 32)), list(range(32, 48))]
    assert perplexity.token_windows(list(range(50)), 16, max_windows=2).shape == (2, 16)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity.token_windows(list(range(10)), 16)


def test_perplexity_is_the_exp_of_the_mean_window_loss(single_thread):
    model = tiny_hf_model("llama")
    windows = torch.randint(1, 4096, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[None]).logits[0, :-1], w[1:]) for w in windows]
    expected = math.exp(torch.stack(losses).mean().item())
    assert perplexity.perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-6)
    assert perplexity.perplexity(model, windows, batch_size=5) == pytest.approx(expected, rel=1e-6)


def test_the_harness_scores_corpora_without_lm_eval(monkeypatch, single_thread):
    monkeypatch.setattr(perplexity, "test_text", lambda corpus: TEXT)
    tokenizer = hf.load_tokenizer(str(TOKENIZER_DIR))
    benchmark = to_dict(compose_config(["benchmark=perplexity", "benchmark.seqlen=32"]).benchmark)
    model = tiny_hf_model("opt")
    metrics = harness.evaluate(model, tokenizer, benchmark).metrics
    ids = tokenizer(TEXT)["input_ids"]
    assert set(metrics) == {"wikitext2", "ptb", "c4"}
    assert metrics["wikitext2"]["windows"] == len(ids) // 32 and metrics["ptb"]["seqlen"] == 32
    row = harness.headline(metrics, benchmark)
    assert row["c4/perplexity"] == metrics["c4"]["perplexity"] > 1 and math.isnan(row["average"])


def test_the_perplexity_benchmark_needs_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "datasets_cache", lambda: Path("/nonexistent"))
    with pytest.raises(ConfigError, match="benchmark perplexity needs the datasets"):
        harness.check_config(compose_config(["benchmark=perplexity"]))
