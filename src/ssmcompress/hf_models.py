"""Load, build and save Hugging Face transformers causal LMs (OPT, the LLaMA family, GPT-2, ...) and their tokenizers.

The `hf` model family (a model config says `family: hf`); models.py is the `mamba` family and has the same functions.
A source is a hub name (`facebook/opt-125m`) or a local directory in the hub's format, as `save_pretrained` writes
it: config.json (with `model_type`), model.safetensors or pytorch_model.bin (or a sharded index), tokenizer files.
Everything is `transformers.AutoModelForCausalLM`'s own loading; what is added here are errors of one line.
Token reduction hooks mamba-ssm blocks and does not apply to these models: `check_config` refuses it before any work.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ssmcompress import hub, models
from ssmcompress.errors import ConfigError, ModelSourceError
from ssmcompress.models import resolve_device, resolve_dtype

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def is_model(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def check_config(cfg) -> dict:
    """The `model` section of a transformers model, before any work (models.check_settings, the source's
    config.json, weights and tokenizer), and what it cannot do here: token reduction. Returns its config dict."""
    if cfg.method.name != "dense":
        raise ConfigError(f"method={cfg.method.name}: token reduction is implemented for mamba-ssm models only, and "
                          f"model {cfg.model.name} is a transformers model (family: hf); use method=dense "
                          f"(weight pruning, pruner=..., works on both families)")
    model = models.check_settings(cfg)
    if model["random_init"]:
        config = model["config"]
        if "model_type" not in config:
            raise ModelSourceError("model.config of a transformers model needs its model_type (e.g. opt, llama)")
    else:
        config = load_config(model["path"])
        check_weights(model["path"])
    if models.needs_tokenizer(cfg):
        check_tokenizer(model["tokenizer"])
    return config


def check_weights(source: str) -> None:
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise ModelSourceError(f"model directory {source!r} has config.json but no weights "
                                   f"({', '.join(WEIGHT_FILES)})")
    else:
        hub.require(source)  # the repository answers (transformers picks its weight files)


def check_tokenizer(source: str) -> None:
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelSourceError(f"{source!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); set "
                                   f"model.tokenizer to a tokenizer name or directory")
    elif not models.HUB_NAME.match(source):
        raise ModelSourceError(f"tokenizer {source!r} is neither a directory nor a hub name")
    else:
        hub.require(source, "tokenizer_config.json")


def load_config(source: str) -> dict:
    """config.json of a local directory or hub model, which must name a transformers `model_type`."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model path {source!r} is a file; give the directory holding config.json")
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {source!r} has no config.json (expected the Hugging Face "
                                   f"format that save_pretrained writes: config.json + model.safetensors)")
        config = models.read_json(path / "config.json", "model config")
    else:
        config = models.load_config(source)  # a hub name: the cache, or the hub when it answers
    if "model_type" not in config:
        raise ModelSourceError(f"{source!r}: config.json has no model_type, so it is not a transformers model "
                               f"(family: hf); a mamba-ssm model needs family: mamba")
    return config


def transformers_config(config: dict):
    """The `PretrainedConfig` of a config dict (config.json's fields, `model_type` included)."""
    from transformers import AutoConfig

    fields = dict(config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build_model(config: dict, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                seed: int | None = 0):
    """A randomly initialised causal LM (transformers' own init) for a config dict."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(transformers_config(config), dtype=dtype)
    return model.to(device).eval()


def load_model(source: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               random_init: bool = False, config: dict | None = None, seed: int = 0):
    """Load a pretrained model, or build one with random weights (`random_init`, from `config` if given)."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if random_init:
        return build_model(config if config is not None else load_config(source), device, dtype, seed=seed)
    load_config(source)
    check_weights(source)  # a hub repository has answered, or the directory holds weights
    path = Path(source).expanduser()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else source, dtype=dtype)
    except OSError as error:
        raise ModelSourceError(f"cannot load {source!r}: {str(error).splitlines()[0][:200]}") from None
    return model.to(device).eval()


def load_tokenizer(source: str):
    """A tokenizer from a local directory (any format AutoTokenizer reads) or a hub name (models.auto_tokenizer)."""
    check_tokenizer(source)
    return models.auto_tokenizer(source)


def save_model(model, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """`save_pretrained` (config.json + model.safetensors), the weights cast to `dtype` if given, and the tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, converted = None, {}
    if dtype is not None:  # tied tensors (embedding = lm_head) stay one tensor, which save_pretrained writes once
        state = {}
        for name, tensor in model.state_dict().items():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if key not in converted:
                converted[key] = tensor.detach().to(dtype if tensor.is_floating_point() else tensor.dtype)
            state[name] = converted[key]
    model.save_pretrained(directory, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def model_info(model) -> dict:
    """Architecture facts for the logs (the FLOPs model and the reducer describe mamba-ssm models only)."""
    config = model.config
    return dict(family="hf", model_type=config.model_type, d_model=config.hidden_size,
                n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                vocab_size=model.get_output_embeddings().weight.shape[0],
                params=sum(p.numel() for p in model.parameters()))
