"""Analytic forward FLOPs of Mamba-1/2/3 language models and their hybrids with attention, per layer and token count.

The token-reduction budget is solved with this model and the evaluator reports it, so every method is compared at
the same FLOPs by the same ruler. `info` is a host's architecture description (`ssmcompress.architecture`).

Convention (fvcore's, so that this model and `fvcore_count.count_forward` agree; a test holds them within 2%):
- one multiply-add counts as one FLOP (linear layers, convolutions, matmuls, the scan's contractions);
- a norm counts NORM_FLOPS_PER_ELEMENT = 5 per element, fvcore's own estimate for an affine `layer_norm`; the
  residual add fused into a block's norm and the gate fused into Mamba-2's gated norm are included in it;
- the scan counts the contractions of mamba-ssm's kernels (SSD for Mamba-2, the selective scan for Mamba-1, formulas
  below); fvcore cannot see inside those kernels, so its handles (fvcore_count.py) call these same functions;
- attention counts its projections and, for a causal prefill of n tokens, the n(n+1)/2 query-key pairs each of its
  two products (scores, weighted values) computes per head: the causal half, as FlashAttention counts it; fvcore has
  no handle for scaled_dot_product_attention, and ours (fvcore_count.py) counts the same pairs;
- an MLP counts its matrices; a mixture of experts its router, the top-k experts each token is sent to, and its
  shared experts (the work one token does, not the experts it skips);
- other elementwise work (SiLU, softplus, decays, softmax, the embedding lookup) counts 0, as in fvcore;
- the depthwise causal conv counts its causal outputs, `k` per channel and token (fvcore, tracing mamba-ssm's
  `nn.Conv1d` fallback, also counts the k-1 padded outputs per sequence that mamba-ssm computes and drops).
"""
from __future__ import annotations

import math

import numpy as np

from ssmcompress import architecture

NORM_FLOPS_PER_ELEMENT = 5


def ssd_scan_flops_per_token(n_tokens: float, nheads: int, headdim: int, ngroups: int, d_state: int,
                             chunk_size: int, rank: int = 1) -> float:
    """Mamba-2's chunked SSD per token at sequence length n_tokens: within a chunk C·Bᵀ (per group) and
    (L∘CBᵀ)·x (per head), then the chunk states Bᵀx and their read-out C·state (per head). With `rank` R (Mamba-3's
    MIMO) every token has R (B, x) pairs and R queries C: R² products within a chunk, R of each state term."""
    inner = nheads * headdim
    if isinstance(n_tokens, np.ndarray):  # many lengths at once (the budget solves them together), elementwise
        chunk = np.minimum(chunk_size, np.maximum(1, np.ceil(n_tokens)))
    else:
        chunk = min(chunk_size, max(1, math.ceil(n_tokens)))
    return rank * rank * chunk * (ngroups * d_state + inner) + 2 * rank * inner * d_state


def selective_scan_flops_per_token(d_inner: int, d_state: int) -> float:
    """Mamba-1's selective scan per token: discretise (dt·B·x), update the state, read out C·h; D skip and gate."""
    return 3 * d_inner * d_state + 2 * d_inner


def norm_flops(n_elements: float) -> float:
    return NORM_FLOPS_PER_ELEMENT * n_elements


