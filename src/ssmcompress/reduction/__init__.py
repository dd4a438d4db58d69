"""Post-training token reduction for state space language models and their hybrids with attention, on every host
(`ssmcompress.hosts`: mamba-ssm's and transformers' models).

Contract used by the runner and the lm-eval backend:

    reducer = from_config(model, cfg, info)        # cfg: the composed Hydra config (method, ratio, layers, ...)
    out = reducer(input_ids, lengths=None, protect=None)
        input_ids: LongTensor (batch, length), right-padded; lengths: LongTensor (batch,) of real lengths, or None
        (all rows real, or the `paper` protocol where padding is reduced like real tokens); protect: BoolTensor
        (batch, length) of positions that must be neither removed nor merged, or None.
        out.logits: (batch, kept, vocab) for the kept positions, in original order
        out.positions: LongTensor (batch, kept): the original position of each kept row of out.logits
    reducer.describe() -> dict: method, layers, keep rate, achieved FLOPs ratio, token counts (for the record)
    reducer.remove()   -> restores the dense model exactly

Also: `out.counts` (batch,) real tokens kept per row. A row keeping fewer tokens than the longest row is filled
up to `kept` with filler slots (its padding first, else removed positions) placed after all its real tokens, so
they never influence them; their logits are NaN. `reducer(..., trace=True)` adds `out.trace`, per reduction
layer the fate of every slot (patch.trace_entry). `check_config(cfg, model_config)` raises ConfigError.
`reducer.ceiling()`: a reducer of the `ceiling` measuring device at this reducer's schedule (None for the ceiling
itself), which the efficiency benchmark times beside it.

Layout: `merge` (shared matching, merging, compaction), `methods` (one function per method), `budget`
(ratio -> keep rate, FLOPs bookkeeping), `patch` (the Reducer: state and bookkeeping; the hooks are each host's). The
registry below names each method's function, budget rule and limits; its parameters and their defaults are the keys
of conf/method/<name>.yaml (`method_defaults`), their one home.

`reduce_at` (top-level key): which layers may reduce. `ssm` (the default): layers with an SSM mixer, whose output is
the signal the paper scores; `all`: attention layers too, scored by the same metric on their output before `o_proj`
(the attention counterpart of the SSM output). MLP and mixture-of-experts layers mix no tokens and never reduce.
`layers: null` places the paper's proportional anchors (`budget.default_layers`) on the nearest layer allowed.

`schedule` (top-level key): `smooth`, the budget's integer counts, or `chunk`, counts in whole Mamba-2 SSD chunks
or, on Mamba-1, multiples of 16 tokens (budget.chunk_counts, budget.count_multiple), for every method. With
`official` the chunk counts replace its ceil counts (rows too short for a chunk schedule keep them); its
`reduce_ratio`, which fixes those ceil counts, cannot be combined with it.
`trapezoid` (top-level key, Mamba-3 only): a kept token's trapezoid neighbour after removals (`check_trapezoid`).
`rotation` (top-level key, Mamba-3 only): how far a kept token's rotation advances after removals (`check_rotation`).
`ceiling` is no method for accuracy but a measuring device for efficiency: the cheapest cut at a schedule (both
streams cut to the budget's counts, keeping each row's first tokens: no importance, no decision, no merge).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

from ssmcompress import architecture, hosts
from ssmcompress.config import CONF_DIR, ConfigError, integer
from ssmcompress.pruning import calibration
from ssmcompress.reduction import budget, longmamba, methods
from ssmcompress.reduction.patch import Reducer, Schedule, Setup

SCHEDULES = ("smooth", "chunk")
REDUCE_AT = ("ssm", "all")
TRAPEZOIDS = ("kept", "none")
ROTATIONS = ("kept", "positions", "sizes")
STRATEGIES = ("prune", "merge", "hybrid")
IMPORTANCE = ("clip", "raw", "l1", "l2", "delta")  # delta: the SSM's Δ (patch.delta_importance), not its output
PRUNE_LINKS = ("most_similar", "least_similar", "least_important")
SIZES = ("reset", "carry")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """What the registry adds to conf/method/<name>.yaml, which holds the method's parameters and their defaults."""

    function: Callable
    fixed: dict = field(default_factory=dict)  # parameters implied by the name (prune_only: both streams prune)
    min_keep_rate: Callable[[dict], float] = lambda params: 0.5  # bipartite: at most half removed per layer
    rule: str = "cumulative"  # budget.removals
    overhead: str = "bipartite"  # budget.overhead_flops
    uses_importance: bool = True  # reads the importance signal (the out_proj pre-hook captures it)
    filters_delta: bool = False  # removes no token: sets Δ to 0 in chosen heads (longmamba), calibrated on text


