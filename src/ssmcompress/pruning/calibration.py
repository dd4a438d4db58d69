"""Calibration token windows: the offline Shakespeare training plays by default, C4 or WikiText-2 from the hub.

Every source gives `samples` windows of `length` tokens, drawn with a seeded generator:
- shakespeare: the 33 training plays of the offline suite (never the held-out ones), joined as the bundled
  tiny models were trained; windows at random places of the text;
- c4: SparseGPT's loader (first shard of C4's English training split, random documents longer than `length`,
  a random window inside each);
- wikitext2: the raw WikiText-2 training split joined with "\\n\\n" (as SparseGPT's evaluation text), random windows.
"""
from __future__ import annotations

import functools
import random

import torch

from ssmcompress import hub
from ssmcompress.suite import corpus

SOURCES = ("shakespeare", "c4", "wikitext2")
CHARS_PER_TOKEN = 8  # a generous first guess of the characters a window needs (doubled until enough)
SKIP = 8  # tokens dropped at the start of a span, which may begin inside a word
HUB_SOURCES = {"c4": ("allenai/c4", dict(data_files={"train": "en/c4-train.00000-of-01024.json.gz"})),
               "wikitext2": ("Salesforce/wikitext", dict(name="wikitext-2-raw-v1"))}


def require_hub_source(source: str) -> None:
    """The calibration dataset is cached or the hub answers for it (else ConfigError, which is a ValueError)."""
    path, kwargs = HUB_SOURCES[source]
    hub.require_datasets([(path, kwargs.get("name"))], f"calibration source {source!r} (offline alternative: "
                         f"pruner.calibration.source=shakespeare)")


def text_windows(text: str, tokenizer, samples: int, length: int, seed: int) -> torch.Tensor:
    """`samples` windows of `length` tokens at seeded random places of one text, (samples, length).

    Each place is tokenised on its own (a span of characters around it), not the whole text: a few ms instead of
    seconds. The first SKIP tokens of a span are dropped, since the span may start inside a word.
    """
    rng = random.Random(seed)
    windows = []
    for _ in range(samples):
        span = CHARS_PER_TOKEN * (length + 2 * SKIP)
        while True:
            if span >= len(text):
                raise ValueError(f"calibration text has fewer than {length} tokens after a random start")
            start = rng.randrange(0, len(text) - span)
            ids = tokenizer(text[start:start + span], verbose=False)["input_ids"]
            if len(ids) >= length + SKIP:
                break
            span *= 2
        windows.append(torch.tensor(ids[SKIP:SKIP + length]))
    return torch.stack(windows)


def document_windows(documents, tokenizer, samples: int, length: int, seed: int) -> torch.Tensor:
    """SparseGPT's C4 rule: pick random documents until one has more than `length` tokens, take a random window."""
    rng = random.Random(seed)
    windows = []
    for _ in range(samples):
        for _attempt in range(10_000):
            ids = tokenizer(documents[rng.randrange(len(documents))]["text"], verbose=False)["input_ids"]
            if len(ids) > length:
                break
        else:
            raise ValueError(f"no calibration document has more than {length} tokens")
        start = rng.randrange(0, len(ids) - length)
        windows.append(torch.tensor(ids[start:start + length]))
    return torch.stack(windows)


@functools.lru_cache(maxsize=1)  # the pinned corpus never changes within a process (a sweep reads it once)
def shakespeare_text() -> str:
    train, _ = corpus.split_plays(corpus.load_plays())
    return "\n\n".join(train.values())


def hub_dataset(source: str):
    require_hub_source(source)
    import datasets

    path, kwargs = HUB_SOURCES[source]
    return datasets.load_dataset(path, split="train", **kwargs)


def windows(source: str, tokenizer, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """The calibration batch (samples, length) of token ids."""
    if source not in SOURCES:
        raise ValueError(f"unknown calibration source {source!r}: use one of {', '.join(SOURCES)}")
    if source == "shakespeare":
        return text_windows(shakespeare_text(), tokenizer, samples, length, seed)
    data = hub_dataset(source)
    if source == "c4":
        return document_windows(data, tokenizer, samples, length, seed)
    return text_windows("\n\n".join(data["text"]), tokenizer, samples, length, seed)
