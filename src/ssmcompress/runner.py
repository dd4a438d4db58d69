"""The main job. Data flows through separate modules in this order:

    model adapter (models) -> weight pruner (pruning) -> token reducer (reduction) -> evaluator (evaluation)
    -> metrics (metrics: FLOPs, latency, memory) -> tracker (tracking: results store, W&B)

Everything that can be checked without loading a model is checked first (config.validate), so bad input fails in
a second with one line. The record is appended only when every step succeeded.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from ssmcompress import config as config_lib
from ssmcompress import families, tracking


def output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        path = config_lib.REPO / "outputs" / time.strftime("%Y-%m-%d/%H-%M-%S")
        path.mkdir(parents=True, exist_ok=True)
        return path


def build_reducer(model, cfg: DictConfig, info: dict):
    """The token reducer for cfg.method (None for dense); see ssmcompress.reduction."""
    if cfg.method.name == "dense":
        return None
    from ssmcompress import reduction

    return reduction.from_config(model, cfg, info)


def prune(model, tokenizer, cfg: DictConfig) -> dict | None:
    """Weight pruning for cfg.pruner (None when pruner=none); see ssmcompress.pruning."""
    if cfg.pruner.name == "none":
        return None
    from ssmcompress import pruning

    return pruning.from_config(model, tokenizer, cfg)


def measure(model, reducer, cfg: DictConfig, info: dict) -> dict:
    """FLOPs (dense and reduced), and latency/memory for the efficiency benchmark; see ssmcompress.metrics."""
    try:
        from ssmcompress import metrics
    except ImportError:
        return {}
    return metrics.from_config(model, reducer, cfg, info)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict | None:
    """Run one job; `run_dir` (default: Hydra's output directory) receives lm-eval samples and W&B files."""
    config_lib.validate(cfg)
    resolved = config_lib.to_dict(cfg)
    key = config_lib.run_key(cfg)
    if cfg.skip_existing and tracking.has_key(cfg.results_dir, key):
        print(f"skip: results store {cfg.results_dir} already holds run {key}")
        return None
    torch.manual_seed(cfg.seed)
    run_dir = Path(run_dir) if run_dir is not None else output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    timings, start = {}, time.perf_counter()

    family = families.of(cfg.model)  # models (mamba-ssm) or hf_models (transformers)
    model = family.load_model(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.random_init,
                              config=resolved["model"].get("config"))
    info = family.model_info(model)
    device = str(next(model.parameters()).device)
    tokenizer = family.load_tokenizer(cfg.model.tokenizer) if cfg.benchmark.kind == "lm_eval" else None
    timings["load_s"] = time.perf_counter() - start

    record = tracking.new_record(key, resolved, device)
    record.update(model=cfg.model.name, method=cfg.method.name, benchmark=cfg.benchmark.name,
                  ratio=None if cfg.method.name == "dense" else float(cfg.ratio),
                  layers=None if cfg.method.name == "dense" else resolved["layers"], protocol=cfg.protocol,
                  seed=cfg.seed, pruner=cfg.pruner.name, sparsity=None if cfg.pruner.name == "none" else resolved["sparsity"],
                  tag=cfg.tag, model_info=info)

    step = time.perf_counter()
    pruning_stats = prune(model, tokenizer, cfg)
    if pruning_stats is not None:
        record["pruning"] = pruning_stats
        timings["prune_s"] = time.perf_counter() - step

    reducer = build_reducer(model, cfg, info)
    if reducer is not None:
        record["reduction"] = reducer.describe()

    if cfg.benchmark.kind == "lm_eval":
        from ssmcompress.evaluation import harness

        step = time.perf_counter()
        benchmark = resolved["benchmark"]
        record["metrics"] = harness.evaluate(model, tokenizer, benchmark, reducer=reducer, protocol=cfg.protocol,
                                             seed=cfg.seed, samples_dir=run_dir, max_length=cfg.model.max_length)
        record["headline"] = harness.headline(record["metrics"], benchmark)
        timings["eval_s"] = time.perf_counter() - step
        if reducer is not None:
            record["reduction"] = reducer.describe()  # now with the token counts seen during evaluation

    step = time.perf_counter()
    record.update(measure(model, reducer, cfg, info))
    timings["measure_s"] = time.perf_counter() - step
    timings["total_s"] = time.perf_counter() - start
    record["timings"] = timings
    record["output_dir"] = str(run_dir)

    print(summary_table(record))
    if cfg.logger.name == "wandb":
        logger = tracking.WandbLogger(resolved["logger"], resolved, run_dir,
                                      name=f"{cfg.model.name}-{cfg.method.name}-{record['ratio'] or 0}")
        logger.log(record)
        logger.finish()
    path = tracking.append(record, cfg.results_dir)
    print(f"record {record['run_id']} (key {key}) appended to {path}")
    # free the model before a multirun's next job (same process): the reducer's hooks hold it in a reference
    # cycle, and a GPU model left behind would count in the next job's peak memory
    if reducer is not None:
        reducer.remove()
    on_gpu = next(model.parameters()).is_cuda
    del model, reducer
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
    return record


def summary_table(record: dict) -> str:
    """A plain-text table of what the run measured."""
    ratio = record.get("ratio")
    title = f"{record['model']} | {record['method']}" + (f" | ratio {ratio}" if ratio else "") + \
        f" | {record['benchmark']} | protocol {record['protocol']}"
    lines = [title, "-" * len(title)]
    for task, values in record.get("metrics", {}).items():
        lines.append(f"{task:<28}" + "  ".join(f"{name} {value:.4f}" for name, value in sorted(values.items())))
    if "headline" in record:
        lines.append(f"{'average':<28}{record['headline']['average']:.4f}")
    from ssmcompress import metrics

    lines.extend(metrics.summary_lines(record))  # FLOPs (dense, reduced, achieved ratio), latency, memory
    lines.append(f"{'time':<28}" + "  ".join(f"{k} {v:.1f}" for k, v in record["timings"].items()))
    return "\n".join(lines)
