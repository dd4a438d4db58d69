"""Metrics of a run besides accuracy: FLOPs (analytic and fvcore), latency, throughput and peak memory.

`from_config(model, reducer, cfg, info)` is the runner's hook. It measures the dense model and, when a reducer is
given, the reduced one, on one synthetic batch whose size is set by the benchmark config's `measure` block
(`conf/benchmark/efficiency.yaml` documents the keys; lm-eval benchmarks carry a small one so every run reports
FLOPs, latency and memory next to its accuracy). FLOPs are those of one forward of one sequence. With
`measure.ceiling`, the reducer's `ceiling()` (the cheapest cut at the same schedule: what the kernels allow) is
timed in the same interleaved loop, and the record says how much of the ceiling's speed-up the method keeps.
"""
from __future__ import annotations

import copy
import statistics

from ssmcompress import architecture, hosts, mixer_slices, models, records, reduction
from ssmcompress import flops as analytic
from ssmcompress.config import integer, to_dict
from ssmcompress.errors import ConfigError
from ssmcompress.metrics import capture, efficiency
from ssmcompress.metrics import forwards as forwards_lib
from ssmcompress.metrics import generation as generation_lib

DEFAULT_MEASURE = dict(
    enabled=True,
    fvcore=True,  # also count with fvcore (one traced forward per model variant)
    efficiency=True,  # latency, throughput and peak memory
    ceiling=False,  # also time the reducer's ceiling (benchmark=efficiency turns it on)
    capture=False,  # on a GPU, time CUDA graph replays of each forward (metrics.capture; benchmark=efficiency: on)
    warmup=1,
    repeats=3,
    new_tokens=100,  # benchmark=generation: tokens generated after each prompt
    mixer_rows=None,  # also the peak memory with every mixer run on this many rows at a time (mixer_slices)
    reduction_rows=None,  # ... and, in that measurement, each reduction layer's method too (Reducer.row_slices)
    shape=dict(cpu=dict(batch_size=1, length=128), cuda=dict(batch_size=8, length=2048)),
)
CONVENTION = ("one forward of one sequence; 1 multiply-add = 1 FLOP; norms 5/element; scan = the kernel's "
              "contractions; other elementwise work 0 (ssmcompress.flops)")


def check_config(cfg, model_config: dict) -> None:
    """The benchmark's `measure` block, before any work: positive shapes and repeats, and (strict reduction) a length
    long enough for the budget."""
    settings = measure_settings(to_dict(cfg.benchmark))
    for name in ("enabled", "fvcore", "efficiency", "ceiling", "capture"):
        if not isinstance(settings[name], bool):
            raise ConfigError(f"benchmark.measure.{name} must be true or false, got {settings[name]!r}")
    if not settings["enabled"]:
        return
    integer("benchmark.measure.warmup", settings["warmup"], minimum=0)
    integer("benchmark.measure.repeats", settings["repeats"], minimum=1)
    integer("benchmark.measure.new_tokens", settings["new_tokens"], minimum=1)
    for name in ("mixer_rows", "reduction_rows"):
        if settings[name] is not None:
            integer(f"benchmark.measure.{name}", settings[name], minimum=1)
    if settings["mixer_rows"] is not None and hosts.name_of(cfg.model) != "mamba":
        raise ConfigError("benchmark.measure.mixer_rows slices mamba-ssm's block mixers: it has no meaning for a "
                          "transformers model (leave it null)")
    if settings["reduction_rows"] is not None and settings["mixer_rows"] is None:
        raise ConfigError("benchmark.measure.reduction_rows is read by the sliced memory measurement, which "
                          "benchmark.measure.mixer_rows turns on: set both")
    for device, shape in settings["shape"].items():
        if not isinstance(shape, dict):
            raise ConfigError(f"benchmark.measure.shape.{device} must be {{batch_size: N, length: N}}, got {shape!r}")
        integer(f"benchmark.measure.shape.{device}.batch_size", shape.get("batch_size"), minimum=1)
        integer(f"benchmark.measure.shape.{device}.length", shape.get("length"), minimum=1)
        if "new_tokens" in shape:
            integer(f"benchmark.measure.shape.{device}.new_tokens", shape["new_tokens"], minimum=1)
    if cfg.method.name != "dense" and cfg.method.get("strict") is True:
        # a strict budget: the measured shape must reach it
        device = "cuda" if models.resolve_device(cfg.model.device).type == "cuda" else "cpu"
        reduction.check_lengths(cfg, model_config, [input_shape(settings, device)[1]])


