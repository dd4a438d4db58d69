"""Build the offline benchmark suite (lm-eval task YAMLs + JSONL) deterministically.

    python -m ssmcompress.suite.build            # writes src/ssmcompress/assets/tasks/offline/*.jsonl
    python -m ssmcompress.suite.build --variant offline_full   # the larger variant: tasks/offline_full/*.jsonl

Two variants of the same tasks from the same generators and seeds: `offline` (120-150 documents per task, sized for
the < 1 minute default run) and `offline_full` (every last-word passage the held-out plays have, 449, and 500 of each
other task: standard errors of about 2 points instead of 4, for the sweeps behind the tables). The small variant's
documents are among the large one's. offline_full's YAMLs include offline's and name their own data files.

Tasks (all zero-shot, scored by lm-eval from log-likelihoods):
- shakespeare_lastword: LAMBADA-style. A passage of a held-out play whose last word also occurs earlier in the
  passage; predict that word (acc = greedy match of every token, and perplexity).
- shakespeare_continuation: HellaSwag-style. A passage of a held-out play that stops inside a line; choose the
  line's true ending among four (acc, acc_norm).
- mqar: multi-query associative recall, four choices (acc).
- story_qa: where is a person, after a story with distractor sentences (bAbI-1 style), four choices (acc).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from ssmcompress.suite import corpus, synthetic

TASKS = Path(__file__).resolve().parents[1] / "assets" / "tasks"
TASK_DIR = TASKS / "offline"
SIZES = dict(shakespeare_lastword=120, shakespeare_continuation=120, mqar=150, story_qa=120)  # python run.py < 1 min
VARIANTS = {"offline": SIZES,
            "offline_full": dict(shakespeare_lastword=449, shakespeare_continuation=500, mqar=500, story_qa=500)}
SEEDS = dict(shakespeare_lastword=1, shakespeare_continuation=2, mqar=3, story_qa=4)  # training uses seeds >= 1000
STOPWORDS = set("""a an and are as at be but by for from had has have he her him his i if in is it its me my no
nor not of on or our she so that the thee their them then there they thou thy to us was we were what when which
who will with you your yet this shall than""".split())
WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def lastword_docs(plays: dict[str, str], n: int, seed: int, min_words: int = 90, max_words: int = 160) -> list[dict]:
    """Passages that end on a line's last word, where that word (not a stop word) already occurs earlier."""
    rng = random.Random(seed)
    candidates = []
    for name, text in plays.items():
        lines = text.split("\n")
        for end in range(len(lines)):
            words = WORD.findall(lines[end])  # a spoken line (speaker tags are one or two words)
            if len(words) < 3 or len(words[-1]) < 4 or words[-1].lower() in STOPWORDS:
                continue
            candidates.append((name, end))
    rng.shuffle(candidates)
    docs, used = [], set()
    for name, end in candidates:
        lines = plays[name].split("\n")
        start, count = end, 0
        while start > 0 and count < min_words:
            start -= 1
            count += len(lines[start].split())
        if count < min_words or count > max_words or any((name, i) in used for i in range(start, end + 1)):
            continue
        last_line = lines[end]
        target = WORD.findall(last_line)[-1]
        cut = last_line.rfind(target)
        if not last_line[:cut].endswith(" "):
            continue  # hyphenated compounds ("to-night") have no word boundary to score at
        context = "\n".join(lines[start:end] + [last_line[:cut].rstrip()])
        if not re.search(rf"\b{re.escape(target)}\b", context):
            continue
        context = context.rstrip()
        candidates_in_context = {w for w in WORD.findall(context)}
        docs.append(dict(context=context, target=" " + target, play=name, line=end,
                         chance=1.0 / len(candidates_in_context)))
        used.update((name, i) for i in range(start, end + 1))
        if len(docs) == n:
            break
    return sorted(docs, key=lambda d: (d["play"], d["line"]))


