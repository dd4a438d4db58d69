"""Accuracy through lm-eval: check a benchmark config, run its tasks on a (reduced) model, pick out the paper's metrics."""
from __future__ import annotations

import difflib
import functools
import glob
import json
import math
import os
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from ssmcompress import hub
from ssmcompress.hosts import transformers as hf
from ssmcompress.config import integer, to_dict
from ssmcompress.errors import ConfigError
from ssmcompress.evaluation import perplexity

os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")  # datasets otherwise pings S3 on every load
# lm-eval bootstraps standard errors in a process pool of cpu_count() workers unless this is set; a pool per task
# costs more than the resampling itself at these sizes, and it forks a process holding the model
os.environ.setdefault("DISABLE_MULTIPROC", "1")


KINDS = ("lm_eval", "efficiency", "generation")  # what a benchmark config's `kind` may be
FILE_DATASETS = ("json", "csv", "parquet", "text", "arrow")  # `dataset_path`s that read local `data_files`


def check_config(cfg) -> None:
    """The `benchmark` section, before any work: its kind, and for lm-eval benchmarks the evaluation settings, that
    every task exists (lm-eval's own task index), that its data files exist and that its hub datasets are cached or
    reachable, per (dataset, config)."""
    benchmark = to_dict(cfg.benchmark)
    if benchmark.get("kind") not in KINDS:
        raise ConfigError(f"benchmark {benchmark.get('name')}: unknown kind {benchmark.get('kind')!r} "
                          f"(use one of {', '.join(KINDS)})")
    if benchmark["kind"] != "lm_eval":
        return
    tasks = benchmark.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"benchmark.tasks must be a non-empty list of task names, got {tasks!r}")
    if benchmark.get("limit") is not None:
        integer("benchmark.limit", benchmark["limit"], minimum=1)
    integer("benchmark.batch_size", benchmark.get("batch_size"), minimum=1)
    integer("benchmark.num_fewshot", benchmark.get("num_fewshot", 0), minimum=0)
    include = benchmark.get("include_path")
    if include and not Path(include).is_dir():
        raise ConfigError(f"benchmark {benchmark.get('name')}: task directory {include} does not exist")
    known = {task: tuple(value) if isinstance(value, list) else (value, None)
             for task, value in (benchmark.get("datasets") or {}).items()}
    needed = [known[task] for task in tasks if task in known]
    other = [task for task in tasks if task not in known]
    if other:
        needed += task_datasets(task_manager(include), other, benchmark.get("name"))
    hub.require_datasets(needed, f"benchmark {benchmark.get('name')}")


def task_datasets(manager, names: list[str], benchmark: str | None) -> list[tuple[str, str | None]]:
    """The hub (dataset, config) pairs the named tasks (or groups, tags) load; checks local data files on the way."""
    leaves, pending = [], list(names)
    while pending:
        name = pending.pop(0)
        entry = manager.task_index.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, list(manager.all_tasks), n=3)
            hint = (f"; did you mean {', '.join(close)}?" if close else
                    f"; known: {', '.join(sorted(manager.all_tasks)[:12])}")
            raise ConfigError(f"benchmark {benchmark}: lm-eval knows no task, group or tag {name!r}{hint}")
        if entry.cfg is not None and "task" in entry.cfg and isinstance(entry.cfg["task"], str):
            leaves.append(entry)
        else:  # a group or a tag: its members
            members = entry.tags if entry.cfg is None else entry.cfg.get("task", [])
            pending += [m if isinstance(m, str) else m.get("task") for m in members]
    needed = []
    for entry in leaves:
        config = entry.cfg
        for path in data_files(config, Path(entry.yaml_path).parent if entry.yaml_path else Path.cwd()):
            if not (path.exists() or glob.glob(str(path))):  # data_files may be glob patterns
                raise ConfigError(f"task {entry.name}: data file {path} does not exist")
        if config.get("custom_dataset") is None and config.get("dataset_path") not in FILE_DATASETS + (None,):
            needed.append((config["dataset_path"], config.get("dataset_name")))
    return needed


def data_files(config: dict, folder: Path) -> list[Path]:
    """The local files a task reads: the bundled tasks' `data_file` (beside their YAML, see assets/tasks/offline/
    utils.py) or a `data_files` entry of the kind `datasets.load_dataset` takes (a path, a list or a split dict)."""
    kwargs = config.get("dataset_kwargs") or {}
    if "data_file" in kwargs:
        return [folder / kwargs["data_file"]]
    value = kwargs.get("data_files")
    values = list(value.values()) if isinstance(value, dict) else [value] if isinstance(value, str) else value or []
    return [Path(v) for item in values for v in ([item] if isinstance(item, str) else item)]


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None, metadata: str | None = None):
    """lm-eval's task index (built once per process: the checks and the evaluation share it); `metadata`, a JSON
    object, is what lm-eval hands every task's dataset builder (RULER's tokenizer and lengths)."""
    from lm_eval.tasks import TaskManager

    extra = json.loads(metadata) if metadata else None
    # include_defaults=False skips indexing lm-eval's ~15k built-in tasks (about 9 s) when we only need ours
    if include_path:
        return TaskManager(include_path=include_path, include_defaults=False, metadata=extra)
    return TaskManager(metadata=extra)


def task_metadata(benchmark: dict, tokenizer) -> str | None:
    """The benchmark's `metadata` for lm-eval's tasks as a JSON object, with the model's tokenizer where it names
    none: tasks that generate their documents to a token length (RULER's) load it by name, as lm-eval's command
    line passes its model_args' `tokenizer` or `pretrained`."""
    metadata = dict(benchmark.get("metadata") or {})
    if not metadata:
        return None
    metadata.setdefault("tokenizer", getattr(tokenizer, "name_or_path", None))
    return json.dumps(metadata, sort_keys=True)