def pumer_min_keep(params: dict) -> float:
    # prune s·r tokens, merge (1-s)·r of the n - s·r survivors, at most half of them: r ≤ n / (2 - s)
    share = params["prune_r"] / (params["prune_r"] + params["merge_r"])
    return 1.0 - 1.0 / (2.0 - share)


POSITIONAL = dict(min_keep_rate=lambda params: 0.0, overhead="none", uses_importance=False)

METHODS = {
    "ours": Method(methods.utr),
    "prune_only": Method(methods.utr, fixed=dict(hidden="prune", residual="prune")),
    "merge_only": Method(methods.utr, fixed=dict(hidden="merge", residual="merge")),
    "official": Method(methods.official, rule="ceil"),
    "evit": Method(methods.evit, min_keep_rate=lambda p: 0.0, overhead="none"),
    "tome": Method(methods.tome),
    "pumer": Method(methods.pumer, min_keep_rate=pumer_min_keep),
    "random": Method(methods.random_prune, min_keep_rate=lambda p: 0.0, overhead="none"),
    # DeciMamba's selection (without its fine-tuning): EViT's rule on DeciMamba's score, importance=delta
    "decimamba": Method(methods.evit, min_keep_rate=lambda p: 0.0, overhead="none"),
    # LongMamba's Δ filter (reduction.longmamba): no token removed, so no method function and no budget
    "longmamba": Method(None, min_keep_rate=lambda p: 1.0, overhead="none", uses_importance=False,
                        filters_delta=True),
    # positional baselines: where tokens go, not which (methods.py)
    "utr_early": Method(methods.utr_early),  # overhead FLOPs: UTR's (an upper bound)
    "early": Method(methods.early, **POSITIONAL),
    "early_merge": Method(methods.early_merge, **POSITIONAL),
    "strided": Method(methods.strided, **POSITIONAL),
    "late": Method(methods.late, **POSITIONAL),
    # the measuring device: `late`'s cut (each row keeps its first tokens), refused for accuracy unless allowed
    "ceiling": Method(methods.late, **POSITIONAL),
}


@lru_cache(maxsize=None)
def method_defaults(name: str) -> dict:
    """The method's parameters and their defaults: conf/method/<name>.yaml without its name, their one home. An
    interpolation of a top-level key (`random`'s seed: ${seed}) takes conf/config.yaml's value."""
    from omegaconf import OmegaConf

    given = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml"), resolve=False)
    top = OmegaConf.load(CONF_DIR / "config.yaml")
    defaults = {}
    for key, value in given.items():
        found = re.fullmatch(r"\$\{(\w+)\}", value) if isinstance(value, str) else None
        defaults[key] = top[found.group(1)] if found else value
    defaults.pop("name", None)
    return defaults


def method_params(name: str, given: dict) -> dict:
    """The method's parameters: defaults, overridden by the config, then the name's fixed ones, validated."""
    if name not in METHODS:
        raise ConfigError(f"unknown reduction method {name!r}: choose one of dense, {', '.join(METHODS)}")
    entry = METHODS[name]
    allowed = method_defaults(name)
    unknown = sorted(set(given) - set(allowed) - {"name"})
    if unknown:
        raise ConfigError(f"method {name} has no parameter {unknown[0]!r} (it takes: {', '.join(allowed)})")
    params = {**allowed, **{k: v for k, v in given.items() if k != "name"}, **entry.fixed}
    check_params(name, params)
    return params


def one_of(name: str, key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"method {name}: unknown {key} {value!r}: use one of {', '.join(map(str, choices))}")