def continuation_docs(plays: dict[str, str], n: int, seed: int, context_words: int = 40) -> list[dict]:
    """HellaSwag's shape: a passage that stops inside a line of a speech, and four endings for that line: its true
    rest and the rests of three lines from far away, of about the same length (as HellaSwag's `ctx_b` + endings).
    Ending a line tests fit to the passage; choosing whole next lines was measured near chance for a tiny model."""
    rng = random.Random(seed)
    lines = [(name, i, line) for name, text in plays.items() for i, line in enumerate(text.split("\n"))]

    def split(line: str) -> tuple[str, str]:  # (head, rest): the line's last third (at least two words) is the rest
        words = line.split()
        cut = len(words) - max(2, len(words) // 3)
        return " ".join(words[:cut]), " ".join(words[cut:])

    speech = [k for k, (_, _, line) in enumerate(lines) if len(line.split()) >= 7]
    cut = {k: split(lines[k][2]) for k in speech}  # every candidate is split once, not once per passage
    rest_words = {k: len(rest.split()) for k, (_, rest) in cut.items()}
    rng.shuffle(speech)
    docs, used = [], set()
    for k in speech:
        name, i, line = lines[k]
        if k < 1 or lines[k - 1][0] != name or not lines[k - 1][2] or lines[k - 1][2].endswith("."):
            continue  # the line must continue a speech already under way (no speaker change)
        start, count = k, 0
        while start > 0 and lines[start - 1][0] == name and count < context_words:
            start -= 1
            count += len(lines[start][2].split())
        if count < context_words or any(j in used for j in range(start, k + 1)):
            continue
        head, rest = cut[k]
        pool = [j for j in speech if abs(j - k) > 400 and rest_words[j] == rest_words[k] and cut[j][1] != rest]
        if len(pool) < 3:
            continue
        choices = [rest] + [cut[j][1] for j in rng.sample(pool, 3)]
        if len(set(choices)) < 4:
            continue
        rng.shuffle(choices)
        context = "\n".join(lines[j][2] for j in range(start, k)) + "\n" + head
        docs.append(dict(context=context, choices=choices, label=choices.index(rest), play=name, line=i))
        used.update(range(start - 2, k + 2))
        if len(docs) == n:
            break
    return sorted(docs, key=lambda d: (d["play"], d["line"]))


def synthetic_docs(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    make = synthetic.mqar if task == "mqar" else synthetic.story
    return [make(rng) for _ in range(n)]


def build(task_dir: Path = TASK_DIR, sizes: dict | None = None) -> dict[str, int]:
    """Write every task's JSONL; returns {task: number of documents}."""
    sizes = {**SIZES, **(sizes or {})}
    _, heldout = corpus.split_plays(corpus.load_plays())
    docs = dict(
        shakespeare_lastword=lastword_docs(heldout, sizes["shakespeare_lastword"], SEEDS["shakespeare_lastword"]),
        shakespeare_continuation=continuation_docs(heldout, sizes["shakespeare_continuation"],
                                                   SEEDS["shakespeare_continuation"]),
        mqar=synthetic_docs("mqar", sizes["mqar"], SEEDS["mqar"]),
        story_qa=synthetic_docs("story_qa", sizes["story_qa"], SEEDS["story_qa"]),
    )
    task_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in docs.items():
        with open(task_dir / f"{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {task: len(rows) for task, rows in docs.items()}


def variant_tasks(task_dir: Path, variant: str, source: Path = TASK_DIR) -> None:
    """For each task of `source`, a YAML in `task_dir` that includes it and reads the variant's JSONL instead (the
    tasks, their names and metrics stay the source's: a variant differs in its data only). The YAMLs name the
    variant's folder beside `source` (assets/tasks/<variant>)."""
    for path in sorted(source.glob("*.yaml")):
        if path.stem not in SIZES:  # the group file and the pruning benchmark's held-out perplexity
            continue
        (task_dir / path.name).write_text(
            f"# {path.stem} with the {variant} data (written by python -m ssmcompress.suite.build)\n"
            f"include: ../{source.name}/{path.name}\n"
            f"dataset_kwargs:\n  data_file: ../{variant}/{path.stem}.jsonl\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="offline")
    parser.add_argument("--out", type=Path, default=None, help="default: src/ssmcompress/assets/tasks/<variant>")
    args = parser.parse_args()
    out = args.out or TASKS / args.variant
    for task, count in build(out, VARIANTS[args.variant]).items():
        print(f"{task}: {count} documents -> {out / (task + '.jsonl')}")
    if args.variant != "offline":
        variant_tasks(out, args.variant)


if __name__ == "__main__":
    main()
