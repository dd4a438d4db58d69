"""Accuracy through lm-eval: run a benchmark config's tasks on a (reduced) model and pick out the paper's metrics."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # datasets otherwise pings S3 on every load


def check_datasets(benchmark: dict) -> None:
    """Before any work: the hub datasets a benchmark lists (`datasets: {task: hub name}`) must be reachable or
    cached, else one ConfigError line saying what to do (datasets would otherwise retry the hub for ~30 s each)."""
    from ssmcompress import models
    from ssmcompress.config import ConfigError

    names = sorted(set((benchmark.get("datasets") or {}).values()))
    if not names:
        return
    offline = _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE")
    if not offline and models.hub_reachable():
        return
    cache = datasets_cache()
    missing = [name for name in names if not dataset_cached(name, cache)]
    if missing:
        reason = "offline mode is set" if offline else "the Hugging Face hub is unreachable"
        raise ConfigError(f"benchmark {benchmark.get('name')} needs the datasets {', '.join(missing)}, but {reason} "
                          f"and they are not in the datasets cache {cache}: run it once with hub access (or copy "
                          f"that machine's HF_HOME here and set HF_HOME / HF_DATASETS_CACHE), or use "
                          f"benchmark=offline")
    if not offline:
        use_cached_datasets_only()


def datasets_cache() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE)


def dataset_cached(name: str, cache: Path) -> bool:
    """Whether `datasets` can load hub dataset `name` offline: it reads <cache>/<org>___<name>/<config>/<version>/."""
    return any(path.is_dir() for path in (cache / name.replace("/", "___")).glob("*/*/*"))


def use_cached_datasets_only() -> None:
    """Offline mode for this process, also for modules that read the environment at import."""
    import datasets
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


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
    from lm_eval.models.huggingface import HFLM

    from ssmcompress import hf_models
    from ssmcompress.evaluation import perplexity
    from ssmcompress.evaluation.lm_backend import ReducedMambaLM

    # WikiText-2 / PTB / C4 perplexity by SparseGPT's protocol, not lm-eval's (every position is scored: under the
    # exact protocol token reduction could not change it)
    corpora = [task for task in benchmark["tasks"] if task in perplexity.CORPORA]
    metrics = {task: perplexity.evaluate(model, tokenizer, task, benchmark.get("seqlen") or max_length,
                                         benchmark["batch_size"]) for task in corpora}
    tasks = [task for task in benchmark["tasks"] if task not in corpora]
    if not tasks:
        return metrics
    if hf_models.is_model(model):  # transformers models: lm-eval's own `hf` backend on the model object (no copy)
        if reducer is not None:
            raise ValueError("token reduction applies to mamba-ssm models only")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=benchmark["batch_size"], max_length=max_length)
    else:
        lm = ReducedMambaLM(model, tokenizer, reducer=reducer, protocol=protocol,
                            batch_size=benchmark["batch_size"], max_length=max_length)
    output = simple_evaluate(model=lm, tasks=tasks,
                             task_manager=task_manager(benchmark.get("include_path")),
                             num_fewshot=benchmark.get("num_fewshot", 0), limit=benchmark.get("limit"),
                             log_samples=bool(samples_dir) and benchmark.get("log_samples", True),
                             bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                             fewshot_random_seed=seed)
    for task in tasks:
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
    # a task without a main_metric (held-out perplexity, #8) reports only its extra metrics and is not averaged
    scored = [task for task in benchmark["tasks"] if task in benchmark["main_metric"]]
    for task in benchmark["tasks"]:
        if task in scored:
            row[task] = metrics[task][benchmark["main_metric"][task]]
        for extra in (benchmark.get("extra_metrics") or {}).get(task, []):
            row[f"{task}/{extra}"] = metrics[task][extra]
    row["average"] = sum(row[task] for task in scored) / len(scored) if scored else float("nan")
    return row
