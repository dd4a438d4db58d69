"""Post-training weight pruning of the linear layers of Mamba / Mamba-2 mixers and of transformer decoder blocks.

    python run.py pruner=multi sparsity=0.5                  # the paper's multi-removal pruner, 50 % unstructured
    python run.py pruner=sparsegpt sparsity=2:4 method=ours ratio=0.2   # joint with token reduction
    python run.py model=tiny-opt pruner=wanda sparsity=0.5   # a transformers model (OPT, LLaMA, GPT-2, ...)

Pruners (one module each, one signature: `prune(weight, inputs, pattern, **options) -> pruned weight`):
magnitude, wanda, sparsegpt, multi. One core for both model families (sequential.py), with an adapter per family
(adapters.py: targets.py for mamba-ssm, hf_targets.py for transformers). The runner calls `check_config` before
loading anything and `from_config` after loading the model; the dict `from_config` returns is stored as
`record["pruning"]` (schema: `summarize`).
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

from ssmcompress import hosts
from ssmcompress.config import to_dict
from ssmcompress.errors import ConfigError
from ssmcompress.pruning import adapters, calibration, magnitude, multi, sequential, sparsegpt, wanda
from ssmcompress.pruning.masks import Pattern, check_width, parse_pattern

PRUNERS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "multi": multi}


def _config_error(message: str):
    return ConfigError(message)


def options_of(settings: dict) -> dict:
    return dict(settings.get("options") or {})


def check_options(name: str, pattern: Pattern, options: dict) -> None:
    """The pruner's own validation of its options (ValueError/TypeError), e.g. blocksize vs N:M."""
    module = PRUNERS[name]
    accepted = set(inspect.signature(module.prune).parameters) - {"weight", "inputs", "pattern", "mask"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"pruner {name} has no option {', '.join(unknown)}"
                         + (f" (options: {', '.join(sorted(accepted))})" if accepted else " (it takes none)"))
    module.check_options(pattern, **options)


def check_config(cfg, model_config: dict) -> None:
    """Reject unusable pruning settings with one line, before any model is loaded."""
    settings = to_dict(cfg.pruner)
    name = settings["name"]
    if name not in PRUNERS:
        raise _config_error(f"unknown pruner {name!r}: use one of none, {', '.join(PRUNERS)}")
    if cfg.sparsity is None:
        raise _config_error(f"pruner={name} needs sparsity=<fraction or N:M>, e.g. sparsity=0.5 or sparsity=2:4")
    try:
        pattern = parse_pattern(cfg.sparsity)
        kind, widths = adapters.ADAPTERS[hosts.name_of(cfg.model)].config_widths(model_config)
        names = adapters.in_order(settings.get("targets") or [], list(widths), kind)
        if not names:
            raise ValueError(f"pruner.targets is empty: choose layers, e.g. [{', '.join(list(widths)[:2])}]")
        for target in names:
            try:
                check_width(pattern, widths[target])
            except ValueError as error:
                raise ValueError(f"{target}: {error}") from None
        check_options(name, pattern, options_of(settings))
        if PRUNERS[name].NEEDS_INPUTS:
            check_calibration(settings.get("calibration") or {})
    except (ValueError, TypeError) as error:
        raise _config_error(str(error)) from None


def check_calibration(settings: dict) -> None:
    source = settings.get("source")
    if source not in calibration.SOURCES:
        raise ValueError(f"unknown calibration source {source!r}: use one of {', '.join(calibration.SOURCES)}")
    for key in ("samples", "length", "batch_size"):
        value = settings.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"pruner.calibration.{key} must be a positive integer, got {value!r}")
    if not isinstance(settings.get("seed", 0), int):
        raise ValueError(f"pruner.calibration.seed must be an integer, got {settings.get('seed')!r}")
    if source in calibration.HUB_SOURCES:
        calibration.require_hub_source(source)