def fraction(name: str, key: str, value, low_open: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        interval = "0 < x <= 1" if low_open else "0 <= x <= 1"
        raise ConfigError(f"method {name}: {key} must be a number with {interval}, got {value!r}")


def check_params(name: str, p: dict) -> None:
    if not isinstance(p["strict"], bool):
        raise ConfigError(f"method {name}: strict must be true or false, got {p['strict']!r}")
    if "window" in p and not (isinstance(p["window"], (int, float)) and not isinstance(p["window"], bool)
                              and p["window"] >= 2):
        raise ConfigError(f"method {name}: window must be a number >= 2 (candidates: the first window x removed "
                          f"tokens), got {p['window']!r}")
    if "importance" in p:
        one_of(name, "importance metric", p["importance"], ("clip", "raw") if name == "official" else IMPORTANCE)
    for stream in ("hidden", "residual"):
        if stream in p:
            one_of(name, f"{stream} strategy", p[stream], STRATEGIES)
    for key in ("q", "hidden_q", "residual_q"):
        if key in p:
            fraction(name, key, p[key], allow_none=key != "q")
    if "prune_links" in p:
        one_of(name, "prune_links", p["prune_links"], PRUNE_LINKS)
    if "sizes" in p:
        one_of(name, "sizes", p["sizes"], SIZES)
    if "reduce_ratio" in p:
        fraction(name, "reduce_ratio", p["reduce_ratio"], low_open=True, allow_none=True)
    if "fuse_token" in p and not isinstance(p["fuse_token"], bool):
        raise ConfigError(f"method {name}: fuse_token must be true or false, got {p['fuse_token']!r}")
    if "prune_r" in p:
        shares = (p["prune_r"], p["merge_r"])
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in shares)
        if not numbers or sum(shares) <= 0:
            raise ConfigError(f"method {name}: prune_r and merge_r must be numbers >= 0, not both 0, got {shares}")
    if "seed" in p and (not isinstance(p["seed"], int) or isinstance(p["seed"], bool)):
        raise ConfigError(f"method {name}: seed must be an integer, got {p['seed']!r}")
    if "allow_accuracy" in p and not isinstance(p["allow_accuracy"], bool):
        raise ConfigError(f"method {name}: allow_accuracy must be true or false, got {p['allow_accuracy']!r}")
    if METHODS[name].filters_delta:
        check_filter_params(name, p)


def check_filter_params(name: str, p: dict) -> None:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (number(p["channel_threshold"]) and p["channel_threshold"] >= 0):
        raise ConfigError(f"method {name}: channel_threshold must be a number >= 0, got {p['channel_threshold']!r}")
    if not (number(p["scale"]) and p["scale"] > 0):
        raise ConfigError(f"method {name}: scale must be a number > 0, got {p['scale']!r}")
    fraction(name, "clamp_top", p["clamp_top"], low_open=True)
    one_of(name, "aggregate", p["aggregate"], longmamba.AGGREGATES)
    if p["min_length"] is not None:
        integer(f"method {name}: min_length", p["min_length"], minimum=1)
    given = p["calibration"]
    if not isinstance(given, dict) or set(given) != {"source", "samples", "length", "seed", "batch_size"}:
        raise ConfigError(f"method {name}: calibration takes source, samples, length, seed and batch_size, got "
                          f"{given!r}")
    if given["length"] is not None:
        integer(f"method {name}: calibration.length", given["length"], minimum=2)
    one_of(name, "calibration source", given["source"], calibration.SOURCES)
    integer(f"method {name}: calibration.samples", given["samples"], minimum=1)
    integer(f"method {name}: calibration.seed", given["seed"])
    integer(f"method {name}: calibration.batch_size", given["batch_size"], minimum=1)


def eligible_layers(info: dict, reduce_at: str) -> list[int]:
    """The layers that may reduce: with an SSM mixer (`ssm`), or also attention layers (`all`)."""
    if reduce_at not in REDUCE_AT:
        raise ConfigError(f"unknown reduce_at {reduce_at!r}: use ssm (layers with an SSM mixer) or all (attention "
                          f"layers too)")
    allowed = architecture.has_ssm if reduce_at == "ssm" else (
        lambda kind: architecture.has_ssm(kind) or architecture.has_attention(kind))
    return [i for i, kind in enumerate(architecture.kinds(info)) if allowed(kind)]


