"""Generation with token reduction: the prompt is prefilled through the reducer, the answer decoded from the states
the prefill cached.

Built on each library's own generation (its host's `generate`: mamba-ssm's `decode`, with its InferenceParams cache,
its sampling with temperature / top-k / top-p / min-p and on a GPU its CUDA-graph decoding; transformers' `generate`
with its cache classes); no second decoding loop. The reducer takes part in the prefill only
(`Reducer.prefilling`): every reduction layer shortens the prompt as in a scored forward, so each layer caches the
states (and each attention layer the keys and values) of the tokens it actually saw, and each row's last prompt
position is kept (its logits start decoding). Decoding steps run dense on the cached states, at the original
positions.

A batch of prompts of one length is generated together (a padded prompt would put its padding into the cached
state), so `generate_each` groups prompts by length: a prompt generates the same tokens alone and in any batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ssmcompress import hosts


@dataclass(frozen=True)
class Sampling:
    """mamba-ssm's sampling options; the defaults are greedy decoding."""

    top_k: int = 1
    top_p: float = 0.0
    min_p: float = 0.0
    temperature: float = 1.0


def generate(model, input_ids: Tensor, max_new_tokens: int, reducer=None, sampling: Sampling = Sampling(),
             eos_token_id: int | None = None, cg: bool | None = None) -> Tensor:
    """(batch, length + up to max_new_tokens) tokens: the prompts (all of one length) and what was generated. With a
    reducer the prompt is prefilled reduced; `cg`: CUDA-graph decoding (mamba-ssm's captured steps, transformers'
    compiled static-cache steps; default: on a GPU where the host replays graphs without compiling per shape)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, length >= 1), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    host = hosts.of_model(model)
    cg = input_ids.is_cuda and host.CUDA_GRAPHS if cg is None else cg
    with torch.no_grad():
        return host.generate(model, input_ids, max_new_tokens, sampling, eos_token_id, cg, reducer)


def prefill(model, input_ids: Tensor, reducer=None) -> Tensor:
    """The prompt's forward into a fresh cache, as the library's generation prefills (reduced with a reducer): the
    last position's logits."""
    return _prefilled(model, input_ids, reducer)[0]


def prefill_kv_cache_bytes(model, input_ids: Tensor, reducer=None) -> int:
    """Bytes of the attention keys and values the prompt's prefill (reduced with a reducer) leaves in the cache."""
    return hosts.of_model(model).kv_cache_bytes(model, _prefilled(model, input_ids, reducer)[1])


def _prefilled(model, input_ids: Tensor, reducer) -> tuple[Tensor, object]:
    with torch.no_grad(), (reducer.prefilling() if reducer is not None else contextlib.nullcontext()):
        return hosts.of_model(model).prefill_cache(model, input_ids)


def generate_each(model, prompts: list[list[int]], max_new_tokens: int, reducer=None, batch_size: int = 16,
                  sampling: Sampling = Sampling(), eos_token_id: int | None = None) -> list[list[int]]:
    """The new tokens of every prompt (up to and without the first eos), in the prompts' order: prompts of one
    length are generated together, `batch_size` at a time."""
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        groups.setdefault(len(prompt), []).append(index)
    out: list[list[int] | None] = [None] * len(prompts)
    for length, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            sequences = generate(model, ids, max_new_tokens, reducer, sampling, eos_token_id)[:, length:].tolist()
            for i, new in zip(chunk, sequences):
                out[i] = new[:new.index(eos_token_id)] if eos_token_id in new else new
    return out
