"""What a model's layers are, for every host: the layer kinds of an architecture description (`info`).

Each host reads an `info` dict off a config alone (`hosts.<host>.info_from_config`, no model built) and off a built
model (`model_info`, the same plus the parameter count); the FLOPs model, the budget and the config checks read it.
Its keys:
- `host` (the model config's family: `mamba` for mamba-ssm, `hf` for transformers) and `model_type`;
- `d_model`, `n_layer`, `vocab_size` (the lm_head's rows);
- the SSM mixer, shared by every SSM layer: `mamba_version` (1: Mamba-1, 2: Mamba-2), `d_inner`, `d_state`, `d_conv`,
  and per version `nheads`, `headdim`, `ngroups`, `chunk_size`, `gated_norm` (Mamba-2) or `dt_rank` (Mamba-1);
- `layers`: one character per decoder layer, its kind (below); `ffn`: one character per layer, the feed-forward
  block the layer applies after its mixer (`-` none, `G` gated MLP of `mlp_size`, `D` plain two-matrix MLP, `E` a
  mixture of experts);
- where there is attention: `attn_heads`, `attn_kv_heads`, `attn_head_dim`, `attn_extra` (mamba-ssm's MHA: the MLP
  width fused into its projections); where there are experts: `moe_experts`, `moe_top_k`, `moe_size`,
  `moe_shared_size`, `moe_gated`; `mlp_size` and `mlp_gated` for dense MLPs.
Every value is a number or a string, so an info dict is hashable as its sorted items (the budget caches on them).
"""
from __future__ import annotations

SSM = "M"  # a Mamba mixer
ATTENTION = "*"  # causal self-attention
PARALLEL = "P"  # a Mamba mixer and attention side by side on the same input (Falcon-H1)
MLP = "-"  # a layer that is only an MLP (Nemotron-H)
MOE = "E"  # a layer that is only a mixture of experts (Nemotron-H)
KIND_NAMES = {SSM: "SSM", ATTENTION: "attention", PARALLEL: "SSM + attention", MLP: "MLP", MOE: "mixture of experts"}
FFN_NONE, FFN_GATED, FFN_PLAIN, FFN_MOE = "-", "G", "D", "E"


def kinds(info: dict) -> str:
    """One character per layer (records made before hybrids were supported describe pure SSMs and have none)."""
    return info.get("layers") or SSM * int(info["n_layer"])


def ffn(info: dict) -> str:
    return info.get("ffn") or FFN_NONE * int(info["n_layer"])


def has_ssm(kind: str) -> bool:
    return kind in (SSM, PARALLEL)


def has_attention(kind: str) -> bool:
    return kind in (ATTENTION, PARALLEL)


def ssm_layers(info: dict) -> list[int]:
    return [i for i, kind in enumerate(kinds(info)) if has_ssm(kind)]


def attention_layers(info: dict) -> list[int]:
    return [i for i, kind in enumerate(kinds(info)) if has_attention(kind)]


def is_hybrid(info: dict) -> bool:
    return any(kind != SSM for kind in kinds(info))


def uniform(info: dict) -> bool:
    """Every layer the same SSM block (a pure Mamba model): each costs the same per token beyond one scan chunk."""
    return not is_hybrid(info) and len(set(ffn(info))) == 1


def layer_name(kind: str) -> str:
    """`an attention layer` (for messages)."""
    name = KIND_NAMES[kind]
    return f"{'a' if kind == MOE else 'an'} {name} layer"


def describe(info: dict) -> str:
    """`12 layers: 9 SSM, 3 attention` (for messages)."""
    counts = {}
    for kind in kinds(info):
        counts[KIND_NAMES[kind]] = counts.get(KIND_NAMES[kind], 0) + 1
    return f"{info['n_layer']} layers: " + ", ".join(f"{n} {name}" for name, n in counts.items())