def measure_settings(benchmark: dict) -> dict:
    """The benchmark config's `measure` block over DEFAULT_MEASURE (nested keys merged)."""
    return _merge(copy.deepcopy(DEFAULT_MEASURE), benchmark.get("measure") or {})


def input_shape(settings: dict, device_type: str) -> tuple[int, int]:
    shape = settings["shape"].get(device_type)
    if shape is None:
        raise ValueError(f"benchmark.measure.shape has no entry for device type {device_type!r}")
    return int(shape["batch_size"]), int(shape["length"])


def from_config(model, reducer, cfg, info: dict) -> dict:
    """Record sections `flops` and `efficiency` for the runner (empty when `measure.enabled` is false)."""
    from omegaconf import OmegaConf

    settings = measure_settings(OmegaConf.to_container(cfg.benchmark, resolve=True))
    if not settings["enabled"]:
        return {}
    device = next(model.parameters()).device
    batch_size, length = input_shape(settings, device.type)
    input_ids = efficiency.synthetic_batch(model.config.vocab_size, batch_size, length, device, seed=cfg.seed)
    forwards = {"dense": forwards_lib.dense_forward(model)}
    if reducer is not None:
        forwards["reduced"] = forwards_lib.reduced_forward(reducer)
    host = hosts.of_model(model)
    described = host.described(info)  # the FLOPs model covers its layers (every mamba-ssm model, transformers' SSMs)
    mamba = host is hosts.mamba_ssm  # mixer slices and the scan routes are mamba-ssm's
    sections = {"flops": flops_report(model, reducer, info, input_ids, forwards, settings["fvcore"])} \
        if described else {}
    if cfg.benchmark.kind == "generation":
        sections["generation"] = generation_report(model, reducer, info, input_ids, settings)
        if described:
            sections["generation"].update(efficiency.kernel_paths(model, info, device))
    elif settings["efficiency"]:
        ceiling = reducer.ceiling() if settings["ceiling"] and hasattr(reducer, "ceiling") else None
        try:
            timed = forwards if ceiling is None else {**forwards, "ceiling": forwards_lib.reduced_forward(ceiling)}
            stages = [*host.layers(model), host.lm_head(model)] if described else None  # where each forward peaks
            settle = {name: owner.settle_captured for name, owner in (("reduced", reducer), ("ceiling", ceiling))
                      if hasattr(owner, "settle_captured")}
            sections["efficiency"] = efficiency.measure(timed, input_ids, settings["warmup"], settings["repeats"],
                                                        efficiency.weight_bytes(model), stages=stages,
                                                        capture=settings["capture"], settle=settle)
            if mamba and settings["mixer_rows"]:
                sections["efficiency"].update(sliced_memory(model, reducer, forwards, input_ids, stages,
                                                            settings["mixer_rows"], settings["reduction_rows"]))
            if ceiling is not None:  # the same counts as the method's, unless it removed fewer
                sections["efficiency"]["ceiling_achieved_ratio"] = ceiling.describe()["observed"]["achieved_ratio"]
        finally:
            if ceiling is not None:
                ceiling.remove()  # before the reducer: it restores what the reducer's hooks set
        if described:
            sections["efficiency"].update(efficiency.kernel_paths(model, info, device))
        if reducer is not None and hasattr(reducer, "stopwatch"):
            eff = sections["efficiency"]
            eff["reduction_kernels"] = efficiency.reduction_kernels(device)
            eff["reduction_ms"] = 1000 * efficiency.reduction_seconds(reducer, forwards["reduced"], input_ids,
                                                                      settings["repeats"])
            dense_ms = eff["dense_latency_ms"]
            if eff["forward_path"] == capture.CUDA_GRAPH:  # the stopwatch times eager calls: a share of eager dense
                times = efficiency.time_forwards({"dense": forwards["dense"]}, input_ids, 0, settings["repeats"],
                                                 progress=False)["dense"]
                dense_ms = eff["eager_dense_latency_ms"] = 1000 * statistics.median(times)
            eff["reduction_overhead"] = eff["reduction_ms"] / dense_ms
    return sections