def from_config(model, tokenizer, cfg) -> dict:
    """Prune `model` in place as cfg.pruner and cfg.sparsity say; returns the record's `pruning` section."""
    settings = to_dict(cfg.pruner)
    name, pattern, options = settings["name"], parse_pattern(cfg.sparsity), options_of(settings)
    module = PRUNERS[name]
    start = time.perf_counter()
    tokens, calibration_settings = None, None
    if module.NEEDS_INPUTS:
        calibration_settings = dict(settings["calibration"])
        tokenizer = tokenizer if tokenizer is not None else hosts.of(cfg.model).load_tokenizer(cfg.model.tokenizer)
        tokens = calibration.windows(calibration_settings["source"], tokenizer, calibration_settings["samples"],
                                     calibration_settings["length"], calibration_settings.get("seed", 0))
    calibration_s = time.perf_counter() - start

    def prune_layer(weight, inputs):
        return module.prune(weight, inputs, pattern, **options)

    layers = sequential.prune_model(model, prune_layer, settings["targets"], tokens,
                                    true_sequential=settings.get("true_sequential", True),
                                    batch_size=(calibration_settings or {}).get("batch_size", 8),
                                    desc=f"{name} {pattern}")
    prune_s = time.perf_counter() - start - calibration_s
    summary = summarize(model, name, pattern, settings, options, calibration_settings, layers,
                        dict(calibration=calibration_s, prune=prune_s, total=calibration_s + prune_s))
    if settings.get("save_dir"):
        family = hosts.of_model(model)
        if tokenizer is None:
            tokenizer = family.load_tokenizer(cfg.model.tokenizer)
        family.save_model(model, settings["save_dir"], tokenizer=tokenizer)
        summary["saved_to"] = str(Path(settings["save_dir"]).resolve())
    print(describe(summary))
    return summary


def summarize(model, name: str, pattern: Pattern, settings: dict, options: dict, calibration_settings: dict | None,
              layers: dict, seconds: dict) -> dict:
    """The `record["pruning"]` section:

    pruner, sparsity ("0.5" / "2:4"), pattern {kind: unstructured | n:m, fraction, n, m}, targets (forward order),
    true_sequential, options (the pruner's own), calibration {source, samples, length, seed, batch_size, tokens}
    (None for magnitude), layers {"backbone.layers.<i>.mixer.<target>": {sparsity, zeros, params, error}} (error:
    relative output error ||(W - Ŵ)X||² / ||WX||² on the calibration inputs, None without them; transformers:
    "<decoder layers path>.<i>.<layer>", e.g. "model.decoder.layers.0.fc1"),
    achieved_sparsity (zeros / params over the pruned layers), pruned_params, model_fraction (zeros / all
    parameters), mean_error, seconds {calibration, prune, total}, saved_to (absolute directory or None).
    """
    zeros = sum(layer["zeros"] for layer in layers.values())
    params = sum(layer["params"] for layer in layers.values())
    errors = [layer["error"] for layer in layers.values() if layer["error"] is not None]
    model_params = sum(p.numel() for p in model.parameters())
    if calibration_settings is not None:
        calibration_settings = {**calibration_settings,
                                "tokens": calibration_settings["samples"] * calibration_settings["length"]}
    return dict(
        pruner=name, sparsity=str(pattern),
        pattern=dict(kind="n:m" if pattern.is_nm else "unstructured", fraction=pattern.fraction,
                     n=pattern.n or None, m=pattern.m or None),
        targets=sequential.target_order(model, settings["targets"]),
        true_sequential=bool(settings.get("true_sequential", True)) if calibration_settings else None,
        options=options, calibration=calibration_settings, layers=layers,
        achieved_sparsity=zeros / params if params else 0.0, pruned_params=params,
        model_fraction=zeros / model_params,
        mean_error=sum(errors) / len(errors) if errors else None,
        seconds=seconds, saved_to=None,
    )


def describe(summary: dict) -> str:
    error = summary["mean_error"]
    return (f"pruned {len(summary['layers'])} layers ({', '.join(summary['targets'])}) with {summary['pruner']} "
            f"at {summary['sparsity']}: achieved sparsity {summary['achieved_sparsity']:.4f} of the pruned layers, "
            f"{summary['model_fraction']:.4f} of all parameters"
            + (f", mean relative output error {error:.4g}" if error is not None else "")
            + f", {summary['seconds']['total']:.1f} s")
