"""Load, build and save mamba-ssm language models (Mamba-1 and Mamba-2) and their tokenizers.

A model source is either a Hugging Face hub name (`state-spaces/mamba2-2.7b`) or a local directory in the same
format: `config.json` (a `MambaConfig`) and `pytorch_model.bin`, plus, for our bundled models, the tokenizer files.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ssmcompress import compat

compat.install()

from mamba_ssm.models.config_mamba import MambaConfig  # noqa: E402
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSourceError(ValueError):
    """A model path, dtype or device that cannot be used; the message says what to do instead."""


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


def hub_offline_message(name: str) -> str:
    return (f"cannot fetch {name!r}: the Hugging Face hub is unreachable (offline) and it is not in the local cache. "
            f"On a machine with hub access run `huggingface-cli download {name} --local-dir DIR`, copy DIR here and "
            f"pass model.path=DIR")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, decided in seconds (huggingface_hub itself retries for ~30 s)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_config(source: str) -> dict:
    """The `MambaConfig` fields of a local directory or hub model, with clear errors for unusable sources."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model path {source!r} is a file; give the directory holding config.json")
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {source!r} has no config.json (expected mamba-ssm format: "
                                   f"config.json + pytorch_model.bin)")
        return json.loads((path / "config.json").read_text())
    if not HUB_NAME.match(source):
        raise ModelSourceError(f"model path {source!r} does not exist and is not a hub name like "
                               f"'state-spaces/mamba2-2.7b'")
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import cached_file

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if not hub_reachable():
        raise ModelSourceError(hub_offline_message(source))
    try:
        resolved = cached_file(source, "config.json")
    except OSError as error:
        text = str(error).lower()
        if "connect" in text or "offline" in text or "resolve" in text or "network" in text or "cache" in text:
            raise ModelSourceError(hub_offline_message(source)) from None
        raise ModelSourceError(f"cannot load {source!r} from the hub: {error}".splitlines()[0]) from None
    return json.loads(Path(resolved).read_text())


def build_model(config: dict, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                seed: int | None = 0) -> MambaLMHeadModel:
    """A randomly initialised `MambaLMHeadModel` (mamba-ssm's own init) for a config dict."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    fields = {k: v for k, v in compat.adapt_config(config).items() if k in MambaConfig.__dataclass_fields__}
    if seed is not None:
        torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(**fields), device=device, dtype=dtype)
    return model.eval()


def load_model(source: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               random_init: bool = False, config: dict | None = None) -> MambaLMHeadModel:
    """Load a pretrained model, or build one with random weights (`random_init`, from `config` if given)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if random_init:
        return build_model(config if config is not None else load_config(source), device, dtype)
    model_config = load_config(source)
    model = build_model(model_config, device, dtype)
    model.load_state_dict(_load_state_dict(source, model_config))
    return model.eval()


def _load_state_dict(source: str, config: dict) -> dict:
    path = Path(source).expanduser()
    if path.is_dir():
        weights = path / "pytorch_model.bin"
        if not weights.is_file():
            raise ModelSourceError(f"model directory {source!r} has config.json but no pytorch_model.bin")
        return torch.load(weights, map_location="cpu", weights_only=True)
    from mamba_ssm.utils.hf import load_state_dict_hf

    try:
        return load_state_dict_hf(source, device="cpu")
    except OSError:
        raise ModelSourceError(hub_offline_message(source)) from None


def load_tokenizer(source: str):
    """A tokenizer from a local model directory (tokenizer.json) or a hub tokenizer name."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        raise ModelSourceError(f"{source!r} has no tokenizer.json; set model.tokenizer to a tokenizer name or dir")
    try:
        if path.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            except OSError:
                if not hub_reachable():
                    raise
                tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError:
        raise ModelSourceError(hub_offline_message(source)) from None
    if tokenizer.pad_token_id is None:  # as lm-eval's mamba_ssm backend and the paper: pad with eos
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_model(model: MambaLMHeadModel, directory: str | os.PathLike, tokenizer=None,
               dtype: torch.dtype | None = None) -> None:
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
    torch.save(state, directory / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def model_info(model: MambaLMHeadModel) -> dict:
    """Architecture facts used by the FLOPs model, the reducer and the logs."""
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
