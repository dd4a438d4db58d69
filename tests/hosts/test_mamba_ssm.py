"""The mamba-ssm host: the architecture description of every mamba-ssm config against the built modules, and token
reduction on its hybrids (MHA layers at `attn_layer_idx`): the prefix property, generation after a reduced prefill
(each MHA layer decoding at its own cache offset, checked against the same model converted to transformers), and
the refusal of rotary MHA."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY, compose_config
from ssmcompress import architecture, compat, convert, flops, generation, reduction, runner
from ssmcompress.config import CONF_DIR
from ssmcompress.errors import ConfigError
from ssmcompress.hosts import mamba_ssm
from ssmcompress.hosts import transformers as hf


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on one thread (conftest.single_thread)."""


MHA = dict(num_heads=4, num_heads_kv=2, causal=True, qkv_proj_bias=False, out_proj_bias=False)
HYBRID = dict(d_model=64, n_layer=8, vocab_size=4096, pad_vocab_size_multiple=16, attn_layer_idx=[2, 6], attn_cfg=MHA,
              ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, chunk_size=16))
YAMLS = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in sorted((CONF_DIR / "model").glob("*.yaml"))}
CONFIGS = {name: group["config"] for name, group in YAMLS.items() if group.get("config") and group["family"] == "mamba"}
CONFIGS.update({f"tiny-{generation}": config for generation, config in TINY.items()})
CONFIGS["mamba2-groups"] = dict(d_model=96, n_layer=2, vocab_size=1000, pad_vocab_size_multiple=7,
                                ssm_cfg=dict(layer="Mamba2", d_state=32, headdim=24, ngroups=2, expand=3))
CONFIGS["mamba1-rank"] = dict(d_model=96, n_layer=2, vocab_size=1001, ssm_cfg=dict(d_state=4, dt_rank=5, d_conv=3))
CONFIGS["hybrid"] = HYBRID
CONFIGS["hybrid-mlp"] = dict(HYBRID, d_intermediate=200, attn_cfg=dict(MHA, head_dim=24, mlp_dim=300))
LINEAR_PARTS = ("in_proj", "x_proj", "dt_proj", "out_proj", "qkv_proj", "o_proj", "ffn")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_description_matches_the_built_modules(name):
    config = CONFIGS[name]
    model = mamba_ssm.build_model(config, torch.device("meta"), seed=None)
    info = mamba_ssm.info_from_config(config)
    assert mamba_ssm.model_info(model)["params"] == sum(p.numel() for p in model.parameters())
    assert info["vocab_size"] == model.lm_head.weight.shape[0]
    attention = sorted(config.get("attn_layer_idx") or [])
    assert architecture.attention_layers(info) == attention
    for index, block in enumerate(model.backbone.layers):
        parts = flops.block_flops_per_token(info, index, 64)
        linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
        assert sum(parts.get(key, 0) for key in LINEAR_PARTS) == linear, (name, index)
        convs = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv1d))
        assert parts.get("conv", 0) == convs, (name, index)
        if index not in attention and info["mamba_version"] == 2:
            assert (info["nheads"], info["headdim"], info["chunk_size"]) == (
                block.mixer.nheads, block.mixer.headdim, block.mixer.chunk_size)


@pytest.fixture(scope="module")
def hybrid():
    model = mamba_ssm.build_model(HYBRID, "cpu", "float32", seed=3)
    return model, mamba_ssm.model_info(model)


def reducer_for(model, info, method="ours", ratio=0.3, *extra):
    return reduction.from_config(model, compose_config([f"method={method}", f"ratio={ratio}", *extra]), info)


def test_default_reduction_layers_are_ssm_layers(hybrid):
    model, info = hybrid
    reducer = reducer_for(model, info)
    assert reducer.setup.layers and not set(reducer.setup.layers) & {2, 6}
    reducer.remove()


def test_keeping_each_rows_first_tokens_gives_the_prefix_logits(hybrid):
    model, info = hybrid
    ids = torch.randint(1, 4000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    reducer = reducer_for(model, info, "late")
    try:
        out = reducer(ids)
    finally:
        reducer.remove()
    k = int(out.counts[0])
    assert k < 48
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(ids[:, :k]).logits, atol=2e-5, rtol=1e-4)
        assert torch.equal(model(ids).logits, dense)


def test_generation_after_a_reduced_prefill_equals_the_same_model_in_transformers(hybrid):
    # two independent decoders: mamba-ssm's (each MHA layer given its own cache offset after the reduced prefill)
    # and transformers' (its cache classes), on the same weights and the same reduction
    model, info = hybrid
    twin = convert.to_transformers(model)
    ids = torch.randint(1, 4000, (2, 37), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, net in (("mamba_ssm", model), ("transformers", twin)):
        details = mamba_ssm.model_info(net) if name == "mamba_ssm" else hf.model_info(net)
        reducer = reducer_for(net, details)
        try:
            out[name] = generation.generate(net, ids, 8, reducer=reducer)
            assert reducer.prefill_entering[-1] < 37
        finally:
            reducer.remove()
    assert torch.equal(out["mamba_ssm"], out["transformers"])
    dense = generation.generate(model, ids, 8)
    assert not torch.equal(dense, out["mamba_ssm"]), "the reduction changed nothing: a vacuous check"


def test_rotary_attention_is_refused_before_any_work():
    from omegaconf import open_dict

    cfg = compose_config(["model=mamba2-tiny", "model.random_init=true", "method=ours", "ratio=0.3", "logger=none"])
    with open_dict(cfg):
        cfg.model.config.attn_layer_idx = [3]
        cfg.model.config.attn_cfg = dict(MHA, rotary_emb_dim=16)
    with pytest.raises(ConfigError, match="rotary embeddings"):
        runner.validate_model(cfg)
    with open_dict(cfg):
        cfg.model.config.attn_cfg = dict(MHA, causal=False)
    with pytest.raises(ConfigError, match="causal must be true"):
        runner.validate_model(cfg)


def test_fused_paths_stay_off_without_their_compiled_kernels(monkeypatch):
    monkeypatch.setattr(compat, "HAS_CAUSAL_CONV1D", False)
    assert mamba_ssm.kernel_config({"ssm_cfg": {"layer": "Mamba2"}})["ssm_cfg"]["use_mem_eff_path"] is False
    assert "use_mem_eff_path" not in mamba_ssm.kernel_config({"ssm_cfg": {}})["ssm_cfg"]  # not a Mamba-1 option
    monkeypatch.setattr(compat, "HAS_SELECTIVE_SCAN_CUDA", False)
    monkeypatch.setattr(compat, "HAS_CAUSAL_CONV1D", True)  # mamba_inner_fn would call the missing scan
    assert mamba_ssm.kernel_config({"ssm_cfg": {"layer": "Mamba1"}})["ssm_cfg"]["use_fast_path"] is False
    monkeypatch.setattr(compat, "HAS_SELECTIVE_SCAN_CUDA", True)
    assert "use_fast_path" not in mamba_ssm.kernel_config({"ssm_cfg": {}})["ssm_cfg"]
