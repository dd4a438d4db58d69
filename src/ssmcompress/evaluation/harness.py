"""Accuracy through lm-eval: run a benchmark config's tasks on a (reduced) model and pick out the paper's metrics."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # datasets otherwise pings S3 on every load


def task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    # include_defaults=False skips indexing lm-eval's ~15k built-in tasks (about 9 s) when we only need ours
    if include_path:
        return TaskManager(include_path=include_path, include_defaults=False)
    return TaskManager()


def evaluate(model, tokenizer, benchmark: dict, reducer=None, protocol: str = "exact", seed: int = 0,
             samples_dir: str | Path | None = None, max_length: int = 2048) -> dict:
    """{task: {metric: value}} for the benchmark's tasks, plus lm-eval's per-sample outputs written to samples_dir."""
    from lm_eval import simple_evaluate

    from ssmcompress.evaluation.lm_backend import ReducedMambaLM

    lm = ReducedMambaLM(model, tokenizer, reducer=reducer, protocol=protocol, batch_size=benchmark["batch_size"],
                        max_length=max_length)
    output = simple_evaluate(model=lm, tasks=list(benchmark["tasks"]),
                             task_manager=task_manager(benchmark.get("include_path")),
                             num_fewshot=benchmark.get("num_fewshot", 0), limit=benchmark.get("limit"),
                             log_samples=bool(samples_dir) and benchmark.get("log_samples", True),
                             bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                             fewshot_random_seed=seed)
    metrics = {}
    for task in benchmark["tasks"]:
        values = output["results"].get(task)
        if values is None:
            raise RuntimeError(f"lm-eval returned no result for task {task}")
        metrics[task] = {key.split(",")[0]: value for key, value in values.items()
                         if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    if samples_dir and output.get("samples"):
        samples_dir = Path(samples_dir)
        samples_dir.mkdir(parents=True, exist_ok=True)
        for task, rows in output["samples"].items():
            with open(samples_dir / f"samples_{task}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=str) + "\n")
    return metrics


def headline(metrics: dict, benchmark: dict) -> dict:
    """The paper-style row: each task's main metric, the extra metrics (e.g. LAMBADA perplexity), the average."""
    row = {}
    for task in benchmark["tasks"]:
        main = benchmark["main_metric"][task]
        row[task] = metrics[task][main]
        for extra in (benchmark.get("extra_metrics") or {}).get(task, []):
            row[f"{task}/{extra}"] = metrics[task][extra]
    row["average"] = sum(row[task] for task in benchmark["tasks"]) / len(benchmark["tasks"])
    return row
