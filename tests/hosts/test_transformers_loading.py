"""The transformers host (hosts.transformers, hosts): hub-format local directories, random init, the family dispatch,
and clear errors for unusable sources or settings."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import compose_config
from hf_fixtures import TINY_HF, save_tiny_hf, tiny_hf_model
from ssmcompress import config as config_lib
from ssmcompress import hosts, models, runner
from ssmcompress.hosts import mamba_ssm
from ssmcompress.hosts import transformers as hf
from ssmcompress.config import ConfigError


@pytest.mark.parametrize("kind", list(TINY_HF))
def test_save_and_load_a_local_hub_format_directory(tmp_path, kind, single_thread):
    model = tiny_hf_model(kind, seed=3)
    save_tiny_hf(tmp_path, kind, seed=3)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    assert hf.load_config(str(tmp_path))["model_type"] == kind
    loaded = hf.load_model(str(tmp_path), device="cpu", dtype="float32")
    ids = torch.randint(1, 4096, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    info = hf.model_info(loaded)
    assert info["family"] == "hf" and info["model_type"] == kind and info["n_layer"] == 2 and info["d_model"] == 32
    assert hf.load_tokenizer(str(tmp_path)).pad_token_id == 0


def test_fp16_save_keeps_tied_weights_once(tmp_path):
    model = tiny_hf_model("opt")
    hf.save_model(model, tmp_path, dtype=torch.float16)
    loaded = hf.load_model(str(tmp_path), "cpu", "float32")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    assert all(torch.equal(a.half().float(), b) for a, b in zip(model.state_dict().values(),
                                                                 loaded.state_dict().values()))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.decoder.layers.0.fc1.weight").dtype == torch.float16


def test_clear_errors_for_unusable_sources(tmp_path):
    with pytest.raises(models.ModelSourceError, match="no config.json"):
        hf.load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64}))
    with pytest.raises(models.ModelSourceError, match="no model_type.*family: mamba"):
        hf.load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF["opt"]))
    with pytest.raises(models.ModelSourceError, match="no weights"):
        hf.load_model(str(tmp_path), "cpu", "float32")
    with pytest.raises(models.ModelSourceError, match="no tokenizer files"):
        hf.load_tokenizer(str(tmp_path))


def test_random_init_builds_from_the_config_alone():
    model = hf.load_model("facebook/not-downloaded", "cpu", "float32", random_init=True, config=TINY_HF["llama"])
    assert hf.model_info(model)["model_type"] == "llama"


def test_every_model_config_names_a_family_and_the_hub_configs_build():
    for name in config_lib.available("model"):
        if name == "local":  # its checkpoint's config.json names the family
            continue
        cfg = compose_config([f"model={name}", "model.random_init=true", "logger=none"])
        family = hosts.of(cfg.model)
        assert family is {"hf": hf, "mamba": mamba_ssm}[cfg.model.family], name
        if family is hf:  # the architecture is transformers' own, built on the meta device (no memory)
            config = config_lib.to_dict(cfg.model)["config"]
            with torch.device("meta"):
                AutoModelForCausalLM.from_config(hf.transformers_config(config))
            assert hf.info_from_config(config)["model_type"] == config["model_type"], name


def test_family_dispatch_and_unknown_family():
    assert hosts.of({"family": "hf"}) is hf and hosts.of({"config": {"d_model": 64}}) is mamba_ssm
    assert hosts.of({"config": {"model_type": "mamba2"}}) is hf
    assert hosts.of_model(tiny_hf_model("gpt2")) is hf
    with pytest.raises(ConfigError, match="unknown model family 'jax'"):
        hosts.of({"family": "jax"})


def test_token_reduction_is_refused_for_transformers_models(tmp_path):
    save_tiny_hf(tmp_path)
    cfg = compose_config(["model=tiny-opt", f"model.path={tmp_path}", "method=ours", "ratio=0.2", "logger=none"])
    with pytest.raises(ConfigError, match="token reduction has no adapter for transformers .opt. models") as error:
        runner.validate(cfg)
    assert "\n" not in str(error.value)
    runner.validate(compose_config(["model=tiny-opt", f"model.path={tmp_path}", "logger=none"]))


@pytest.mark.parametrize("name,kind", [("opt-125m", "opt"), ("llama-2-7b", "llama")])
def test_a_hub_config_runs_on_a_local_hub_format_directory(tmp_path, name, kind, single_thread):
    """The hub configs' path: a tiny random model of the same architecture saved with save_pretrained, given as
    model.path (and tokenizer), validates, loads and prunes with the config's own targets."""
    model_dir = save_tiny_hf(tmp_path / kind, kind)
    overrides = [f"model={name}", f"model.path={model_dir}", f"model.tokenizer={model_dir}", "model.device=cpu",
                 "model.max_length=128",  # the tiny model's positions
                 "logger=none", f"results_dir={tmp_path / 'results'}", "benchmark=pruning", "benchmark.limit=2",
                 "benchmark.tasks=[shakespeare_ppl,mqar]", "benchmark.measure.enabled=false", "pruner=wanda",
                 "sparsity=2:4", "pruner.calibration.samples=4", "pruner.calibration.length=32"]
    cfg = compose_config(overrides)
    runner.validate(cfg)
    record = runner.run(cfg, run_dir=tmp_path / "run")
    assert record["model_info"]["model_type"] == kind and record["pruning"]["achieved_sparsity"] == 0.5
    assert sorted(record["pruning"]["targets"]) == sorted(cfg.model.prune_targets)
    assert record["metrics"]["shakespeare_ppl"]["word_perplexity"] > 1
