"""Build the offline held-out perplexity task `shakespeare_ppl` (the pruning papers' WikiText-2 perplexity, offline).

    python -m ssmcompress.pruning.perplexity_task   # writes assets/tasks/offline/shakespeare_ppl.jsonl

Documents are passages of the four held-out plays (never used for training or calibration): consecutive speeches
(paragraphs) joined until a passage holds at least `min_words` words, then `count` passages evenly spaced over
all of them. No randomness: the file depends only on the pinned corpus. lm-eval scores each passage with
`loglikelihood_rolling` (word_perplexity, byte_perplexity, bits_per_byte, as its wikitext task).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssmcompress.suite import corpus

TASK_DIR = Path(__file__).resolve().parents[1] / "assets" / "tasks" / "offline"
DATA_FILE = "shakespeare_ppl.jsonl"
COUNT, MIN_WORDS = 64, 200


def passages(plays: dict[str, str], min_words: int = MIN_WORDS) -> list[dict]:
    """Every passage of consecutive speeches with at least `min_words` words, in play and text order."""
    docs = []
    for name, text in plays.items():
        current, words = [], 0
        for paragraph in text.split("\n\n"):
            current.append(paragraph.strip())
            words += len(paragraph.split())
            if words >= min_words:
                docs.append(dict(text="\n\n".join(current), play=name, words=words))
                current, words = [], 0
    return docs


def evenly_spaced(items: list, count: int) -> list:
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def documents(count: int = COUNT, min_words: int = MIN_WORDS) -> list[dict]:
    _, heldout = corpus.split_plays(corpus.load_plays())
    return evenly_spaced(passages(heldout, min_words), count)


def build(task_dir: Path = TASK_DIR, count: int = COUNT, min_words: int = MIN_WORDS) -> Path:
    path = Path(task_dir) / DATA_FILE
    with open(path, "w") as f:
        for doc in documents(count, min_words):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TASK_DIR)
    args = parser.parse_args()
    path = build(args.out)
    print(f"shakespeare_ppl: {sum(1 for _ in open(path))} passages -> {path}")


if __name__ == "__main__":
    main()
