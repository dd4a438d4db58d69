"""convert: mamba-ssm models -> transformers (Mamba, Mamba2, NemotronH hybrids) and NemotronH hybrids back, checked
on tiny random models by their logits, state dicts and the command line's round trip."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import TINY, TOKENIZER_DIR, save_tiny, tiny_model
from safetensors import safe_open

from ssmcompress import convert, models
from ssmcompress.config import REPO
from ssmcompress.hosts import mamba_ssm as mamba_host
from ssmcompress.hosts import transformers as hf_host

LENGTH = 37  # not a multiple of any chunk size below (16, 8): the scans' padded last chunk is exercised
ATTN = dict(num_heads=4, num_heads_kv=2, causal=True, qkv_proj_bias=False, out_proj_bias=False)
# vocab 4090 is padded to 4096 (pad_vocab_size_multiple 16), as MambaLMHeadModel pads it
HYBRID = dict(n_layer=6, vocab_size=4090, attn_layer_idx=[2, 5], attn_cfg=ATTN)
GROUPS = dict(ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=8, chunk_size=8, ngroups=2))
CASES = {  # name: (generation, overrides, model_type, transformers class)
    "mamba1": (1, {}, "mamba", "MambaForCausalLM"),
    "mamba2": (2, {}, "mamba2", "Mamba2ForCausalLM"),
    "mamba2-ngroups2": (2, GROUPS, "mamba2", "Mamba2ForCausalLM"),
    "hybrid": (2, HYBRID, "nemotron_h", "NemotronHForCausalLM"),
}


def random_ids(batch: int = 3, length: int = LENGTH, vocab: int = 4090, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(mamba_model, hf_model, seed: int = 0) -> None:
    input_ids = random_ids(seed=seed)
    with torch.no_grad():
        expected = mamba_host.logits(mamba_model, input_ids)
        actual = hf_host.logits(hf_model, input_ids)
    assert actual.shape == expected.shape == (*input_ids.shape, 4096)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def assert_same_state(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_computes_the_same_logits(case, single_thread):
    generation, overrides, model_type, cls = CASES[case]
    model = tiny_model(generation, seed=1, **overrides)
    converted = convert.to_transformers(model)
    assert type(converted).__name__ == cls and converted.config.model_type == model_type
    assert not converted.training
    assert converted.lm_head.weight.dtype == torch.float32 and converted.lm_head.weight.device.type == "cpu"
    # both hosts describe the same architecture (layer kinds, widths, heads, groups, chunk size; padded vocabulary)
    ours, theirs = mamba_host.model_info(model), hf_host.model_info(converted)
    shared = (ours.keys() & theirs.keys()) - {"model_type", "params"}
    assert {"d_inner", "d_state", "vocab_size"} <= shared
    assert {k: theirs[k] for k in shared} == {k: ours[k] for k in shared}
    assert_same_logits(model, converted, seed=1)
    if case == "mamba2-ngroups2":  # carried from ssm_cfg, not transformers' Mamba2Config defaults
        c = converted.config
        assert (c.n_groups, c.state_size, c.head_dim, c.chunk_size, c.num_heads) == (2, 8, 8, 8, 16)


def test_config_dicts():
    mamba2 = convert.transformers_config(TINY[2])
    assert mamba2["model_type"] == "mamba2" and mamba2["vocab_size"] == 4096
    assert (mamba2["state_size"], mamba2["head_dim"], mamba2["chunk_size"], mamba2["n_groups"]) == (16, 16, 16, 1)
    assert mamba2["num_heads"] == 8 and mamba2["layer_norm_epsilon"] == 1e-5 and mamba2["norm_before_gate"] is False
    assert list(mamba2["time_step_limit"]) == [0.0, float("inf")] and mamba2["tie_word_embeddings"] is True
    mamba1 = convert.transformers_config(dict(TINY[1], vocab_size=50277, pad_vocab_size_multiple=8))
    assert mamba1["model_type"] == "mamba" and mamba1["vocab_size"] == 50280 and mamba1["time_step_rank"] == 4
    hybrid = convert.transformers_config({**TINY[2], **HYBRID})
    assert hybrid["model_type"] == "nemotron_h" and hybrid["hybrid_override_pattern"] == "MM*MM*"
    assert (hybrid["num_attention_heads"], hybrid["num_key_value_heads"], hybrid["head_dim"]) == (4, 2, 16)
    assert hybrid["attention_bias"] is False and hybrid["mamba_num_heads"] == 8
    tokenizer = models.load_tokenizer(str(TOKENIZER_DIR))
    with_ids = convert.transformers_config(TINY[2], tokenizer)
    assert with_ids["eos_token_id"] == tokenizer.eos_token_id and with_ids["pad_token_id"] == tokenizer.pad_token_id


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hybrid_round_trip_is_exact(dtype, single_thread):
    """mamba-ssm -> NemotronH -> mamba-ssm gives back every tensor bit for bit, each in its dtype (mamba-ssm keeps D
    in float32 in a bfloat16 model)."""
    model = mamba_host.build_model({**TINY[2], **HYBRID}, "cpu", dtype, seed=2)
    converted = convert.to_transformers(model)
    back = convert.to_mamba_ssm(converted)
    assert_same_state(back.state_dict(), model.state_dict())
    assert back.config.attn_layer_idx == [2, 5] and back.config.tie_embeddings
    assert {k: back.config.attn_cfg[k] for k in ATTN} == ATTN
    assert convert.nemotron_h_to_mamba_ssm(converted).config.attn_layer_idx == [2, 5]
    if dtype == "float32":
        assert_same_logits(back, converted, seed=2)


def test_transformers_hybrid_runs_on_mamba_ssm(single_thread):
    """A NemotronH hybrid made by transformers (its own init, an untied head, a dt floor) converts to mamba-ssm and
    back."""
    config = convert.transformers_config({**TINY[2], **HYBRID, "tie_embeddings": False})
    config.update(time_step_min=0.01, time_step_limit=[0.01, float("inf")])
    model = hf_host.build_model(config, "cpu", "float32", seed=3)
    back = convert.to_mamba_ssm(model)
    assert back.config.tie_embeddings is False and back.config.ssm_cfg["dt_limit"] == [0.01, float("inf")]
    assert_same_logits(back, model, seed=3)
    assert_same_state(convert.to_transformers(back).state_dict(), model.state_dict())


@pytest.mark.parametrize("overrides, reason", [
    (dict(attn_cfg=dict(ATTN, rotary_emb_dim=16)), "rotary_emb_dim"),
    (dict(attn_cfg=dict(ATTN, mlp_dim=64)), "mlp_dim"),
    (dict(attn_cfg=dict(ATTN, d_conv=4)), "d_conv"),
    (dict(attn_cfg=dict(ATTN, causal=False)), "causal"),
    (dict(attn_cfg=dict(ATTN, qkv_proj_bias=True)), "one attention_bias"),
    (dict(attn_cfg=dict(ATTN, softmax_scale=0.5)), "softmax_scale"),
    (dict(d_intermediate=128), "d_intermediate"),
    (dict(ssm_cfg=dict(layer="Mamba1")), "Mamba-1 hybrid"),
    (dict(ssm_cfg=dict(TINY[2]["ssm_cfg"], d_ssm=64)), "d_ssm"),
    (dict(ssm_cfg=dict(TINY[2]["ssm_cfg"], norm_before_gate=True)), "norm_before_gate"),
    (dict(ssm_cfg=dict(TINY[2]["ssm_cfg"], D_has_hdim=True)), "D_has_hdim"),
    (dict(ssm_cfg=dict(TINY[2]["ssm_cfg"], shiny=1)), "shiny"),
    (dict(rms_norm=False), "rms_norm"),
])
def test_unsupported_configs_are_refused(overrides, reason):
    with pytest.raises(ValueError, match=reason) as error:
        convert.transformers_config({**TINY[2], **HYBRID, **overrides})
    assert "\n" not in str(error.value)


def test_unsupported_models_are_refused(single_thread):
    # NemotronH's mixer has no upper dt clamp
    capped = tiny_model(2, **HYBRID, ssm_cfg=dict(TINY[2]["ssm_cfg"], dt_limit=(0.0, 10.0)))
    with pytest.raises(ValueError, match="dt_limit"):
        convert.to_transformers(capped)
    # MHA biases: converted exactly where this transformers version's NemotronH attention has them, refused otherwise
    biased = tiny_model(2, **{**HYBRID, "attn_cfg": dict(ATTN, qkv_proj_bias=True, out_proj_bias=True)})
    try:
        converted = convert.to_transformers(biased)
    except ValueError as error:
        assert "bias" in str(error) and "\n" not in str(error)
    else:
        assert_same_logits(biased, converted)
    mamba2 = convert.to_transformers(tiny_model(2))
    with pytest.raises(ValueError, match="only NemotronH"):
        convert.to_mamba_ssm(mamba2)
    with pytest.raises(ValueError, match="MambaLMHeadModel"):
        convert.to_transformers(mamba2)
    with pytest.raises(ValueError, match="MLP or MoE"):
        convert.mamba_ssm_config(dict(convert.transformers_config({**TINY[2], **HYBRID}),
                                      layers_block_type=["linear_attention", "mlp", "full_attention"]))


@pytest.mark.parametrize("generation, overrides", [(2, HYBRID), (1, {})], ids=["hybrid", "mamba1"])
def test_command_line_round_trip(generation, overrides, tmp_path, single_thread, capsys):
    source = save_tiny(tmp_path / "mamba-ssm", generation, seed=4, **overrides)
    assert convert.main([str(source), str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = hf_host.load_model(str(tmp_path / "hf"), "cpu", "float32")
    assert_same_logits(mamba_host.load_model(str(source), "cpu", "float32"), loaded, seed=4)
    tokenizer = models.load_tokenizer(str(tmp_path / "hf"))
    assert tokenizer.get_vocab() == models.load_tokenizer(str(TOKENIZER_DIR)).get_vocab()
    assert hf_host.load_config(str(tmp_path / "hf"))["eos_token_id"] == tokenizer.eos_token_id
    if generation == 2:
        assert convert.main([str(source), str(tmp_path / "half"), "--dtype", "bfloat16"]) == 0
        with safe_open(str(tmp_path / "half" / "model.safetensors"), framework="pt") as weights:
            assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.bfloat16}


def test_command_line_errors(tmp_path, capsys):
    source = save_tiny(tmp_path / "src", 2, d_intermediate=64)
    (tmp_path / "empty").mkdir()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(convert.transformers_config(TINY[2])))
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "out")], "is not a directory"),
        ([str(source), str(source)], "DST is SRC"),
        ([str(source), str(tmp_path)], "not an empty directory"),
        ([str(source), str(tmp_path / "out")], "d_intermediate=64"),
        ([str(tmp_path / "empty"), str(tmp_path / "out")], "no config.json"),
        ([str(tmp_path / "hf"), str(tmp_path / "out")], "is a transformers checkpoint"),
    ]
    for argv, reason in cases:
        assert convert.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and reason in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(source), str(tmp_path / "out"), "--dtype", "float64"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_module_runs_as_a_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ssmcompress.convert", str(tmp_path / "none"), str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "is not a directory" in result.stderr


def test_the_transformers_mamba2_27b_config_is_the_conversion_of_mamba2_27b():
    def config(name):
        return yaml.safe_load((REPO / "src/ssmcompress/conf/model" / f"{name}.yaml").read_text())["config"]

    assert config("mamba2-2.7b-hf") == convert.transformers_config(config("mamba2-2.7b"))
