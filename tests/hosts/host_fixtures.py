"""Tiny random transformers models of every family the transformers host reduces (imported by each test module)."""
import pytest
import torch

from conftest import compose_config
from ssmcompress import reduction
from ssmcompress.hosts import transformers as hf

COMMON = dict(vocab_size=4096, hidden_size=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16,
              mamba_d_conv=4, mamba_expand=2)
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2)
# 8 layers each; the hybrids have attention at 2 and 6 (or in every layer: Falcon-H1), so that reduction layers
# (default anchors on 8 layers: 2..5) come before an attention layer
FAMILIES = {
    "mamba": dict(model_type="mamba", num_hidden_layers=8, state_size=8, intermediate_size=128),
    "falcon_mamba": dict(model_type="falcon_mamba", num_hidden_layers=8, state_size=8, intermediate_size=128),
    "mamba2": dict(model_type="mamba2", num_hidden_layers=8, num_heads=8, head_dim=16, state_size=16, chunk_size=16,
                   n_groups=1, expand=2),
    "nemotron_h": dict(model_type="nemotron_h", hybrid_override_pattern="MM*MM-M*", head_dim=16, mamba_num_heads=8,
                       mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=16, expand=2,
                       intermediate_size=128, **ATTENTION),
    "bamba": dict(model_type="bamba", num_hidden_layers=8, attn_layer_indices=[2, 6], intermediate_size=128,
                  **ATTENTION, **MAMBA2),
    "granitemoehybrid": dict(model_type="granitemoehybrid", num_hidden_layers=8,
                             layer_types=["mamba", "mamba", "attention", "mamba", "mamba", "mamba", "attention",
                                          "mamba"], intermediate_size=64, shared_intermediate_size=128,
                             num_local_experts=4, num_experts_per_tok=2, position_embedding_type="rope",
                             residual_multiplier=0.5, **ATTENTION, **MAMBA2),
    "falcon_h1": dict(model_type="falcon_h1", num_hidden_layers=8, head_dim=16, intermediate_size=128,
                      mamba_d_ssm=128, **ATTENTION, **MAMBA2),
    "jamba": dict(model_type="jamba", num_hidden_layers=8, intermediate_size=128, attn_layer_period=4,
                  attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                  num_experts_per_tok=2, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8, mamba_d_conv=4,
                  **ATTENTION),
}
HYBRIDS = ["nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "jamba"]
ROTARY = ["bamba", "granitemoehybrid", "falcon_h1"]  # attention with a position signal


def config_of(family: str, **overrides) -> dict:
    return {**COMMON, **FAMILIES[family], **overrides}


def build(family: str, seed: int = 0, **overrides):
    return hf.build_model(config_of(family, **overrides), "cpu", "float32", seed=seed)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    model = build(request.param)
    return request.param, model, hf.model_info(model)


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid_model(request):
    model = build(request.param)
    return request.param, model, hf.model_info(model)


def reducer_for(model, info, method: str = "ours", ratio: float = 0.3, *extra):
    return reduction.from_config(model, compose_config([f"method={method}", f"ratio={ratio}", *extra]), info)


def token_batch(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 4000, (batch, length), generator=torch.Generator().manual_seed(seed))


def dense_logits(model, input_ids):
    with torch.no_grad():
        return hf.logits(model, input_ids)
