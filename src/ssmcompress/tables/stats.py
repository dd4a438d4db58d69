"""Uncertainty and significance of the tables' numbers.

- A cell's standard error is the record's, as lm-eval computes it (`Record.stderr`); an average over tasks has
  sqrt(sum of the squared task standard errors) / tasks (the tasks' documents are independent).
- A cell of a sweep over seeds is the mean over its seeds, with the standard deviation over them.
- Which of two runs is better: a paired bootstrap over the documents both runs scored (`Record.samples`):
  `RESAMPLES` resamples of the documents with replacement (seeded), the same resample for both runs, the column's
  own statistic on each (a mean for accuracies, exp(-mean log-likelihood) for lm-eval's perplexity, ...); two-sided
  p = twice the share of resampled differences on the far side of zero (the percentile bootstrap test). An average
  over tasks resamples every task's documents jointly.
"""
from __future__ import annotations

import math
import statistics

import numpy as np

RESAMPLES = 2000
SEED = 0
ALPHA = 0.05
TEST = (f"paired bootstrap over the documents ({RESAMPLES} resamples, seed {SEED}; two-sided p < {ALPHA})")


# lm-eval's aggregations (lm_eval.api.metrics: mean, perplexity, weighted_perplexity, bits_per_byte) over the last
# axis of per-document values, so that all resamples are aggregated at once (lm-eval's take one list at a time);
# a pair metric's values are (log-likelihood, words or bytes) per document
def mean(values: np.ndarray) -> np.ndarray:
    return values.mean(-1)


def perplexity(loglikelihoods: np.ndarray) -> np.ndarray:  # lm-eval's `perplexity` (LAMBADA): per document
    return np.exp(-loglikelihoods.mean(-1))


def weighted_perplexity(pairs: np.ndarray) -> np.ndarray:
    return np.exp(-pairs[..., 0].sum(-1) / pairs[..., 1].sum(-1))


def bits_per_byte(pairs: np.ndarray) -> np.ndarray:
    return -pairs[..., 0].sum(-1) / pairs[..., 1].sum(-1) / math.log(2)


AGGREGATES = {"acc": mean, "acc_norm": mean, "exact_match": mean, "perplexity": perplexity,
              "word_perplexity": weighted_perplexity, "byte_perplexity": weighted_perplexity,
              "bits_per_byte": bits_per_byte}


def documents(samples: dict, task: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(document ids, values) of one metric of one task, in document order; None where the record has none."""
    per_task = samples.get(task) or {}
    if metric not in per_task or metric not in AGGREGATES:
        return None
    ids = np.asarray(per_task["doc_id"])
    order = np.argsort(ids, kind="stable")
    return ids[order], np.asarray(per_task[metric], dtype=float)[order]


def seed_mean(per_seed: list[list[tuple] | None]) -> list[tuple] | None:
    """Per task, the documents' values averaged over seeds (None unless every seed scored the same documents)."""
    if not per_seed or any(p is None for p in per_seed):
        return None
    merged = []
    for tasks in zip(*per_seed):
        ids = tasks[0][0]
        if any(not np.array_equal(ids, other[0]) for other in tasks[1:]):
            return None
        merged.append((ids, np.mean([values for _, values in tasks], axis=0)))
    return merged


def paired_pvalue(a: list[tuple], b: list[tuple], statistic, resamples: int = RESAMPLES,
                  seed: int = SEED) -> float | None:
    """Two-sided p-value of "statistic(a) = statistic(b)" for two runs, per task (document ids, values): a
    paired bootstrap that draws, per task, `resamples` resamples of its documents, the same for both runs.
    None if the runs did not score the same documents. Written here because scipy.stats.bootstrap's paired
    resampling needs samples of one length, and an average over tasks resamples tasks of different lengths."""
    if len(a) != len(b) or any(not np.array_equal(x[0], y[0]) for x, y in zip(a, b)):
        return None
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(ids), size=(resamples, len(ids))) for ids, _ in a]
    difference = (statistic([values[p] for (_, values), p in zip(a, picks)])
                  - statistic([values[p] for (_, values), p in zip(b, picks)]))
    return float(min(1.0, 2 * min(np.mean(difference <= 0), np.mean(difference >= 0))))


def average_stderr(errors: list[float | None]) -> float | None:
    """The standard error of a mean over independent tasks."""
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def over_seeds(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard deviation (None for one seed) over seeds."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None
