"""lm-eval's front door: the model `ssmcompress` built from string model_args, and the `ssmcompress-lm-eval` command.

    import lm_eval, ssmcompress
    lm_eval.simple_evaluate(model="ssmcompress", model_args="pretrained=state-spaces/mamba2-2.7b,method=ours,ratio=0.3",
                            tasks=["lambada_openai"])
    ssmcompress-lm-eval --model ssmcompress --model_args pretrained=mamba2-tiny,method=ours,ratio=0.3 --tasks mqar \\
        --include_path <dir>

model_args are the main job's settings, built through the same code (`runner.validate_model`, `runner.prepare`):
`pretrained` (a model config name such as mamba2-tiny, a hub name or a local directory), `tokenizer`, `dtype`,
`device`, `max_length`, `method`, `ratio`, `layers` (`layers=[2;5;8]`: lm-eval splits model_args at commas),
`protocol`, `pruner`, `sparsity`, `seed`, `schedule`, `reduce_at`, and any dotted key of the config (`method.q=0.8`,
`pruner.calibration.samples=64`). lm-eval's own --batch_size and --device apply. Launched by `accelerate launch -m
ssmcompress.lmeval ...` (or torchrun), each process evaluates its shard on its own GPU (runner.prepare places the model, lm_backend shards).
"""
from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from ssmcompress import hosts, models, runner
from ssmcompress.config import CONF_DIR, available
from ssmcompress.errors import ConfigError
from ssmcompress.evaluation.lm_backend import ReducedMambaLM, backend_for

# model_args keys -> config keys (the rest are top-level keys or dotted config keys)
ALIASES = {"tokenizer": "model.tokenizer", "dtype": "model.dtype", "device": "model.device",
           "max_length": "model.max_length"}
TOP_LEVEL = ("method", "ratio", "layers", "protocol", "pruner", "sparsity", "seed", "schedule", "reduce_at")


def override_value(value) -> str:
    """A parsed model_args value back as Hydra override text (`layers=[2;5;8]` -> [2,5,8])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    if text.startswith("[") and text.endswith("]"):
        return text.replace(";", ",")
    return text


def overrides_from_args(args: dict) -> list[str]:
    """Hydra overrides for model_args: the model config named by `pretrained` (or `model=local` with its path)."""
    args = {k: v for k, v in args.items() if v is not None or k == "pretrained"}
    source = args.pop("pretrained", None)
    if not source:
        raise ConfigError("model_args need pretrained=<model config name, hub name or local directory>")
    source = str(source)
    overrides = [f"model={source}"] if source in available("model") else ["model=local", f"model.path={source}"]
    if "model=local" in overrides and "tokenizer" not in args and "/" in source and not _is_dir(source) \
            and hub_family(source) == "mamba":
        args["tokenizer"] = "EleutherAI/gpt-neox-20b"  # hub mamba-ssm checkpoints ship no tokenizer (lm-eval's default)
    for key, value in args.items():
        name = ALIASES.get(key, key)
        if name not in TOP_LEVEL and "." not in name:
            raise ConfigError(f"unknown model_args key {key!r}: use pretrained, {', '.join([*ALIASES, *TOP_LEVEL])} "
                              f"or a dotted config key such as method.q")
        overrides.append(f"{name}={override_value(value)}")
    return overrides + ["logger=none"]


def hub_family(source: str) -> str:
    """The family of a hub checkpoint, by its config.json; mamba (whose checkpoints ship no tokenizer) where the hub
    cannot say: the run's own checks then report what is wrong with the source."""
    try:
        return hosts.detect(models.source_config(source))
    except ConfigError:
        return "mamba"


def _is_dir(source: str) -> bool:
    from pathlib import Path

    return Path(source).expanduser().is_dir()


def lm_eval_device(device: str) -> str:
    """lm-eval's --device as its own `hf` backend takes it: a device index this machine lacks (its command line's
    `cuda:0` on a machine without a GPU) means the best device there is (auto), while `cuda` and `cpu` are taken as
    given (`cuda` without a GPU is an error, as there)."""
    if device.startswith("cuda:") and device[5:].isdigit() and int(device[5:]) >= torch.cuda.device_count():
        return "auto"
    return device


def compose_config(overrides: list[str]):
    """The main job's config for these overrides (also from inside a running Hydra app)."""
    try:
        if GlobalHydra.instance().is_initialized():
            return compose("config", overrides=overrides)
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"model_args: {str(error).splitlines()[0]}") from None


class SsmcompressLM(ReducedMambaLM):
    """The model registered as `ssmcompress` on `import ssmcompress`: its constructors build the model and reducer from
    lm-eval's string model_args and return the backend of the model's library (lm_backend.backend_for)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "SsmcompressLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "SsmcompressLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        batch_size = extra.pop("batch_size", 1)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer (auto is not supported), got {batch_size!r}")
        args = dict(arg_dict)
        if "device" in extra and "device" not in args:
            args["device"] = lm_eval_device(str(extra["device"]))
        cfg = compose_config(overrides_from_args(args))
        runner.validate_model(cfg)
        prepared = runner.prepare(cfg)
        return backend_for(prepared.model)(prepared.model, prepared.tokenizer, reducer=prepared.reducer,
                                           protocol=cfg.protocol, batch_size=int(batch_size),
                                           max_length=cfg.model.max_length, source=str(cfg.model.path))


def main() -> None:
    """`ssmcompress-lm-eval <lm-eval's own options>`: lm-eval's command line with the `ssmcompress` model registered
    (lm-eval 0.4.13 does not discover third-party models from entry points)."""
    from lm_eval.__main__ import cli_evaluate  # lm-eval's CLI imports its whole stack: only for this command

    try:
        cli_evaluate()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