BOOTSTRAP_ITERS = 1000  # lm-eval's resamples for the standard errors of perplexities (means have a closed form)
# metrics the harness derives from lm-eval's per-sample outputs (lm-eval has no such metric)
DERIVED = ("token_perplexity",)


@dataclass
class Evaluation:
    metrics: dict  # {task: {metric: value}}
    stderr: dict  # {task: {metric: standard error}} (lm-eval's; None where it has none)
    samples: dict  # {task: {"doc_id": [...], metric: [value per document]}}: main and extra metrics


def evaluate(model, tokenizer, benchmark: dict, reducer=None, protocol: str = "exact", seed: int = 0,
             samples_dir: str | Path | None = None, max_length: int = 2048) -> Evaluation | None:
    """lm-eval on the benchmark's tasks: metrics, their standard errors and the per-document values of the
    benchmark's main and extra metrics (for paired tests between runs); lm-eval's per-sample outputs are also
    written to samples_dir. In a data-parallel launch each process scores its shard and rank 0 gets the whole
    evaluation; the other processes get None."""
    # lm-eval's models (transformers, accelerate) take seconds to import: here, after every config check, not at the top
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from ssmcompress.evaluation.lm_backend import backend_for

    # WikiText-2 / PTB / C4 perplexity by SparseGPT's protocol, not lm-eval's (every position is scored: under the
    # exact protocol token reduction could not change it)
    corpora = [task for task in benchmark["tasks"] if task in perplexity.CORPORA]
    metrics = {task: perplexity.evaluate(model, tokenizer, task, benchmark.get("seqlen") or max_length,
                                         benchmark["batch_size"]) for task in corpora}
    stderr, samples = {task: {} for task in corpora}, {}
    tasks = [task for task in benchmark["tasks"] if task not in corpora]
    if not tasks:
        return Evaluation(metrics, stderr, samples)
    if hf.is_model(model) and model.config.model_type not in hf.FAMILIES:
        # a transformers LM the reducer has no adapter for: lm-eval's own `hf` backend on the model object (no copy)
        if reducer is not None:
            raise ValueError(f"token reduction has no adapter for {model.config.model_type} models")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=benchmark["batch_size"], max_length=max_length)
    else:
        lm = backend_for(model)(model, tokenizer, reducer=reducer, protocol=protocol,
                                batch_size=benchmark["batch_size"], max_length=max_length)
    output = simple_evaluate(model=lm, tasks=tasks,
                             task_manager=task_manager(benchmark.get("include_path"),
                                                       task_metadata(benchmark, tokenizer)),
                             num_fewshot=benchmark.get("num_fewshot", 0), limit=benchmark.get("limit"),
                             log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed,
                             numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if output is None:  # another process of a data-parallel launch: lm-eval gathered its results on rank 0
        return None
    for task in tasks:
        values = output["results"].get(task)
        if values is None:
            raise RuntimeError(f"lm-eval returned no result for task {task}")
        metrics[task] = {key.split(",")[0]: value for key, value in values.items()
                         if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
        stderr[task] = {key.split(",")[0].removesuffix("_stderr"): value if isinstance(value, (int, float)) else None
                        for key, value in values.items() if "_stderr," in key}
        wanted = [benchmark["main_metric"][task]] if task in (benchmark.get("main_metric") or {}) else []
        wanted += (benchmark.get("extra_metrics") or {}).get(task, [])
        rows = sorted(output["samples"][task], key=lambda row: row["doc_id"])
        samples[task] = per_document(rows, [m for m in wanted if m not in DERIVED])
        if "token_perplexity" in wanted:
            metrics[task]["token_perplexity"], stderr[task]["token_perplexity"] = token_perplexity(rows, tokenizer)
    if samples_dir and benchmark.get("log_samples", True):
        samples_dir = Path(samples_dir)
        samples_dir.mkdir(parents=True, exist_ok=True)
        for task, rows in output["samples"].items():
            with open(samples_dir / f"samples_{task}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row, default=str) + "\n")
    return Evaluation(metrics, stderr, samples)


def per_document(rows: list[dict], names: list[str]) -> dict:
    """{"doc_id": [...], metric: [value per document]} from lm-eval's per-sample rows (a metric lm-eval aggregates
    from pairs, such as word_perplexity's (log-likelihood, words), keeps the pair)."""
    out = {"doc_id": [row["doc_id"] for row in rows]}
    for name in names:
        out[name] = [list(row[name]) if isinstance(row[name], (list, tuple)) else float(row[name]) for row in rows]
    return out


def token_perplexity(rows: list[dict], tokenizer) -> tuple[float, float]:
    """exp(-(sum of target log-likelihoods) / (sum of target tokens)) over a loglikelihood task's documents (lm-eval's
    `perplexity` is per target, here one whole word of several tokens), and its bootstrap standard error."""
    logliks = [float(row["perplexity"]) for row in rows]  # lm-eval stores each target's log-likelihood under it
    tokens = [len(tokenizer(row["arguments"][0][1], add_special_tokens=False).input_ids) for row in rows]
    value = math.exp(-sum(logliks) / sum(tokens))
    rng = random.Random(0)
    draws = []
    for _ in range(BOOTSTRAP_ITERS):
        picks = [rng.randrange(len(rows)) for _ in rows]
        draws.append(math.exp(-sum(logliks[i] for i in picks) / sum(tokens[i] for i in picks)))
    return value, statistics.stdev(draws)


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
