"""Model sources and settings every host shares: devices and dtypes, local directories and hub names, config.json,
tokenizers, and the `model` section's common settings. What a library builds from them is its host's
(`ssmcompress.hosts`). Hub files go through `ssmcompress.hub` (huggingface_hub's cache, endpoint, proxies and
offline mode).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ssmcompress import hub
from ssmcompress.config import integer, to_dict
from ssmcompress.errors import ModelSourceError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


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


def source_config(source: str) -> dict:
    """config.json of a local directory or hub model (the cache, or the hub when it answers), with clear errors."""
    directory = local_dir(source)
    if directory is None:
        return read_json(Path(hub.file(source, "config.json")), f"config.json of {source!r}:")
    if not (directory / "config.json").is_file():
        raise ModelSourceError(f"model directory {source!r} has no config.json (a checkpoint directory holds "
                               f"config.json and its weights, as the hub and save_pretrained write them)")
    return read_json(directory / "config.json", "model config")


def check_settings(cfg) -> dict:
    """The `model` section's settings any family shares, before any work: device, dtype, max_length, random_init
    (and, for a random init, its architecture). Returns the section as a dict."""
    model = to_dict(cfg.model)
    device = resolve_device(model.get("device", "auto"))
    resolve_dtype(model.get("dtype", "auto"), device)
    integer("model.max_length", model.get("max_length"), minimum=1)
    if model.get("train_length") is not None:
        integer("model.train_length", model["train_length"], minimum=2)
    if not isinstance(model.get("random_init"), bool):
        raise ModelSourceError(f"model.random_init must be true or false, got {model.get('random_init')!r}")
    if model["random_init"] and not isinstance(model.get("config"), dict):
        raise ModelSourceError(f"model.random_init=true needs model.config (the architecture), got "
                               f"{model.get('config')!r}")
    if not model["random_init"] and model.get("path") is None:
        raise ModelSourceError(f"model {model.get('name')!r} has no released weights (model.path is null): run it with "
                               f"model.random_init=true, or load a checkpoint with model=local model.path=DIR")
    return model


def needs_tokenizer(cfg) -> bool:
    """Runs that read text: lm-eval benchmarks, pruning and a method that calibrates (their calibration windows)."""
    return (cfg.benchmark.get("kind") == "lm_eval" or cfg.pruner.name != "none"
            or cfg.method.get("calibration") is not None)


def check_tokenizer(source: str) -> None:
    """The tokenizer exists: a directory with tokenizer files, or a hub name (cached, or answered by the hub)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelSourceError(f"{source!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); set "
                                   f"model.tokenizer to a tokenizer name or directory")
        return
    if not HUB_NAME.match(source):
        raise ModelSourceError(f"tokenizer {source!r} is neither a directory nor a hub name")
    hub.require(source, "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------------- tokenizers

def load_tokenizer(source: str):
    """A tokenizer from a local directory (any format AutoTokenizer reads) or a hub tokenizer name."""
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
