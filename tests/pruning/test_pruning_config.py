"""check_config: every pruner config composes and validates; bad settings are one-line ConfigErrors before any
model is loaded."""
import pytest
from omegaconf import OmegaConf, open_dict

from conftest import compose_config
from ssmcompress import config as config_lib
from ssmcompress import pruning, runner
from ssmcompress.config import ConfigError
from pruning_fixtures import one_thread  # noqa: F401

PRUNERS = ["magnitude", "wanda", "sparsegpt", "multi"]


def compose(*overrides):
    return compose_config(["model.random_init=true", "logger=none", *overrides])


def model_config(cfg):
    return config_lib.to_dict(cfg.model)["config"]


def check(cfg, model_cfg=None):
    pruning.check_config(cfg, model_cfg or model_config(cfg))


def test_every_pruner_has_a_config_and_the_registry_knows_them():
    assert set(config_lib.available("pruner")) == set(PRUNERS) | {"none"}
    assert set(pruning.PRUNERS) == set(PRUNERS)


def model_group_config(name):
    return OmegaConf.to_container(OmegaConf.load(config_lib.CONF_DIR / "model" / f"{name}.yaml"))["config"]


@pytest.mark.parametrize("name", PRUNERS)
def test_pruner_configs_validate(name):
    for sparsity in ("0.5", "2:4", "4:8", "0"):
        cfg = compose(f"pruner={name}", f"sparsity={sparsity}")
        for model in ("mamba2-tiny", "mamba-tiny", "mamba-130m", "mamba2-2.7b"):
            check(cfg, model_group_config(model))
    mamba1_everything = compose("model=mamba-tiny", f"pruner={name}", "sparsity=2:4",
                                "pruner.targets=[in_proj,x_proj,dt_proj,out_proj]")
    check(mamba1_everything)


def test_config_validate_calls_check_config():
    with pytest.raises(ConfigError, match="needs sparsity"):
        runner.validate(compose("pruner=wanda"))


@pytest.mark.parametrize("overrides,message", [
    (["pruner=wanda"], "needs sparsity=<fraction or N:M>"),
    (["pruner=wanda", "sparsity=1.5"], "0 <= sparsity < 1"),
    (["pruner=wanda", "sparsity=3:2"], "0 < N < M"),
    (["pruner=wanda", "sparsity=lots"], "N:M pattern like '2:4'"),
    (["pruner=multi", "sparsity=0.5", "pruner.targets=[x_proj]"], "Mamba-2 mixers have no prunable layer x_proj"),
    (["pruner=multi", "sparsity=0.5", "pruner.targets=[]"], "pruner.targets is empty"),
    (["pruner=sparsegpt", "sparsity=4:8", "pruner.options.blocksize=100"], "multiple of 8"),
    (["pruner=multi", "sparsity=0.5", "+pruner.options.percdamp=0.01"], "has no option percdamp"),
    (["pruner=magnitude", "sparsity=0.5", "+pruner.options.blocksize=8"], "takes none"),
    (["pruner=multi", "sparsity=0.5", "pruner.options.nm_mask=best"], "unknown nm_mask"),
    (["pruner=wanda", "sparsity=0.5", "pruner.calibration.source=pile"], "unknown calibration source"),
    (["pruner=wanda", "sparsity=0.5", "pruner.calibration.samples=0"], "samples must be a positive integer"),
])
def test_bad_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        check(compose(*overrides))
    assert "\n" not in str(error.value)


def test_nm_must_divide_every_target_width():
    # the bundled Mamba-1 tiny model has dt_rank ceil(128 / 16) = 8; a d_model 64 model has 4: 4:8 cannot apply
    cfg = compose("model=mamba-tiny", "pruner=multi", "sparsity=4:8", "pruner.targets=[in_proj,dt_proj]")
    check(cfg)
    small = {**model_config(cfg), "d_model": 64}
    with pytest.raises(ConfigError, match="dt_proj: N:M sparsity 4:8 needs the input width \\(4\\)"):
        check(cfg, small)


def test_unknown_pruner_and_hybrid_models_are_rejected():
    cfg = compose("pruner=wanda", "sparsity=0.5")
    with open_dict(cfg):
        cfg.pruner.name = "obc"
    with pytest.raises(ConfigError, match="unknown pruner 'obc'"):
        check(cfg)
    cfg = compose("pruner=wanda", "sparsity=0.5")
    with pytest.raises(ConfigError, match="attention layers"):
        check(cfg, {**model_config(cfg), "attn_layer_idx": [3]})


def test_hub_calibration_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in ("c4", "wikitext2"):
        with pytest.raises(ConfigError, match=f"calibration source '{source}'.* needs the datasets .*offline mode"):
            check(compose("pruner=sparsegpt", "sparsity=0.5", f"pruner.calibration.source={source}"))
    check(compose("pruner=magnitude", "sparsity=0.5", "+pruner.calibration.source=c4"))  # magnitude reads no data