def sliced_memory(model, reducer, forwards: dict, input_ids, stages, mixer_rows: int,
                  reduction_rows: int | None) -> dict:
    """The peak memory of the same forwards with every mixer run on `mixer_rows` rows at a time and, with
    `reduction_rows`, each reduction layer's method too, as `sliced_<key>` beside the whole-batch keys: what the
    peak is once a block's (and a reduction layer's) working memory at the whole batch no longer is."""
    slices_reduction = reduction_rows is not None and hasattr(reducer, "row_slices")
    if slices_reduction:
        reducer.row_slices = int(reduction_rows)
    try:
        with mixer_slices.batch_slices(model, mixer_rows):
            report = efficiency.memory_report(forwards, input_ids, stages)
    finally:
        if slices_reduction:
            reducer.row_slices = None
    return {"mixer_rows": int(mixer_rows), "reduction_rows": int(reduction_rows) if slices_reduction else None,
            **{f"sliced_{key}": value for key, value in report.items()}}


def generation_report(model, reducer, info: dict, input_ids, settings: dict) -> dict:
    """benchmark=generation: metrics.generation.measure for dense, the reducer and its ceiling."""
    ceiling = reducer.ceiling() if reducer is not None and settings["ceiling"] else None
    variants = {"dense": None, **({"reduced": reducer} if reducer is not None else {}),
                **({"ceiling": ceiling} if ceiling is not None else {})}
    try:
        new_tokens = settings["shape"][input_ids.device.type].get("new_tokens", settings["new_tokens"])
        return generation_lib.measure(model, variants, input_ids, new_tokens, settings["warmup"],
                                      settings["repeats"], efficiency.weight_bytes(model),
                                      expected_kv_saving=expected_kv_saving(reducer, info, input_ids.shape[1]))
    finally:
        if ceiling is not None:
            ceiling.remove()  # before the reducer: it restores what the reducer's hooks set


def expected_kv_saving(reducer, info: dict, length: int) -> float | None:
    """The share of the attention layers' cached tokens a prompt of `length` loses under the reducer's schedule:
    1 - (tokens entering the attention layers) / (length x attention layers); None without attention or reducer."""
    attention = architecture.attention_layers(info)
    if reducer is None or not attention or not hasattr(reducer, "schedule"):
        return None
    entering = reducer.schedule.tokens_entering(length)
    return 1 - sum(entering[i] for i in attention) / (length * len(attention))


