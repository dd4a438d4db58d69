"""The training mixture's long rows (suite.long.training_facts spread through filler text): one document per row at
the row's length, every fact in the text before its question, answers weighted, the padding weightless, the filler
from the plays it is given only."""
import random
import re

import numpy as np
import pytest
import torch

from ssmcompress import models
from ssmcompress.config import ASSETS
from ssmcompress.suite import long, synthetic
from ssmcompress.train import Mixture

PLAYS = {"FIRST PLAY": [f"First play, line {i}, with some words of verse." for i in range(400)],
         "SECOND PLAY": [f"Second play, line {i}: more words here." for i in range(400)]}


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(str(ASSETS / "models" / "mamba2-tiny"))


@pytest.fixture(scope="module")
def mixture(tokenizer):
    return Mixture(tokenizer, np.zeros(10, dtype=np.int64), seq_len=1024, text_share=0.0, seed=0, batch_size=4,
                   answer_weight=5.0, long_share=1.0, filler=long.Filler(PLAYS, tokenizer))


def test_training_facts_ask_every_fact_and_answer_from_the_facts():
    rng = random.Random(0)
    shapes = set()
    for _ in range(60):
        facts, pieces, head = long.training_facts(rng)
        answers = [text.strip() for text, is_answer in pieces if is_answer]
        questions = [text for text, is_answer in pieces if not is_answer]
        assert facts and answers
        if facts[0].startswith("The magic number"):
            shapes.add("needles")
            told = [re.match(r"The magic number for (\w+) is (\d+)\.", f).groups() for f in facts]
            for question, answer in zip(questions, answers):
                key = re.search(r"numbers? for (\w+)", question).group(1)
                assert answer == ", ".join(v for k, v in told if k == key)  # every value of the key, in order
            assert len(answers) == len({k for k, _ in told})
        elif facts[0].startswith("Remember: "):
            shapes.add("mqar")
            told = dict(f.removeprefix("Remember: ").rstrip(".").split(" ") for f in facts)
            assert questions[0] == "\nRecall:"
            keys = [q.split(" ")[-1] for q in questions[1:]]
            assert len(keys) == len(answers) and all(told[k] == a for k, a in zip(keys, answers))
        else:
            shapes.add("story")
            assert head == ["Story:"] and len(questions) == len(answers)
            assert all(answer in synthetic.PLACES for answer in answers)
    assert shapes == {"needles", "mqar", "story"}


def test_a_long_row_fills_its_length_with_one_document(mixture, tokenizer):
    rng = random.Random(1)
    for _ in range(12):
        ids, weights = mixture.long_row(rng)
        assert ids.shape == (1025,) and weights.shape == (1024,)
        padding = int((weights == 0).sum())
        assert padding < 32  # the haystack's line counts put the document within a few tokens of the row's length
        assert (ids[-padding:] == tokenizer.eos_token_id).all() if padding else True
        text = tokenizer.decode(ids[: 1025 - padding].tolist())
        assert "line" in text  # filler text from the given plays
        answers = ids[1:][weights == 5.0]
        assert len(answers) > 0
        assert torch.isin(weights[weights > 0], torch.tensor([mixture.format_weight, 5.0])).all()


def test_long_rows_use_only_the_filler_they_are_given(mixture, tokenizer):
    rng = random.Random(2)
    for _ in range(6):
        text = tokenizer.decode(mixture.long_row(rng)[0].tolist())
        filler_lines = [line for line in text.split("\n") if " play, line " in line]
        assert filler_lines and all(line in PLAYS["FIRST PLAY"] + PLAYS["SECOND PLAY"] for line in filler_lines), \
            [line for line in filler_lines if line not in PLAYS["FIRST PLAY"] + PLAYS["SECOND PLAY"]]


def test_long_rows_are_deterministic_given_the_generator(mixture):
    first, second = mixture.long_row(random.Random(3)), mixture.long_row(random.Random(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_the_share_of_long_rows_follows_long_share(tokenizer):
    mixed = Mixture(tokenizer, np.arange(5000, dtype=np.int64) % 4096, seq_len=512, text_share=0.25, seed=0,
                    batch_size=4, long_share=0.5, filler=long.Filler(PLAYS, tokenizer))
    stream = iter(mixed)
    rows = [next(stream)[0] for _ in range(80)]
    with_filler = sum(" play, line " in tokenizer.decode(ids.tolist()) for ids in rows)
    assert 25 <= with_filler <= 55  # about half of 80