def bipartite_matching_flops(n_tokens: float, dim: int) -> float:
    """ToMe-style matching cost: the similarity matrix between the two alternating halves of n_tokens tokens
    (ceil(n/2) x floor(n/2) dot products of length dim). Normalising and top-k are elementwise/index work (0)."""
    n = int(round(n_tokens))
    return (n - n // 2) * (n // 2) * dim


def mixer_flops_per_token(info: dict, n_tokens: float) -> dict[str, float]:
    """FLOPs per token of one SSM block (its add+norm and Mamba mixer) at sequence length n_tokens, by component."""
    d, e, n = info["d_model"], info["d_inner"], info["d_state"]
    k = info["d_conv"]
    if info["mamba_version"] == 2:
        g, h = info["ngroups"], info["nheads"]
        return dict(
            in_proj=d * (2 * e + 2 * g * n + h),
            conv=(e + 2 * g * n) * k,
            scan=ssd_scan_flops_per_token(n_tokens, h, info["headdim"], g, n, info["chunk_size"]),
            norm=norm_flops(d + e * info.get("gated_norm", 1)),  # the block's add+RMSNorm, the gated RMSNorm of y
            out_proj=e * d,
        )
    if info["mamba_version"] == 3:
        return mamba3_flops_per_token(info, n_tokens)
    r = info["dt_rank"]
    return dict(
        in_proj=d * 2 * e,
        conv=e * k,
        x_proj=e * (r + 2 * n),
        dt_proj=r * e,
        scan=selective_scan_flops_per_token(e, n),
        norm=norm_flops(d),  # the block's add+RMSNorm
        out_proj=e * d,
    )


def mamba3_flops_per_token(info: dict, n_tokens: float) -> dict[str, float]:
    """Mamba-3's block per token: in_proj (z, x, B, C, dt, A, trapezoid, angles), the RMSNorms of B and C, the scan,
    the optional gated RMSNorm of y, out_proj. The scan is SSD's contractions with per-head B and C (each head adds its
    own bias and rotates them), plus each token's q·k (the trapezoid's correction, mamba3_reference). MIMO (rank R,
    `mimo_rank` in info): R B's and C's per token, the SSD of rank R, the correction's R x R products q·k and their
    weighted values, and `mimo_out`, the outputs' weighted sum over the ranks (R·d_inner); the up-projections of x and
    z per rank are elementwise (0). The gated norm then norms each rank's output."""
    d, e, n, g, h = info["d_model"], info["d_inner"], info["d_state"], info["ngroups"], info["nheads"]
    rank = info.get("mimo_rank", 1)
    scan = ssd_scan_flops_per_token(n_tokens, h, info["headdim"], h, n, info["chunk_size"], rank)
    parts = dict(
        in_proj=d * (2 * e + 2 * g * n * rank + 3 * h + info["n_angles"]),
        scan=scan + (h * n if "mimo_rank" not in info else rank * rank * (h * n + e)),
        norm=norm_flops(d + 2 * g * n * rank + rank * e * info["outproj_norm"]),  # add+RMSNorm, B's and C's, y's
        out_proj=e * d,
    )
    if "mimo_rank" in info:
        parts["mimo_out"] = rank * e
    return parts


def attention_flops_per_token(info: dict, n_tokens: float) -> dict[str, float]:
    """One causal self-attention per token at sequence length n_tokens: projections (with mamba-ssm MHA's fused MLP
    width, `attn_extra`), and per head the (n + 1) / 2 query-key pairs per token of scores and of weighted values."""
    d, heads, kv_heads, head_dim = info["d_model"], info["attn_heads"], info["attn_kv_heads"], info["attn_head_dim"]
    extra = info.get("attn_extra", 0)
    pairs = ((np.maximum(n_tokens, 1) if isinstance(n_tokens, np.ndarray) else max(n_tokens, 1)) + 1) / 2
    return dict(qkv_proj=d * head_dim * (heads + 2 * kv_heads) + d * extra,
                attention=2 * heads * head_dim * pairs,
                o_proj=(heads * head_dim + extra // 2) * d)


def mlp_flops_per_token(info: dict, size: int, gated: bool) -> float:
    return (3 if gated else 2) * info["d_model"] * size


def moe_flops_per_token(info: dict) -> float:
    """Router, the top-k experts a token is sent to, and the shared experts."""
    d, gated = info["d_model"], bool(info.get("moe_gated", 1))
    return (d * info["moe_experts"] + info["moe_top_k"] * mlp_flops_per_token(info, info["moe_size"], gated)
            + mlp_flops_per_token(info, info.get("moe_shared_size", 0), gated))


def block_flops_per_token(info: dict, index: int, n_tokens: float) -> dict[str, float]:
    """FLOPs per token of decoder layer `index` at sequence length n_tokens, by component: its norms, its mixer (SSM,
    attention, both side by side, or none), and its feed-forward block."""
    kind, feed = architecture.kinds(info)[index], architecture.ffn(info)[index]
    parts = {}
    if architecture.has_ssm(kind):  # the mixer's components include the layer's input norm
        parts.update(mixer_flops_per_token(info, n_tokens))
    else:
        parts["norm"] = norm_flops(info["d_model"])
    if architecture.has_attention(kind):
        parts.update(attention_flops_per_token(info, n_tokens))
    if kind == architecture.MLP:
        parts["mlp"] = mlp_flops_per_token(info, info["mlp_size"], bool(info.get("mlp_gated", 0)))
    elif kind == architecture.MOE:
        parts["moe"] = moe_flops_per_token(info)
    if feed != architecture.FFN_NONE:
        parts["norm"] += norm_flops(info["d_model"])  # the feed-forward block's own pre-norm
        parts["ffn"] = (moe_flops_per_token(info) if feed == architecture.FFN_MOE else
                        mlp_flops_per_token(info, info["mlp_size"], feed == architecture.FFN_GATED))
    return parts


def layer_flops(info: dict, index: int, n_tokens: float) -> float:
    """FLOPs of layer `index` for one sequence of n_tokens tokens (fractional counts allowed: averages over rows;
    an array of counts gives each one's FLOPs)."""
    return sum(block_flops_per_token(info, index, n_tokens).values()) * n_tokens


def lm_head_flops(info: dict, n_tokens: float) -> float:
    return info["d_model"] * info["vocab_size"] * n_tokens


def final_norm_flops(info: dict, n_tokens: float) -> float:
    return norm_flops(info["d_model"] * n_tokens)


def forward_flops(info: dict, tokens_per_layer: list[float], logits_tokens: float | None = None,
                  extra: float = 0.0) -> dict:
    """FLOPs of one forward of one sequence: `tokens_per_layer[i]` tokens enter block i; the final norm sees the
    tokens leaving the last block; logits for `logits_tokens` positions (default: those same tokens); `extra` adds
    the reduction's own work (matching, merging)."""
    if len(tokens_per_layer) != info["n_layer"]:
        raise ValueError(f"need {info['n_layer']} token counts, got {len(tokens_per_layer)}")
    per_layer = [layer_flops(info, i, t) for i, t in enumerate(tokens_per_layer)]
    last = tokens_per_layer[-1]
    head = lm_head_flops(info, last if logits_tokens is None else logits_tokens)
    final_norm = final_norm_flops(info, last)
    return dict(total=sum(per_layer) + final_norm + head + extra, per_layer=per_layer, final_norm=final_norm,
                lm_head=head, reduction=extra)


def dense_flops(info: dict, n_tokens: float) -> float:
    return forward_flops(info, [n_tokens] * info["n_layer"])["total"]