def nearest(anchor: int, allowed: list[int]) -> int:
    """The allowed layer nearest to `anchor` (ties: the later one)."""
    return min(allowed, key=lambda layer: (abs(layer - anchor), -layer))


def reduction_layers(layers, info: dict, reduce_at: str = "ssm") -> list[int]:
    """`layers` from the config (None: budget.default_layers, each on its nearest allowed layer), checked against the
    model's depth and the layers `reduce_at` allows."""
    n_layer = info["n_layer"]
    allowed = eligible_layers(info, reduce_at)
    if layers is None:
        return sorted({nearest(anchor, allowed) for anchor in budget.default_layers(n_layer)}) if allowed else []
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise ConfigError(f"layers must be a list of block indices like [2, 5, 8] (or null), got {layers!r}")
    layers = list(layers)
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ConfigError(f"layers must be integers (0-based block indices), got {layer!r}")
        if not 0 <= layer < n_layer:
            raise ConfigError(f"layer {layer} is outside this {n_layer}-layer model (valid: 0..{n_layer - 1})")
        if layer not in allowed:
            kind = architecture.kinds(info)[layer]
            hint = " (use reduce_at=all)" if reduce_at == "ssm" and kind == architecture.ATTENTION else ""
            raise ConfigError(f"layer {layer} is {architecture.layer_name(kind)}, and reduce_at={reduce_at} reduces at "
                              f"{'layers with an SSM mixer' if reduce_at == 'ssm' else 'SSM and attention layers'} "
                              f"only{hint}: this model has {architecture.describe(info)}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers {layers} repeats a block")
    return sorted(layers)


def resolve(cfg, info: dict) -> Setup:
    """Everything a reducer needs from the config and the model's facts, or a one-line ConfigError."""
    from omegaconf import OmegaConf

    given = OmegaConf.to_container(cfg.method, resolve=True) if OmegaConf.is_config(cfg.method) else dict(cfg.method)
    name = given.get("name")
    params = method_params(name, given)
    entry = METHODS[name]
    if entry.filters_delta:
        return resolve_filter(cfg, info, name, params)
    layers = reduction_layers(OmegaConf.to_container(cfg.layers) if OmegaConf.is_config(cfg.get("layers"))
                              else cfg.get("layers"), info, cfg.get("reduce_at", "ssm"))
    ratio = cfg.get("ratio")
    direct = params.get("reduce_ratio") is not None  # official: its code's per-layer keep fraction replaces ratio
    if ratio is None and not direct:
        raise ConfigError(f"method={name} needs ratio=<fraction of FLOPs removed>, e.g. ratio=0.3")
    if not direct and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1):
        raise ConfigError(f"ratio must be a number with 0 < ratio < 1 (fraction of FLOPs removed), got {ratio!r}")
    if params.get("importance") == "delta":
        check_delta(info, layers)
    if not layers:
        log.warning(f"layers=[] selects no reduction layer: method={name} runs the dense model (a control); "
                    f"use layers=null for the default layers")
    model_cfg = cfg.get("model") or {}
    reference_length = int(model_cfg.get("max_length") or 2048)
    schedule = check_schedule(cfg.get("schedule", "smooth"), info, params)
    trapezoid = check_trapezoid(cfg.get("trapezoid", "kept"), info)
    rotation = check_rotation(cfg.get("rotation", "kept"), info)
    if name == "ceiling" and (cfg.get("benchmark") or {}).get("kind") == "lm_eval" and not params["allow_accuracy"]:
        raise ConfigError("method=ceiling is a measuring device for efficiency (the cheapest cut at the budget's "
                          "counts, keeping each row's first tokens), not a method for accuracy: use "
                          "benchmark=efficiency, or method.allow_accuracy=true to evaluate it anyway")
    min_keep_rate = entry.min_keep_rate(params)
    if direct:
        keep_rate, target = float(params["reduce_ratio"]), None
    elif not layers:  # no reduction layer: the wrapped model is the dense model (a control), nothing to solve
        keep_rate, target = 1.0, float(ratio)
    else:
        keep_rate = budget.solve_keep_rate(info, layers, float(ratio), min_keep_rate, reference_length,
                                           f" by method {name}")
        target = float(ratio)
    setup = Setup(name=name, function=entry.function, params=params, layers=layers, keep_rate=keep_rate,
                  rule=entry.rule, overhead=entry.overhead, min_keep_rate=min_keep_rate, ratio=target,
                  reference_length=reference_length, strict=params["strict"], schedule=schedule,
                  uses_importance=entry.uses_importance, per_length=bool(architecture.attention_layers(info)),
                  trapezoid=trapezoid, rotation=rotation)
    return setup if name == "ceiling" else replace(setup, ceiling=ceiling_of(setup))


