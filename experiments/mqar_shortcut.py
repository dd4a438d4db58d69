"""Can the suite's MQAR be answered without the pairs? Its wrong choices are values of pairs that the recall list
repeats (every pair but the scored one is recalled), so the answer is the one choice the recall list lacks. This
scores the bundled models' dense multiple choice (the log-likelihood of each choice after the context, as lm-eval
scores it) on the offline suite's MQAR with the whole context and with the recall list alone, counts the documents
that elimination from the recall list answers, and scores the long suite's MQAR, whose wrong choices come from pairs
the recall list does not repeat (ssmcompress.suite.synthetic.mqar, `unrecalled`).

    python experiments/mqar_shortcut.py results/mqar_shortcut.json

Writes one JSON object: per model, the accuracies and counts below.
"""
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ssmcompress.config import REPO
from ssmcompress.hosts import mamba_ssm
from ssmcompress.models import load_tokenizer
from ssmcompress.suite import long

ASSETS = REPO / "src" / "ssmcompress" / "assets"
MODELS = ("mamba2-tiny", "mamba-tiny")
LONG_TASKS = ("mqar_long_1024", "mqar_long_2048")


def choice_scores(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | context) per choice, the context and the continuation tokenized apart (as lm-eval)."""
    head = tokenizer(context)["input_ids"]
    scores = []
    for choice in choices:
        tail = tokenizer(" " + choice)["input_ids"]
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            logp = model(ids).logits[0, len(head) - 1:-1].float().log_softmax(-1)
        scores.append(float(logp.gather(1, torch.tensor(tail)[:, None]).sum()))
    return scores


def accuracy(model, tokenizer, docs: list[dict], text, label: str) -> float:
    right = sum(max(range(len(d["choices"])), key=choice_scores(model, tokenizer, text(d), d["choices"]).__getitem__)
                == d["label"] for d in tqdm(docs, desc=label, leave=False))
    return right / len(docs)


def recall_part(doc: dict) -> str:
    """ "Recall: k v. k v. ... key": the long suite's `question`, the text after the offline context's pairs."""
    return doc["question"] if "question" in doc else doc["context"].split("\n", 1)[1]


def by_elimination(doc: dict) -> bool:
    """The answer is the only choice whose value the recall list does not hold."""
    held = set(recall_part(doc).replace(".", " ").split())
    missing = [i for i, choice in enumerate(doc["choices"]) if choice not in held]
    return missing == [doc["label"]]


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    offline = [json.loads(line) for line in (ASSETS / "tasks" / "offline_full" / "mqar.jsonl").read_text().splitlines()]
    lines = long.haystack(ASSETS / "tasks" / "long")
    long_docs = {}
    for task in LONG_TASKS:
        docs = [json.loads(line) for line in (ASSETS / "tasks" / "long" / f"{task}.jsonl").read_text().splitlines()]
        long_docs[task] = [dict(doc, context=long.expand(doc["segments"], lines) + doc["question"]) for doc in docs]
    report = dict(offline_documents=len(offline),
                  offline_answered_by_elimination=sum(map(by_elimination, offline)),
                  long_answered_by_elimination={task: sum(map(by_elimination, docs)) for task, docs in long_docs.items()},
                  models={})
    for name in MODELS:
        path = str(ASSETS / "models" / name)
        model = mamba_ssm.load_model(path, "cpu", "float32", False).eval()
        tokenizer = load_tokenizer(path)
        report["models"][name] = dict(
            offline_full_context=accuracy(model, tokenizer, offline, lambda d: d["context"], f"{name} full"),
            offline_recall_only=accuracy(model, tokenizer, offline, recall_part, f"{name} recall only"),
            long={task: accuracy(model, tokenizer, docs, lambda d: d["context"], f"{name} {task}")
                  for task, docs in long_docs.items()})
        print(name, json.dumps(report["models"][name]), flush=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
