"""The transformers host on every family it reduces (tiny random models): the architecture description against the
built modules and fvcore, hooks that leave the dense model bit for bit, the properties that hold in any causal model
(a reduction keeping each row's first tokens gives the prefix's logits; a padded batch scores as each row alone),
the kept tokens' positions reaching attention, generation after a reduced prefill, and refusals before any work."""
import inspect

import pytest
import torch
from torch import nn

from conftest import compose_config
from host_fixtures import (FAMILIES, HYBRIDS, ROTARY, build, config_of, dense_logits, family_model, hybrid_model,  # noqa: F401
                           reducer_for, token_batch)
from ssmcompress import architecture, flops, generation, runner
from ssmcompress.errors import ConfigError
from ssmcompress.hosts import transformers as hf
from ssmcompress.metrics import fvcore_count
from ssmcompress.metrics.forwards import dense_forward, reduced_forward


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on one thread (conftest.single_thread)."""


LINEAR_PARTS = ("in_proj", "x_proj", "dt_proj", "out_proj", "qkv_proj", "o_proj", "mlp", "ffn")


def test_the_description_matches_the_built_modules(family_model):
    family, model, info = family_model
    assert info["n_layer"] == 8 and len(architecture.kinds(info)) == 8
    assert architecture.kinds(info) == {"nemotron_h": "MM*MM-M*", "falcon_h1": "P" * 8}.get(
        family, "MM*MMM*M" if family in ("bamba", "granitemoehybrid", "jamba") else "M" * 8)
    for index, layer in enumerate(hf.layers(model)):
        parts = flops.block_flops_per_token(info, index, 64)
        linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        if architecture.ffn(info)[index] == architecture.FFN_MOE:  # experts: fvcore's count below checks them
            continue
        assert sum(parts.get(name, 0) for name in LINEAR_PARTS) == linear, (family, index)
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv1d)]
        assert parts.get("conv", 0) == sum(m.weight.numel() for m in convs), (family, index)


def test_fvcore_counts_the_analytic_flops_within_two_percent(family_model):
    family, model, info = family_model
    ids = token_batch(2, 48)
    counted = fvcore_count.count_forward(model, dense_forward(model), ids, info)
    analytic = flops.forward_flops(info, [48] * info["n_layer"])
    assert counted["total"] / 2 == pytest.approx(analytic["total"], rel=0.02), family
    for fv, an in zip(counted["per_layer"], analytic["per_layer"]):
        assert fv / 2 == pytest.approx(an, rel=0.02), family
    reducer = reducer_for(model, info, "ours", 0.3)
    try:
        counted = fvcore_count.count_forward(model, reduced_forward(reducer), ids, info)
        observed = reducer.describe()["observed"]
        expected = (observed["reduced_flops"] + observed["overhead_flops"]) / observed["rows"]
        assert counted["total"] / 2 == pytest.approx(expected, rel=0.02), family
    finally:
        reducer.remove()


def test_removing_the_hooks_restores_the_dense_model_bit_for_bit(family_model):
    family, model, info = family_model
    ids = token_batch(2, 40)
    dense = dense_logits(model, ids)
    reducer = reducer_for(model, info, "ours", 0.3)
    out = reducer(ids)
    assert out.logits.shape[1] < 40
    assert torch.equal(dense_logits(model, ids), dense), "hooks are inert outside reducer calls"
    reducer.remove()
    assert torch.equal(dense_logits(model, ids), dense)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_keeping_each_rows_first_tokens_gives_the_prefix_logits(family_model):
    # in any causal model a token's output depends on it and the tokens before it: with every row keeping its first
    # k tokens, those tokens saw exactly the k-token prefix in every layer, attention layers included
    family, model, info = family_model
    ids = token_batch(2, 48, seed=1)
    reducer = reducer_for(model, info, "late", 0.3)
    try:
        out = reducer(ids)
    finally:
        reducer.remove()
    k = int(out.counts[0])
    assert k < 48 and torch.equal(out.positions, torch.arange(k).expand(2, k))
    torch.testing.assert_close(out.logits, dense_logits(model, ids[:, :k]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["ours", "tome", "evit", "official"])
def test_a_padded_batch_scores_as_each_row_alone(hybrid_model, method):
    family, model, info = hybrid_model
    lengths = torch.tensor([44, 29, 17])
    ids = token_batch(3, 44, seed=2)
    ids[torch.arange(44) >= lengths[:, None]] = 0  # lm-eval right-pads with 0
    protect = torch.zeros(ids.shape, dtype=torch.bool)
    protect[torch.arange(3), lengths - 1] = True
    reducer = reducer_for(model, info, method, 0.3)
    try:
        out = reducer(ids, lengths=lengths, protect=protect)
        for row, length in enumerate(lengths.tolist()):
            alone = reducer(ids[row:row + 1, :length], protect=protect[row:row + 1, :length])
            kept = int(out.counts[row])
            assert torch.equal(out.positions[row, :kept], alone.positions[0]), (family, row)
            torch.testing.assert_close(out.logits[row, :kept], alone.logits[0], atol=2e-5, rtol=1e-4)
            assert bool(out.logits[row, kept:].isnan().all())
    finally:
        reducer.remove()


@pytest.mark.parametrize("family", ROTARY)
def test_attention_after_a_reduction_is_rotated_at_the_kept_tokens_original_positions(family):
    model = build(family)
    info = hf.model_info(model)
    reducer = reducer_for(model, info, "early", 0.3)  # drops the first tokens: kept positions are not slot indices
    last = max(i for i, kind in enumerate(architecture.kinds(info)) if architecture.has_attention(kind))
    assert last > max(reducer.setup.layers)
    seen = {}
    attention = getattr(hf.layers(model)[last], hf.FAMILIES[family].attention)
    handle = attention.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        out = reducer(token_batch(2, 48, seed=3))
    finally:
        handle.remove()
        reducer.remove()
    assert int(out.positions[0, 0]) > 0
    hidden = torch.zeros(2, out.positions.shape[1], info["d_model"])
    cos, sin = model.model.rotary_emb(hidden, position_ids=out.positions)
    torch.testing.assert_close(seen["position_embeddings"][0], cos, atol=0, rtol=0)
    torch.testing.assert_close(seen["position_embeddings"][1], sin, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["nemotron_h", "bamba", "falcon_h1", "mamba2"])
def test_generation_after_a_reduced_prefill_continues_from_its_cache_at_the_original_positions(family):
    from transformers import DynamicCache

    model = build(family)
    info = hf.model_info(model)
    ids = token_batch(2, 40, seed=4)
    reducer = reducer_for(model, info, "ours", 0.3)
    try:
        generated = generation.generate(model, ids, 6, reducer=reducer)[:, 40:]
        entering = reducer.prefill_entering
        assert entering[-1] < 40
        cache = DynamicCache(config=model.config)
        accepts = inspect.signature(model.forward).parameters
        name = "past_key_values" if "past_key_values" in accepts else "cache_params"  # Mamba, Mamba2: cache_params
        with torch.no_grad(), reducer.prefilling():  # the same prefill, then transformers' own steps from its cache
            step = model(ids, use_cache=True, **{name: cache}).logits[:, -1]
        tokens = [step.argmax(-1)]
        with torch.no_grad():
            for t in range(5):
                position = dict(position_ids=torch.full((2, 1), 40 + t)) if "position_ids" in accepts else {}
                step = model(tokens[-1][:, None], use_cache=True, **{name: cache}, **position).logits[:, -1]
                tokens.append(step.argmax(-1))
    finally:
        reducer.remove()
    assert torch.equal(generated, torch.stack(tokens, 1)), family
    for index, kind in enumerate(architecture.kinds(info)):
        if architecture.has_attention(kind):  # each attention layer cached the tokens it saw, then the new ones
            assert cache.get_seq_length(index) == entering[index] + 5, (family, index)


@pytest.mark.parametrize("family", HYBRIDS)
def test_generation_into_a_static_cache_after_a_reduced_prefill_equals_the_dynamic_cache(family, monkeypatch):
    """cg (on a GPU: compiled, CUDA-graph decoding) decodes into transformers' static cache, whose attention layers
    write after the slots they filled while generate's mask admits every slot up to the original position: with the
    masks of the written slots the tokens are those of the dynamic cache (which the test above steps by hand);
    without them a reduced layer attends to slots it never wrote."""
    model = build(family)
    info = hf.model_info(model)
    ids = token_batch(2, 40, seed=4)
    assert torch.equal(generation.generate(model, ids, 6, cg=True), generation.generate(model, ids, 6, cg=False))
    reducer = reducer_for(model, info, "ours", 0.3)
    try:
        dynamic = generation.generate(model, ids, 6, reducer=reducer, cg=False)
        assert torch.equal(generation.generate(model, ids, 6, reducer=reducer, cg=True), dynamic), family
        if family == "nemotron_h":
            monkeypatch.setattr(hf, "attach_written_slots", lambda model: [])
            assert not torch.equal(generation.generate(model, ids, 6, reducer=reducer, cg=True), dynamic)
    finally:
        reducer.remove()


def test_the_compiled_decoding_step_generates_the_same_tokens(monkeypatch, tmp_path):
    """On a GPU generate compiles its decoding step for a static cache (CUDA graphs); compiled here on the CPU (the
    same tracing of the layers and of the written-slot hooks, inductor's CPU code), a reduced generation gives the
    dynamic cache's tokens."""
    from transformers import CompileConfig
    from transformers.generation.utils import GenerationMixin

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiled = []

    def on_any_device(model, model_kwargs, generation_config):  # generate compiles only on accelerators
        cache = model_kwargs.get("past_key_values")
        compiled.append(cache is not None and cache.is_compileable and type(cache).__name__ == "StaticCache")
        return compiled[-1]

    monkeypatch.setattr(GenerationMixin, "_valid_auto_compile_criteria", on_any_device)
    model = build("nemotron_h")
    model.generation_config.compile_config = CompileConfig(mode="default")
    info = hf.model_info(model)
    ids = token_batch(2, 40, seed=4)
    reducer = reducer_for(model, info, "ours", 0.3)
    try:
        dynamic = generation.generate(model, ids, 6, reducer=reducer, cg=False)
        assert torch.equal(generation.generate(model, ids, 6, reducer=reducer, cg=True), dynamic)
    finally:
        reducer.remove()
        torch._dynamo.reset()  # no compiled code outlives the test
    assert compiled == [False, True]


@pytest.mark.parametrize("family", ["nemotron_h", "bamba"])
def test_generation_after_a_reduced_prefill_with_eager_attention(family, monkeypatch):
    """Eager attention materialises one mask for every layer, as wide as the first attention layer's keys; a later
    layer that cached fewer gets the mask of its own slots, on both caches, and generates what SDPA generates."""
    model = build(family)
    info = hf.model_info(model)
    ids = token_batch(2, 40, seed=4)
    reducer = reducer_for(model, info, "ours", 0.3)
    try:
        sdpa = generation.generate(model, ids, 6, reducer=reducer, cg=False)
        model.set_attn_implementation("eager")
        for cg in (False, True):
            assert torch.equal(generation.generate(model, ids, 6, reducer=reducer, cg=cg), sdpa), (family, cg)
        monkeypatch.setattr(type(model.config), "_attn_implementation", property(lambda config: "flash_attention_2"))
        with pytest.raises(ConfigError, match="needs sdpa or eager attention, got flash_attention_2"):
            generation.generate(model, ids, 6, reducer=reducer, cg=True)
    finally:
        reducer.remove()


def test_reduction_layers_follow_reduce_at():
    model = build("nemotron_h")  # MM*MM-M*
    info = hf.model_info(model)
    reducer = reducer_for(model, info, "ours", 0.2)
    assert all(architecture.kinds(info)[i] == architecture.SSM for i in reducer.setup.layers)
    reducer.remove()
    with pytest.raises(ConfigError, match="layer 2 is an attention layer.*use reduce_at=all"):
        reducer_for(model, info, "ours", 0.2, "layers=[2]")
    with pytest.raises(ConfigError, match="layer 5 is an MLP layer"):
        reducer_for(model, info, "ours", 0.2, "layers=[5]", "reduce_at=all")
    reducer = reducer_for(model, info, "ours", 0.2, "layers=[2]", "reduce_at=all")  # scored at o_proj's input
    try:
        out = reducer(token_batch(2, 40), trace=True)
        assert out.trace[0]["layer"] == 2 and int(out.counts[0]) < 40
    finally:
        reducer.remove()


def config_for(model_config: dict, *overrides):
    """A random-init run of a transformers model of this config (no file is read)."""
    from omegaconf import OmegaConf, open_dict

    from conftest import TOKENIZER_DIR

    cfg = compose_config(["model=hybrid-tiny", "model.random_init=true", "logger=none",
                          f"model.tokenizer={TOKENIZER_DIR}", *overrides])
    with open_dict(cfg):
        cfg.model.config = OmegaConf.create(model_config)
    return cfg


@pytest.mark.parametrize("model_config, overrides, message", [
    (dict(model_type="zamba2", vocab_size=4096, hidden_size=64, num_hidden_layers=2,
          layers_block_type=["mamba", "hybrid"]), ["method=ours", "ratio=0.3"],
     "does not support zamba2 models: its shared attention blocks"),
    (dict(model_type="not_a_model", vocab_size=10), [], "not a usable not_a_model config"),
    (config_of("bamba"), ["method=ours", "ratio=0.3", "layers=[2]"], "layer 2 is an attention layer"),
    (config_of("bamba"), ["method=ours", "ratio=0.3", "schedule=chunk"], "schedule=chunk .* layers differ"),
])
def test_bad_input_is_one_line_before_any_model_is_read(model_config, overrides, message):
    cfg = config_for(model_config, *overrides)
    with pytest.raises(ConfigError, match=message) as error:
        runner.validate_model(cfg)
    assert "\n" not in str(error.value)


def test_a_transformers_checkpoint_directory_runs_reduced_with_model_local(tmp_path):
    from conftest import TOKENIZER_DIR
    from ssmcompress import models

    hf.save_model(build("mamba2", seed=5), tmp_path, tokenizer=models.load_tokenizer(str(TOKENIZER_DIR)))
    cfg = compose_config(["model=local", f"model.path={tmp_path}", "method=ours", "ratio=0.3", "logger=none",
                          "benchmark.limit=4", "benchmark.measure.fvcore=false", f"results_dir={tmp_path / 'r'}"])
    record = runner.run(cfg, tmp_path / "run")
    assert record["model_info"]["model_type"] == "mamba2" and record["model_info"]["family"] == "hf"
    assert 0.25 < record["reduction"]["observed"]["achieved_ratio"] < 0.35
    assert set(record["metrics"]) == {"shakespeare_lastword", "shakespeare_continuation", "mqar", "story_qa"}
    assert record["flops"]["achieved_ratio"] > 0.2


def test_the_bundled_hybrid_runs_reduced_and_its_flops_agree_with_fvcore(tmp_path):
    from ssmcompress.config import ASSETS

    cfg = compose_config(["model=hybrid-tiny", "method=ours", "ratio=0.3", "logger=none", "benchmark.limit=4",
                          f"results_dir={tmp_path / 'r'}"])
    record = runner.run(cfg, tmp_path / "run")
    assert record["model_info"]["layers"] == "MMMM*MMMM*MM" and record["reduction"]["layers"] == [2, 3, 5, 6, 7, 8]
    assert abs(record["flops"]["achieved_ratio"] - 0.3) < 0.01  # the keep rate solved at the measured length
    assert abs(record["flops"]["fvcore"]["deviation"]["dense"]) < 0.02
    assert abs(record["flops"]["fvcore"]["deviation"]["reduced"]) < 0.02
    assert hf.load_config(str(ASSETS / "models" / "hybrid-tiny"))["model_type"] == "nemotron_h"


@pytest.mark.parametrize("family", HYBRIDS)
def test_a_reduced_prefill_caches_the_keys_of_the_tokens_each_attention_layer_saw(family):
    model = build(family)
    info = hf.model_info(model)
    ids = token_batch(2, 48, seed=5)
    attention = architecture.attention_layers(info)
    per_token = 2 * 2 * info["attn_kv_heads"] * info["attn_head_dim"] * 4  # keys and values of 2 rows, float32
    assert generation.prefill_kv_cache_bytes(model, ids) == per_token * 48 * len(attention)
    reducer = reducer_for(model, info, "ceiling", 0.3, "benchmark=efficiency")  # the schedule's counts
    try:
        held = generation.prefill_kv_cache_bytes(model, ids, reducer)
        entering = reducer.prefill_entering
        expected = reducer.schedule.tokens_entering(48)
    finally:
        reducer.remove()
    assert entering == expected
    assert held == per_token * sum(entering[i] for i in attention) < per_token * 48 * len(attention)
