"""Load, build and save mamba-ssm language models (Mamba-1 and Mamba-2) and their tokenizers.

A model source is either a Hugging Face hub name (`state-spaces/mamba2-2.7b`) or a local directory in the same
format: `config.json` (a `MambaConfig`) and `pytorch_model.bin`, plus, for our bundled models, the tokenizer files.
Hub files go through `ssmcompress.hub` (huggingface_hub's cache, endpoint, proxies and offline mode).

mamba-ssm is imported when a model is first built, not when this module is: its import (Triton, transformers) takes
seconds, and the config checks of a run (`check_config`) come first, so that bad input is refused quickly.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ssmcompress import architecture, compat, hub
from ssmcompress.config import integer, to_dict
from ssmcompress.errors import ModelSourceError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHTS = "pytorch_model.bin"


def mamba_ssm():
    """mamba-ssm's (MambaConfig, MambaLMHeadModel), importable on any device once compat has routed its kernels."""
    compat.install()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return MambaConfig, MambaLMHeadModel


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (fp16/bf16 matmuls are slow or missing there) and fp16 on CUDA, as in the paper."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelSourceError(f"invalid dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelSourceError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ModelSourceError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelSourceError(f"device {device!r} requested but CUDA is not available here; use device=cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelSourceError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return resolved


# ---------------------------------------------------------------------------------------------------- sources

def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelSourceError(f"{what} {path} cannot be read as JSON ({type(error).__name__}: "
                               f"{str(error).splitlines()[0] if str(error) else 'empty'})") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{what} {path} holds a {type(value).__name__}, not a JSON object")
    return value


def local_dir(source: str) -> Path | None:
    """The source as a local directory (None for a hub name); a clear error for anything else."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model path {source!r} is a file; give the directory holding config.json")
        return path
    if not HUB_NAME.match(source):
        raise ModelSourceError(f"model path {source!r} does not exist and is not a hub name like "
                               f"'state-spaces/mamba2-2.7b'")
    return None


def load_config(source: str) -> dict:
    """The `MambaConfig` fields of a local directory or hub model, with clear errors for unusable sources."""
    directory = local_dir(source)
    if directory is None:
        return read_json(Path(hub.file(source, "config.json")), f"config.json of {source!r}:")
    if not (directory / "config.json").is_file():
        raise ModelSourceError(f"model directory {source!r} has no config.json (expected mamba-ssm format: "
                               f"config.json + {WEIGHTS})")
    return read_json(directory / "config.json", "model config")


def check_weights(source: str) -> None:
    """The weights file exists (locally, in the hub cache, or on the hub); reading it is the run's first work."""
    directory = local_dir(source)
    if directory is None:
        hub.require(source, WEIGHTS)
    elif not (directory / WEIGHTS).is_file():
        raise ModelSourceError(f"model directory {source!r} has config.json but no {WEIGHTS}")


def check_settings(cfg) -> dict:
    """The `model` section's settings any family shares, before any work: device, dtype, max_length, random_init
    (and, for a random init, its architecture). Returns the section as a dict."""
    model = to_dict(cfg.model)
    device = resolve_device(model.get("device", "auto"))
    resolve_dtype(model.get("dtype", "auto"), device)
    integer("model.max_length", model.get("max_length"), minimum=1)
    if not isinstance(model.get("random_init"), bool):
        raise ModelSourceError(f"model.random_init must be true or false, got {model.get('random_init')!r}")
    if model["random_init"] and not isinstance(model.get("config"), dict):
        raise ModelSourceError(f"model.random_init=true needs model.config (the architecture), got "
                               f"{model.get('config')!r}")
    return model


def needs_tokenizer(cfg) -> bool:
    """Runs that read text: lm-eval benchmarks, and pruning (its calibration windows)."""
    return cfg.benchmark.get("kind") == "lm_eval" or cfg.pruner.name != "none"


def check_config(cfg) -> dict:
    """The `model` section of a mamba-ssm model, before any work: the shared settings, the source's config.json (or
    the config of a random init), its weights and, when the run reads text, its tokenizer. Returns the model's
    config dict."""
    model = check_settings(cfg)
    if model["random_init"]:
        config = model["config"]
    else:
        config = load_config(model["path"])
        check_weights(model["path"])
    try:
        architecture.info_from_config(config)
    except (TypeError, ValueError, KeyError) as error:
        raise ModelSourceError(f"model config of {model.get('path')!r} is not a mamba-ssm config: {error}") from None
    if needs_tokenizer(cfg):
        check_tokenizer(model["tokenizer"])
    return config


def check_tokenizer(source: str) -> None:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ModelSourceError(f"{source!r} has no tokenizer.json; set model.tokenizer to a tokenizer name or dir")
        return
    if not HUB_NAME.match(source):
        raise ModelSourceError(f"tokenizer {source!r} is neither a directory nor a hub name")
    hub.require(source, "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------------- models

def build_model(config: dict, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                seed: int | None = 0):
    """A randomly initialised `MambaLMHeadModel` (mamba-ssm's own init, drawn from `seed`) for a config dict."""
    MambaConfig, MambaLMHeadModel = mamba_ssm()
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    fields = {k: v for k, v in compat.adapt_config(config).items() if k in MambaConfig.__dataclass_fields__}
    if seed is not None:
        torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(**fields), device=device, dtype=dtype)
    return model.eval()


def load_model(source: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               random_init: bool = False, config: dict | None = None, seed: int = 0):
    """Load a pretrained model, or build one with random weights drawn from `seed` (`random_init`, from `config`
    if given)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if random_init:
        return build_model(config if config is not None else load_config(source), device, dtype, seed=seed)
    model_config = load_config(source)
    state = load_state_dict(source)  # before building: a corrupt file fails before any memory is spent
    model = build_model(model_config, device, dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ModelSourceError(f"the weights of {source!r} do not fit its config.json: "
                               f"{str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}"
                               ) from None
    return model.eval()


def load_state_dict(source: str) -> dict:
    """The weights file of a local directory or hub model (as mamba-ssm's own `load_state_dict_hf` reads it), with a
    one-line error for a truncated or corrupt file."""
    directory = local_dir(source)
    path = directory / WEIGHTS if directory is not None else Path(hub.file(source, WEIGHTS))
    if not path.is_file():
        raise ModelSourceError(f"model directory {source!r} has config.json but no {WEIGHTS}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise ModelSourceError(f"cannot read the weights {path}: the file is truncated or corrupt ({first}); "
                               f"copy or download it again") from None


def load_tokenizer(source: str):
    """A tokenizer from a local model directory (tokenizer.json) or a hub tokenizer name."""
    check_tokenizer(source)
    return auto_tokenizer(source)


def auto_tokenizer(source: str):
    """transformers' AutoTokenizer for a checked source (a directory, or a hub name in the cache or answered by the
    hub), padding with eos where it has no pad token, as lm-eval's mamba_ssm backend and the paper do."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except OSError:
                tokenizer = AutoTokenizer.from_pretrained(source)  # the check: the hub has answered
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load tokenizer {source!r}: {str(error).splitlines()[0][:200]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_model(model, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """Write `config.json` + `pytorch_model.bin` (mamba-ssm's hub format), optionally the tokenizer too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.__dict__)
    ssm_cfg = dict(config.get("ssm_cfg") or {})
    ssm_cfg.pop("use_mem_eff_path", None)  # a property of where it runs, not of the model
    config["ssm_cfg"] = ssm_cfg
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state, converted = {}, {}  # tied tensors (embedding = lm_head) stay one tensor in the file
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in converted:
            target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            converted[key] = tensor.detach().to("cpu", target).clone()
        state[name] = converted[key]
    torch.save(state, directory / WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def model_info(model) -> dict:
    """Architecture facts used by the FLOPs model, the reducer and the logs (architecture.info_from_config gives the
    same from a config dict, without the parameter count)."""
    config = model.config
    mixer = model.backbone.layers[0].mixer
    ssm_layer = (config.ssm_cfg or {}).get("layer", "Mamba1")
    info = dict(generation=2 if ssm_layer == "Mamba2" else 1, d_model=config.d_model, n_layer=config.n_layer,
                vocab_size=model.lm_head.weight.shape[0], d_inner=mixer.d_inner, d_state=mixer.d_state,
                d_conv=mixer.d_conv, params=sum(p.numel() for p in model.parameters()))
    if info["generation"] == 2:
        info.update(nheads=mixer.nheads, headdim=mixer.headdim, ngroups=mixer.ngroups, chunk_size=mixer.chunk_size)
    else:
        info.update(dt_rank=mixer.dt_rank)
    return info
