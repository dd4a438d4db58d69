"""The main job. Data flows through separate modules in this order:

    model adapter (models) -> weight pruner (pruning) -> token reducer (reduction) -> evaluator (evaluation)
    -> metrics (metrics: FLOPs, latency, memory) -> tracker (tracking: results store, W&B)

`validate` asks each of them, in that order, to check its own config section before any work, so bad input fails
with one line before a model, a dataset or a heavy library is loaded. `prepare` builds the (pruned, reduced) model,
the one path the main job and the lm-eval entry point (`ssmcompress.lmeval`) share. The record is stored only when
every step succeeded, and before anything is sent to W&B.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ssmcompress import config as config_lib
from ssmcompress import distributed, hosts, metrics, models, pruning, records, reduction, tracking
from ssmcompress.evaluation import harness

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> dict:
    """Every check of a composed config, in data-flow order; returns the model's config dict."""
    model_config = validate_model(cfg)
    harness.check_config(cfg)
    metrics.check_config(cfg, model_config)
    tracking.check_config(cfg)
    return model_config


def validate_model(cfg: DictConfig) -> dict:
    """The checks of what `prepare` builds: top-level keys, model, pruner, reducer; returns the model's config."""
    config_lib.check(cfg)
    model_config = hosts.of(cfg.model).check_config(cfg)  # hosts.mamba_ssm or hosts.transformers
    if cfg.pruner.name != "none":
        pruning.check_config(cfg, model_config)
    if cfg.method.name != "dense":
        reduction.check_config(cfg, model_config)
    return model_config


@dataclass
class Prepared:
    """A loaded model, pruned and wrapped for token reduction as the config says."""

    model: torch.nn.Module
    tokenizer: object | None
    reducer: object | None  # None for method=dense
    info: dict
    pruning: dict | None  # the record's pruning section (None for pruner=none)
    timings: dict


def prepare(cfg: DictConfig) -> Prepared:
    """Load (or randomly initialise, from the run's seed) the model, prune it, wrap it in the reducer."""
    timings, start = {}, time.perf_counter()
    resolved = config_lib.to_dict(cfg.model)
    family = hosts.of(cfg.model)
    model = family.load_model(cfg.model.path, distributed.device(cfg.model.device), cfg.model.dtype,
                              cfg.model.random_init,
                              config=resolved.get("config"), seed=cfg.seed)
    info = family.model_info(model)
    tokenizer = family.load_tokenizer(cfg.model.tokenizer) if models.needs_tokenizer(cfg) else None
    timings["load_s"] = time.perf_counter() - start
    pruning_stats = None
    if cfg.pruner.name != "none":
        step = time.perf_counter()
        pruning_stats = pruning.from_config(model, tokenizer, cfg)
        timings["prune_s"] = time.perf_counter() - step
    reducer = reduction.from_config(model, cfg, info, tokenizer) if cfg.method.name != "dense" else None
    return Prepared(model, tokenizer, reducer, info, pruning_stats, timings)


def output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        path = Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")
        path.mkdir(parents=True, exist_ok=True)
        return path


