"""Calibration windows (offline by default, hub sources fail fast) and the held-out perplexity task's data."""
import json

import pytest
import torch

from conftest import TOKENIZER_DIR
from ssmcompress import models
from ssmcompress.pruning import calibration, perplexity_task
from ssmcompress.suite import corpus
from pruning_fixtures import one_thread  # noqa: F401


def test_text_windows_are_seeded_token_windows_of_the_text():
    tokenizer = models.load_tokenizer(str(TOKENIZER_DIR))
    text = " ".join(f"word{i}" for i in range(3000))
    a = calibration.text_windows(text, tokenizer, 5, 16, seed=0)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, calibration.text_windows(text, tokenizer, 5, 16, seed=0))
    assert not torch.equal(a, calibration.text_windows(text, tokenizer, 5, 16, seed=1))
    assert all(tokenizer.decode(row[1:-1]) in text for row in a)  # contiguous text
    with pytest.raises(ValueError, match="fewer than 16 tokens"):
        calibration.text_windows("too short", tokenizer, 1, 16, seed=0)


def test_shakespeare_calibration_uses_the_training_plays_only():
    tokenizer = models.load_tokenizer(str(TOKENIZER_DIR))
    windows = calibration.windows("shakespeare", tokenizer, 3, 64, seed=0)
    assert windows.shape == (3, 64) and windows.dtype == torch.long
    train, heldout = corpus.split_plays(corpus.load_plays())
    text = tokenizer.decode(windows[0][8:40])  # inner tokens decode to text of one training play
    assert any(text in play for play in train.values())
    assert not any(text in play for play in heldout.values())


def test_hub_sources_fail_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="needs the datasets allenai/c4, but offline mode is set"):
        calibration.windows("c4", None, 1, 8)
    with pytest.raises(ValueError, match="unknown calibration source"):
        calibration.windows("pile", None, 1, 8)


def test_perplexity_task_is_rebuilt_byte_for_byte(tmp_path):
    path = perplexity_task.build(tmp_path)
    bundled = perplexity_task.TASK_DIR / perplexity_task.DATA_FILE
    assert path.read_bytes() == bundled.read_bytes()
    docs = [json.loads(line) for line in bundled.read_text().splitlines()]
    _, heldout = corpus.split_plays(corpus.load_plays())
    assert len(docs) == perplexity_task.COUNT
    assert all(doc["words"] >= perplexity_task.MIN_WORDS and doc["play"] in heldout for doc in docs)
    assert all(doc["text"].split("\n\n")[0] in heldout[doc["play"]] for doc in docs)
    assert len({doc["play"] for doc in docs}) == len(heldout)