def flops_report(model, reducer, info: dict, input_ids, forwards: dict, use_fvcore: bool = True) -> dict:
    """Dense and reduced FLOPs per sequence, the achieved reduction ratio and per-layer FLOPs, by the analytic model
    (the reduction budget's ruler) from the tokens each layer actually received, and cross-checked with fvcore."""
    batch_size, length = input_ids.shape
    n_layer = info["n_layer"]
    dense = analytic.forward_flops(info, [length] * n_layer)
    if reducer is None:
        tokens, logits_tokens, overhead = [length] * n_layer, length, 0.0
    else:
        tokens, logits_tokens = forwards_lib.tokens_per_layer(model, forwards["reduced"], input_ids)
        overhead = reduction_overhead(reducer, tokens)
    # as the reduction budget (reduction/budget.py): the model's own work; the reduction's own work beside it
    reduced = analytic.forward_flops(info, tokens, logits_tokens)
    report = dict(convention=CONVENTION, batch_size=batch_size, length=length,
                  dense=dense["total"], reduced=reduced["total"],
                  achieved_ratio=1 - reduced["total"] / dense["total"],
                  reduction_overhead=overhead,  # None: the reducer does not report it (fvcore still counts it)
                  achieved_ratio_with_overhead=None if overhead is None else
                  1 - (reduced["total"] + overhead) / dense["total"],
                  tokens_per_layer=tokens, logits_tokens=logits_tokens,
                  per_layer=dict(dense=dense["per_layer"], reduced=reduced["per_layer"]),
                  lm_head=dict(dense=dense["lm_head"], reduced=reduced["lm_head"]))
    if use_fvcore:
        report["fvcore"] = fvcore_report(model, info, input_ids, forwards, report)
    return report


def fvcore_report(model, info: dict, input_ids, forwards: dict, analytic_report: dict) -> dict:
    from ssmcompress.metrics import fvcore_count  # fvcore (iopath, yacs) only where a run counts with it

    batch_size = input_ids.shape[0]
    counts = {name: fvcore_count.count_forward(model, forward, input_ids, info) for name, forward in forwards.items()}
    reduced = counts.get("reduced", counts["dense"])
    dense_total, reduced_total = counts["dense"]["total"] / batch_size, reduced["total"] / batch_size
    return dict(dense=dense_total, reduced=reduced_total, achieved_ratio=1 - reduced_total / dense_total,
                per_layer=dict(dense=[f / batch_size for f in counts["dense"]["per_layer"]],
                               reduced=[f / batch_size for f in reduced["per_layer"]]),
                # fvcore / analytic - 1: the analytic ruler's error on this model (a test keeps it under 2%);
                # fvcore sees the reduction's own work too, so it is compared with reduced + overhead
                deviation=dict(dense=dense_total / analytic_report["dense"] - 1,
                               reduced=reduced_total / (analytic_report["reduced"]
                                                        + (analytic_report["reduction_overhead"] or 0.0)) - 1),
                uncounted_ops=reduced["uncounted_ops"])


def reduction_overhead(reducer, tokens_per_layer: list[int]) -> float | None:
    """The reduction's own FLOPs (matching, merging) per sequence, from the reducer's optional
    `reduction_flops(tokens_per_layer)`; None (recorded as not counted; fvcore still sees it) when it has none."""
    method = getattr(reducer, "reduction_flops", None)
    return float(method(tokens_per_layer)) if callable(method) else None


def per_layer_rows(flops_section: dict) -> list[dict]:
    """One row per block: tokens entering it, its dense and reduced FLOPs (for tables and W&B)."""
    if not flops_section or "per_layer" not in flops_section:
        return []
    per_layer = flops_section["per_layer"]
    return [dict(layer=i, tokens=tokens, dense_flops=dense, reduced_flops=reduced)
            for i, (tokens, dense, reduced) in enumerate(zip(flops_section["tokens_per_layer"], per_layer["dense"],
                                                              per_layer["reduced"]))]


