"""Architecture facts from a config dict equal those read off the built model (both generations, every model config)."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY
from ssmcompress import architecture, models
from ssmcompress.config import CONF_DIR

CONFIGS = {p.stem: OmegaConf.to_container(OmegaConf.load(p))["config"] for p in sorted((CONF_DIR / "model").glob("*.yaml"))
           if OmegaConf.load(p).get("config")}
CONFIGS.update({f"tiny-{generation}": config for generation, config in TINY.items()})
CONFIGS["mamba2-groups"] = dict(d_model=96, n_layer=2, vocab_size=1000, pad_vocab_size_multiple=7,
                                ssm_cfg=dict(layer="Mamba2", d_state=32, headdim=24, ngroups=2, expand=3))
CONFIGS["mamba1-rank"] = dict(d_model=96, n_layer=2, vocab_size=1001, ssm_cfg=dict(d_state=4, dt_rank=5, d_conv=3))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_info_from_config_equals_the_built_models(name):
    built = models.model_info(models.build_model(CONFIGS[name], torch.device("meta"), seed=None))
    built.pop("params")
    assert architecture.info_from_config(CONFIGS[name]) == built
