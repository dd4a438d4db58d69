"""from_config / check_config: every method config composes and validates; bad input is a one-line ConfigError."""
import pytest
from omegaconf import open_dict

from ssmcompress import config as config_lib
from ssmcompress import reduction, runner
from ssmcompress.hosts import mamba_ssm
from ssmcompress.config import ConfigError
from reduction_fixtures import ALL_METHODS, compose, one_thread  # noqa: F401

TINY_MODEL = "model.random_init=true"  # the bundled model's config from conf/, no weights needed


def model_config(cfg):
    return config_lib.to_dict(cfg.model)["config"]


def test_every_method_has_a_config_and_the_registry_knows_them():
    # longmamba removes no token and takes no ratio: test_longmamba.py tests it
    assert sorted(ALL_METHODS + ["ceiling", "longmamba"]) == sorted(reduction.METHODS)
    assert set(config_lib.available("method")) == set(ALL_METHODS) | {"dense", "ceiling", "longmamba"}


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_configs_pass_check_config(method):
    cfg = compose(method, 0.2, TINY_MODEL)
    reduction.check_config(cfg, model_config(cfg))
    info = mamba_ssm.info_from_config(model_config(cfg))
    setup = reduction.resolve(cfg, info)
    assert setup.layers == [2, 3, 4, 5, 6, 7, 8] and 0.5 < setup.keep_rate < 1
    assert set(setup.params) >= set(reduction.method_defaults(method))


@pytest.mark.parametrize("overrides,message", [
    (["method.hidden=keep"], "unknown hidden strategy 'keep': use one of prune, merge, hybrid"),
    (["method.residual=half"], "unknown residual strategy 'half'"),
    (["method.q=1.5"], r"q must be a number with 0 <= x <= 1, got 1.5"),
    (["method.importance=l3"], "unknown importance metric 'l3'"),
    (["method.prune_links=random"], "unknown prune_links 'random'"),
    (["+method.window=3"], "method ours has no parameter 'window'"),
    (["layers=[2,12]"], r"layer 12 is outside this 12-layer model \(valid: 0..11\)"),
    (["layers=[3,3]"], "repeats a block"),
    (["ratio=0.95"], r"ratio=0.95 cannot be reached by method ours with layers \[2, 3, 4, 5, 6, 7, 8\]"
                     r".*at most 0\.\d+"),
    (["layers=[10]", "ratio=0.2"], r"at most 0\.\d+ of the forward FLOPs can be removed"),
])
def test_bad_config_is_a_one_line_config_error(overrides, message):
    cfg = compose("ours", 0.3, TINY_MODEL, *overrides)
    with pytest.raises(ConfigError, match=message) as error:
        reduction.check_config(cfg, model_config(cfg))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method,overrides,message", [
    ("official", ["method.importance=l1"], "unknown importance metric 'l1': use one of clip, raw"),
    ("official", ["method.reduce_ratio=1.2"], "reduce_ratio must be a number with 0 < x <= 1"),
    ("pumer", ["method.prune_r=0", "method.merge_r=0"], "prune_r and merge_r must be numbers >= 0, not both 0"),
    ("evit", ["method.fuse_token=maybe"], "fuse_token must be true or false"),
    ("prune_only", ["+method.hidden=merge"], "method prune_only has no parameter 'hidden'"),
    ("tome", ["method.sizes=keep"], "unknown sizes 'keep'"),
])
def test_bad_method_parameters(method, overrides, message):
    cfg = compose(method, 0.2, TINY_MODEL, *overrides)
    with pytest.raises(ConfigError, match=message):
        reduction.check_config(cfg, model_config(cfg))


def test_unknown_method_and_validate_calls_check_config():
    cfg = compose("ours", 0.2, TINY_MODEL)
    with open_dict(cfg):
        cfg.method.name = "magic"
    with pytest.raises(ConfigError, match="unknown reduction method 'magic': choose one of dense, ours"):
        reduction.check_config(cfg, model_config(cfg))
    with pytest.raises(ConfigError, match="unknown hidden strategy"):
        runner.validate(compose("ours", 0.2, TINY_MODEL, "method.hidden=nope", "logger=none"))
    runner.validate(compose("official", 0.2, TINY_MODEL, "logger=none"))


def test_paper_anchor_layers_for_a_hub_sized_config():
    cfg = compose("ours", 0.3, "model=mamba2-2.7b")
    info = mamba_ssm.info_from_config(model_config(cfg))  # meta device: no weights, no memory
    setup = reduction.resolve(cfg, info)
    assert setup.layers == [12, 17, 22, 27, 32, 37, 42]
    assert setup.reference_length == 2048


@pytest.mark.parametrize("method,overrides,message", [
    ("ours", ["schedule=steps"], "unknown schedule 'steps': use smooth .* or chunk"),
    ("official", ["schedule=chunk", "method.reduce_ratio=0.905"], "reduce_ratio fixes its per-layer ceil counts"),
    ("ceiling", [], "method=ceiling is a measuring device for efficiency .* use benchmark=efficiency, or "
                    "method.allow_accuracy=true"),
    ("ceiling", ["benchmark=pruning"], "not a method for accuracy"),
    ("ceiling", ["benchmark=efficiency", "method.allow_accuracy=1"], "allow_accuracy must be true or false"),
])
def test_schedule_and_ceiling_errors(method, overrides, message):
    cfg = compose(method, 0.2, TINY_MODEL, *overrides)
    with pytest.raises(ConfigError, match=message) as error:
        reduction.check_config(cfg, model_config(cfg))
    assert "\n" not in str(error.value)


def test_ceiling_for_efficiency_or_when_insisted_and_chunk_on_mamba2():
    for extra in (["benchmark=efficiency"], ["method.allow_accuracy=true"]):
        cfg = compose("ceiling", 0.2, TINY_MODEL, *extra)
        reduction.check_config(cfg, model_config(cfg))
    cfg = compose("official", 0.2, TINY_MODEL, "schedule=chunk")
    setup = reduction.resolve(cfg, mamba_ssm.info_from_config(model_config(cfg)))
    assert (setup.schedule, setup.rule, setup.ceiling.rule, setup.ceiling.schedule) == ("chunk", "ceil", "ceil", "chunk")
    runner.validate(compose("tome", 0.2, TINY_MODEL, "schedule=chunk", "logger=none"))


def test_random_draw_follows_the_top_level_seed():
    for seed in (0, 3):
        cfg = compose("random", 0.2, TINY_MODEL, f"seed={seed}")
        assert reduction.resolve(cfg, mamba_ssm.info_from_config(model_config(cfg))).params["seed"] == seed