def summary_lines(record: dict) -> list[str]:
    """Lines for the runner's summary table: FLOPs, per-layer tokens when reduced, latency and memory."""
    lines = []
    flops = record.get("flops")
    if flops:
        lines.append(f"{'FLOPs / sequence':<28}dense {flops['dense']:.4g}  reduced {flops['reduced']:.4g}  "
                     f"achieved ratio {flops['achieved_ratio']:.4f}  ({flops['batch_size']}x{flops['length']})")
        if flops["reduction_overhead"]:
            lines.append(f"{'  with reduction overhead':<28}{flops['reduction_overhead']:.4g} FLOPs: achieved ratio "
                         f"{flops['achieved_ratio_with_overhead']:.4f}")
        elif flops["reduction_overhead"] is None:
            lines.append(f"{'  reduction overhead':<28}not reported by the reducer (in fvcore's count only)")
        if "fvcore" in flops:
            fv = flops["fvcore"]
            lines.append(f"{'FLOPs (fvcore)':<28}dense {fv['dense']:.4g}  reduced {fv['reduced']:.4g}  "
                         f"achieved ratio {fv['achieved_ratio']:.4f} (reduction's own work included)")
        if flops["achieved_ratio"]:
            lines.append(f"{'tokens per layer':<28}" + " ".join(str(t) for t in flops["tokens_per_layer"]))
    gen = record.get("generation")
    if gen:
        names = [n for n in ("dense", "reduced", "ceiling") if f"{n}_generation_ms" in gen]
        lines.append(f"{'generation':<28}{gen['batch_size']} x {gen['length']} prompt tokens + {gen['new_tokens']} new"
                     f" ({gen['device']}{', CUDA graphs' if gen['cuda_graphs'] else ''})")
        for part, key, unit in (("prefill", "prefill_ms", "ms"), ("generation", "generation_ms", "ms"),
                                ("decode / token", "decode_ms_per_token", "ms"), ("tokens/s", "tokens_per_s", ""),
                                ("peak memory", "peak_mib", "MiB"), ("KV cache", "kv_cache_mib", "MiB")):
            if all(f"{n}_{key}" in gen for n in names):
                lines.append(f"{'  ' + part + (' ' + unit if unit else ''):<28}"
                             + "  ".join(f"{n} {gen[f'{n}_{key}']:.4g}" for n in names))
        if "speedup" in gen:
            lines.append(f"{'  speed-up':<28}generation {gen['speedup']:.3f}  prefill {gen['prefill_speedup']:.3f}"
                         + (f"  bound {gen['bound']:.3f}  of bound "
                            f"{100 * gen['of_bound']:.1f}%" if "bound" in gen else ""))
        if "kv_cache_saving" in gen:
            expected = gen["expected_kv_cache_saving"]
            lines.append(f"{'  KV cache saved':<28}{100 * gen['kv_cache_saving']:.1f}%"
                         + (f" (the schedule removes {100 * expected:.1f}% of the attention layers' tokens)"
                            if expected is not None else ""))
    eff = record.get("efficiency")
    if eff:
        names = [n for n in ("dense", "reduced", "ceiling") if f"{n}_latency_ms" in eff]
        lines.append(f"{'latency ms':<28}" + "  ".join(f"{n} {eff[f'{n}_latency_ms']:.4g}" for n in names)
                     + (f"  speedup {eff['speedup']:.3f}" if "speedup" in eff else "")
                     + f"  ({eff['batch_size']}x{eff['length']}, {eff['device']}"
                     + (", CUDA graph replays)" if eff.get("forward_path") == capture.CUDA_GRAPH else ")"))
        if "of_ceiling" in eff:
            lines.append(f"{'  of the ceiling':<28}{100 * eff['of_ceiling']:.1f}% of its speedup "
                         f"{eff['ceiling_speedup']:.3f} (the cut alone, same counts)")
        if "reduction_ms" in eff:
            lines.append(f"{'  reduction overhead':<28}{eff['reduction_ms']:.4g} ms = "
                         f"{100 * eff['reduction_overhead']:.2f}% of dense latency (importance, matching, merging; "
                         f"eager calls)")
        for name, path in records.unrepresentative_paths(eff).items():
            lines.append(f"{'  ' + name.replace('_', ' '):<28}{path}")
        lines.append(f"{'tokens/s':<28}" + "  ".join(f"{n} {eff[f'{n}_tokens_per_s']:.4g}" for n in names))
        if all(f"{n}_peak_mib" in eff for n in names):
            lines.append(f"{'peak memory MiB':<28}" + "  ".join(
                f"{n} {eff[f'{n}_peak_mib']:.1f} (activation {eff[f'{n}_activation_mib']:.1f})" for n in names))
    return lines


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base