def sweep_name() -> str | None:
    """The sweep a job belongs to (its multirun folder, e.g. multirun/2026-12-01/10-00-00), for grouping its W&B
    runs; None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    except (ImportError, ValueError):
        return None


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict | None:
    """Run one job; `run_dir` (default: Hydra's output directory) receives lm-eval samples and W&B files.
    With skip_existing, the job claims its run key first, and does nothing if the store holds it or another live job
    is running it."""
    validate(cfg)
    key = config_lib.run_key(cfg)
    # a data-parallel launch (distributed.py): every process evaluates its shard, rank 0 alone claims and writes
    distributed.start(models.resolve_device(cfg.model.device))
    claims = cfg.skip_existing and distributed.is_main()
    with tracking.claim(cfg.results_dir, key) if claims else contextlib.nullcontext(True) as claimed:
        skip = None
        if not claimed:
            skip = f"another job is running run {key} of the results store {cfg.results_dir}"
        elif claims and tracking.has_key(cfg.results_dir, key):
            skip = f"results store {cfg.results_dir} already holds run {key}"
        skip = distributed.broadcast(skip)
        if skip is not None:
            log.info(f"skip: {skip}")
            return None
        record = execute(cfg, key, Path(run_dir) if run_dir is not None else output_dir())
        if record is None:  # another process of the launch: rank 0 has the whole record
            return None
        path = tracking.append(record, cfg.results_dir)
    log.info(summary_table(record))
    log.info(f"record {record['run_id']} (key {key}) appended to {path}")
    if cfg.logger.name == "wandb":
        tracking.log_to_wandb(record, config_lib.to_dict(cfg.logger), record["output_dir"])
    return record


def execute(cfg: DictConfig, key: str, run_dir: Path) -> dict:
    """The job's work, from loading the model to its measurements: the record."""
    start = time.perf_counter()
    resolved = config_lib.to_dict(cfg)
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg)
    model, reducer = prepared.model, prepared.reducer
    device = str(next(model.parameters()).device)
    record = dict(tracking.new_record(key, resolved, device),
                  model=cfg.model.name, method=cfg.method.name, benchmark=cfg.benchmark.name,
                  ratio=None if cfg.method.name == "dense" or cfg.ratio is None else float(cfg.ratio),
                  layers=None if cfg.method.name == "dense" else resolved["layers"], protocol=cfg.protocol,
                  seed=cfg.seed, pruner=cfg.pruner.name,
                  sparsity=None if cfg.pruner.name == "none" else resolved["sparsity"], tag=cfg.tag,
                  sweep=sweep_name(), model_info=prepared.info,
                  model_init=dict(random=True, seed=cfg.seed) if cfg.model.random_init else dict(random=False))
    timings = dict(prepared.timings)
    if prepared.pruning is not None:
        record["pruning"] = prepared.pruning
    if reducer is not None:
        record["reduction"] = reducer.describe()
    if cfg.benchmark.kind == "lm_eval":
        step = time.perf_counter()
        benchmark = resolved["benchmark"]
        evaluation = harness.evaluate(model, prepared.tokenizer, benchmark, reducer=reducer, protocol=cfg.protocol,
                                      seed=cfg.seed, samples_dir=run_dir,
                                      max_length=benchmark.get("max_length") or cfg.model.max_length)
        if reducer is not None and distributed.world_size() > 1:  # every process's token counts, added up on rank 0
            shards = distributed.gather(reducer.totals)
            if distributed.is_main():
                reducer.add_totals(shards[1:])
        if evaluation is not None:
            record.update(metrics=evaluation.metrics, stderr=evaluation.stderr, samples=evaluation.samples,
                          headline=harness.headline(evaluation.metrics, benchmark))
        timings["eval_s"] = time.perf_counter() - step
        if reducer is not None:
            record["reduction"] = reducer.describe()  # now with the token counts seen during evaluation
    if not distributed.is_main():  # another process of a data-parallel launch: rank 0 measures and writes
        if reducer is not None:
            reducer.remove()  # its hooks hold the model in a reference cycle
        return None
    step = time.perf_counter()
    record.update(metrics.from_config(model, reducer, cfg, prepared.info))
    timings["measure_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - start
    record.update(timings=timings, output_dir=str(run_dir))
    # free the model before a multirun's next job (same process): the reducer's hooks hold it in a reference
    # cycle, and a GPU model left behind would count in the next job's peak memory
    if reducer is not None:
        reducer.remove()
    on_gpu = next(model.parameters()).is_cuda
    del model, reducer, prepared
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
    return records.Record(**record).to_dict()  # the schema: every field known and typed


def summary_table(record: dict) -> str:
    """A plain-text table of what the run measured."""
    ratio = record.get("ratio")
    parts = [record["model"], record["method"] + (f" ratio {ratio}" if ratio else "")]
    if record.get("pruner") not in (None, "none"):
        parts.append(f"pruner {record['pruner']} sparsity {record.get('sparsity')}")
    title = " | ".join(parts + [record["benchmark"], f"protocol {record['protocol']}"])
    lines = [title, "-" * len(title)]
    for task, values in (record.get("metrics") or {}).items():
        lines.append(f"{task:<28}" + "  ".join(f"{name} {value:.4f}" for name, value in sorted(values.items())))
    if record.get("headline"):
        lines.append(f"{'average':<28}{record['headline']['average']:.4f}")
    lines.extend(metrics.summary_lines(record))  # FLOPs (dense, reduced, achieved ratio), latency, memory
    lines.append(f"{'time':<28}" + "  ".join(f"{k} {v:.1f}" for k, v in record["timings"].items()))
    return "\n".join(lines)