def resolve_filter(cfg, info: dict, name: str, params: dict) -> Setup:
    """A Δ filter's setup (longmamba): no reduction layer; the filtered layers (layers=null: every SSM layer), its
    calibration window and the length from which it acts, resolved; refusals before any work."""
    from omegaconf import OmegaConf

    if cfg.get("ratio") is not None:
        raise ConfigError(f"method={name} removes no token (it sets Δ to 0 in the global heads of long rows; the "
                          f"FLOPs stay the dense model's): leave ratio unset")
    hosts.of_info(info).check_delta(info)
    if info.get("mamba_version") != 2:
        raise ConfigError(f"method={name} filters the heads of Mamba-2 mixers; this model's SSM is Mamba-"
                          f"{info.get('mamba_version')}")
    layers = OmegaConf.to_container(cfg.layers) if OmegaConf.is_config(cfg.get("layers")) else cfg.get("layers")
    layers = architecture.ssm_layers(info) if layers is None else reduction_layers(layers, info, "ssm")
    model_cfg = cfg.get("model") or {}
    window = params["calibration"]["length"] or model_cfg.get("train_length")
    if window is None:
        raise ConfigError(f"method={name} calibrates on windows of the model's training length: set "
                          f"model.train_length or method.calibration.length")
    params = dict(params, calibration=dict(params["calibration"], length=int(window)),
                  min_length=params["min_length"] or -(-3 * int(window) // 2))
    return Setup(name=name, function=None, params=params, layers=[], keep_rate=1.0, rule="cumulative",
                 overhead="none", min_keep_rate=1.0, ratio=None,
                 reference_length=int(model_cfg.get("max_length") or 2048), strict=params["strict"],
                 uses_importance=False, filter_layers=tuple(layers))


def calibrate_filter(model, setup: Setup, tokenizer) -> longmamba.Calibration:
    """The Δ filter's calibration (longmamba.calibrate) on `calibration.samples` windows of the configured text."""
    given = setup.params["calibration"]
    windows = calibration.windows(given["source"], tokenizer, given["samples"], given["length"], given["seed"])
    device = next(model.parameters()).device
    return longmamba.calibrate(model, hosts.of_model(model), windows.to(device), list(setup.filter_layers),
                               setup.params["clamp_top"], setup.params["aggregate"], given["batch_size"])


def check_delta(info: dict, layers: list[int]) -> None:
    """importance=delta reads the SSM's Δ where the host's mixers compute it: every reduction layer needs one."""
    hosts.of_info(info).check_delta(info)
    kinds = architecture.kinds(info)
    without = [i for i in layers if not architecture.has_ssm(kinds[i])]
    if without:
        raise ConfigError(f"importance=delta needs an SSM mixer at every reduction layer; layer {without[0]} is "
                          f"{architecture.layer_name(kinds[without[0]])}")


def ceiling_of(setup: Setup) -> Setup:
    """The `ceiling` at a method's schedule: its layers, keep rate, removal rule, per-layer limit and schedule
    (hence its integer counts), with the cut in place of the method's decision."""
    entry = METHODS["ceiling"]
    return replace(setup, name="ceiling", function=entry.function, params=dict(strict=setup.strict),
                   overhead=entry.overhead, uses_importance=entry.uses_importance, ceiling=None)


def check_trapezoid(trapezoid, info: dict) -> str:
    """`trapezoid` (top-level key): Mamba-3's trapezoidal step mixes each token with the one before it; after a
    reduction a kept token's neighbour is the previous kept token (`kept`), or, where its original predecessor was
    removed or merged away, none (`none`: the step of the token alone, Mamba-2's Euler step)."""
    if trapezoid not in TRAPEZOIDS:
        raise ConfigError(f"unknown trapezoid {trapezoid!r}: use kept (the previous kept token is a token's trapezoid "
                          f"neighbour) or none (no neighbour after a removal)")
    if trapezoid == "none" and info.get("mamba_version") != 3:
        raise ConfigError("trapezoid=none is for Mamba-3's trapezoidal step; this model's SSM is Mamba-"
                          f"{info.get('mamba_version')}")
    return trapezoid


def check_rotation(rotation, info: dict) -> str:
    """`rotation` (top-level key): Mamba-3 rotates B and C by an angle each token advances by its own step; after a
    reduction a kept token advances it by its step alone, over the kept tokens only (`kept`), or by its step times
    the original tokens it stands for (`positions`: the positions since the previous kept token; `sizes`: the tokens
    merged into it), as if the removed ones had its step (hosts.mamba_ssm.attach_rotation)."""
    if rotation not in ROTATIONS:
        raise ConfigError(f"unknown rotation {rotation!r}: use kept (a kept token's own step), positions (its step "
                          f"times the positions since the previous kept token) or sizes (times the tokens merged "
                          f"into it)")
    if rotation != "kept" and info.get("mamba_version") != 3:
        raise ConfigError("rotation=positions / sizes is for Mamba-3's data-dependent rotation; this model's SSM is "
                          f"Mamba-{info.get('mamba_version')}")
    return rotation


def check_schedule(schedule, info: dict, params: dict) -> str:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}: use smooth (the budget's integer counts) or chunk "
                          f"(counts in whole Mamba-2 SSD chunks, multiples of 16 tokens on Mamba-1)")
    if schedule == "chunk" and not architecture.uniform(info):
        raise ConfigError(f"schedule=chunk counts tokens in whole SSD chunks, which prices every layer alike; this "
                          f"model's layers differ ({architecture.describe(info)}): use schedule=smooth")
    if schedule == "chunk" and params.get("reduce_ratio") is not None:
        raise ConfigError("method official: reduce_ratio fixes its per-layer ceil counts, schedule=chunk replaces "
                          "them: set ratio= instead (reduce_ratio=null), or use schedule=smooth")
    return schedule


def model_facts(cfg, model_config: dict) -> dict:
    """The architecture description of the run's model, with the host's refusals (ConfigError) first."""
    host = hosts.of(cfg.model)
    info = host.info_from_config(model_config)
    host.check_reduction(info)
    return info


def check_config(cfg, model_config: dict) -> None:
    """Raise ConfigError for anything from_config would reject (called by runner.validate before loading)."""
    resolve(cfg, model_facts(cfg, model_config))


def check_lengths(cfg, model_config: dict, lengths) -> None:
    """strict=true: a ConfigError, before any work, when a row length a run will use (the measured shape) cannot
    reach the ratio with the integer schedule (the reducer would stop at its first forward)."""
    info = model_facts(cfg, model_config)
    setup = resolve(cfg, info)
    if setup.strict:
        try:
            Schedule(setup, info).check_lengths(lengths)
        except ValueError as error:
            raise ConfigError(f"strict=true: {error}") from None


def from_config(model, cfg, info: dict, tokenizer=None) -> Reducer:
    """Wrap `model` for token reduction as cfg says (method, ratio, layers); see the module docstring. `tokenizer`:
    the model's, for a method that calibrates on text (longmamba)."""
    setup = resolve(cfg, info)
    if setup.filter_layers and tokenizer is None:
        raise ConfigError(f"method={setup.name} calibrates on text: it needs the model's tokenizer")
    reducer = Reducer(model, setup, info)  # attaching its hooks checks every hooked module, before any work
    if setup.filter_layers:  # its filter hooks change nothing until the reducer runs, so the calibration sees dense Δ
        try:
            reducer.setup = replace(setup, calibration=calibrate_filter(model, setup, tokenizer))
        except BaseException:
            reducer.remove()
            raise
    return reducer
