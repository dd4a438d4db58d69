"""Analytic forward FLOPs of Mamba / Mamba-2 language models, per layer and per token count.

Convention (as fvcore): one multiply-add counts as one FLOP; elementwise work (activations, gates, decays)
counts where noted. The token-reduction budget is solved with this model, and the evaluator reports it, so
every method is compared at the same FLOPs by the same ruler. `model_info` comes from `models.model_info`.
"""
from __future__ import annotations

import math


def mixer_flops_per_token(info: dict, n_tokens: int) -> dict[str, float]:
    """FLOPs per token of one block at sequence length n_tokens, by component."""
    d, e, n = info["d_model"], info["d_inner"], info["d_state"]
    k = info["d_conv"]
    if info["generation"] == 2:
        g, h = info["ngroups"], info["nheads"]
        chunk = min(info.get("chunk_size", 256), max(1, n_tokens))
        return dict(
            in_proj=d * (2 * e + 2 * g * n + h),
            conv=(e + 2 * g * n) * k,
            # SSD, chunked: C·Bᵀ and (L∘CBᵀ)·x within a chunk, chunk states Bᵀx and their read-out C·state
            scan=chunk * g * n + chunk * e + 2 * e * n,
            norm=e + d,  # gated RMSNorm of y, the block's add+RMSNorm
            out_proj=e * d,
        )
    r = info["dt_rank"]
    return dict(
        in_proj=d * 2 * e,
        conv=e * k,
        x_proj=e * (r + 2 * n),
        dt_proj=r * e,
        scan=3 * e * n + 2 * e,  # discretise (dt·B·x), update the state, read out C·h; D skip and gate
        norm=d,
        out_proj=e * d,
    )


def layer_flops(info: dict, n_tokens: float) -> float:
    per_token = sum(mixer_flops_per_token(info, int(math.ceil(n_tokens))).values())
    return per_token * n_tokens


def lm_head_flops(info: dict, n_tokens: float) -> float:
    return info["d_model"] * info["vocab_size"] * n_tokens


def forward_flops(info: dict, tokens_per_layer: list[float], logits_tokens: float | None = None,
                  extra: float = 0.0) -> dict:
    """FLOPs of one forward: `tokens_per_layer[i]` tokens enter block i; logits for `logits_tokens` positions
    (default: the tokens leaving the last block); `extra` adds the reduction's own work (matching, merging)."""
    if len(tokens_per_layer) != info["n_layer"]:
        raise ValueError(f"need {info['n_layer']} token counts, got {len(tokens_per_layer)}")
    per_layer = [layer_flops(info, t) for t in tokens_per_layer]
    head = lm_head_flops(info, tokens_per_layer[-1] if logits_tokens is None else logits_tokens)
    return dict(total=sum(per_layer) + head + extra, per_layer=per_layer, lm_head=head, reduction=extra)


def dense_flops(info: dict, n_tokens: float) -> float:
    return forward_flops(info, [n_tokens] * info["n_layer"])["total"]
