"""The pruning core on transformers models (OPT, LLaMA, GPT-2): the adapter's layers and block inputs, layer-by-layer
pruning through the pruned layers, config checks, from_config, and a full run of the bundled tiny-opt."""
import pytest
import torch

from conftest import compose_config
from hf_fixtures import TINY_HF, save_tiny_hf, tiny_hf_model
from ssmcompress import config as config_lib
from ssmcompress import pruning, runner, tracking
from ssmcompress.hosts import transformers as hf
from ssmcompress.config import ConfigError
from ssmcompress.pruning import hf_targets, sequential
from ssmcompress.pruning.hessian import LayerInputs
from ssmcompress.pruning.masks import follows_nm
from pruning_fixtures import one_thread  # noqa: F401

TOKENS = torch.randint(1, 4000, (3, 24), generator=torch.Generator().manual_seed(0))
QUICK = ["pruner.calibration.samples=4", "pruner.calibration.length=32", "pruner.calibration.batch_size=2"]
LAYERS = {
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
PREFIX = {"opt": "model.decoder.layers", "llama": "model.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("kind", list(TINY_HF))
def test_layers_widths_and_passes_of_each_architecture(kind):
    model = tiny_hf_model(kind)
    block = hf_targets.blocks(model)[1]
    assert list(hf_targets.prunable(block)) == LAYERS[kind]
    assert hf_targets.block_prefix(model, 1) == f"{PREFIX[kind]}.1"
    label, widths = hf_targets.config_widths(TINY_HF[kind])
    assert widths == {name: hf_targets.get_weight(block, name).shape[1] for name in LAYERS[kind]}
    assert label == f"{type(block).__name__} blocks"
    assert max(widths.values()) == (128 if kind == "gpt2" else 64)  # the MLP's inner width
    groups = hf_targets.sequential_groups(block, LAYERS[kind])
    assert [name for group in groups for name in group] == LAYERS[kind]
    expected = {"opt": [3, 1, 1, 1], "llama": [3, 1, 2, 1], "gpt2": [1, 1, 1, 1]}[kind]
    assert [len(group) for group in groups] == expected


def test_gpt2_conv1d_weights_are_read_and_written_transposed():
    block = hf_targets.blocks(tiny_hf_model("gpt2"))[0]
    module = block.attn.c_attn
    weight = hf_targets.get_weight(block, "attn.c_attn")
    assert weight.shape == (96, 32) and torch.equal(weight, module.weight.T)
    with torch.no_grad():
        hf_targets.set_weight(block, "attn.c_attn", torch.zeros_like(weight).index_fill_(1, torch.tensor([3]), 1.0))
    assert (module.weight[3] == 1).all() and module.weight.sum() == 96  # input row 3 of the (in x out) storage


@pytest.mark.parametrize("kind", list(TINY_HF))
def test_blocks_run_on_captured_inputs_as_in_the_models_forward(kind):
    model = tiny_hf_model(kind)
    blocks = hf_targets.blocks(model)
    outputs = []
    handle = blocks[-1].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(TOKENS)
    handle.remove()
    for batch_size, exact in ((3, True), (2, False)):
        with torch.no_grad():
            items = sequential.embed(model, TOKENS, batch_size)
            for index, block in enumerate(blocks):
                items = sequential.run_block(hf_targets, block, index, items)
        hidden = torch.cat([item[0] for item in items])
        expected = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
        if exact:  # the same computation as the model's own forward
            assert torch.equal(hidden, expected)
        else:
            assert torch.allclose(hidden, expected, atol=1e-5)


def final_model_inputs(model, tokens):
    """Input statistics of every linear layer of every block in a plain forward of the (pruned) model."""
    stats, handles = {}, []
    for index, block in enumerate(hf_targets.blocks(model)):
        for name in hf_targets.prunable(block):
            layer = stats.setdefault(f"{hf_targets.block_prefix(model, index)}.{name}",
                                     LayerInputs(hf_targets.get_weight(block, name).shape[1]))
            handles.append(hf_targets.observe(block, name, layer.add))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return stats


def random_half(seen):
    def prune(weight, inputs):  # a stand-in pruner that changes the outputs a lot
        seen.append(inputs.gram.clone())
        generator = torch.Generator().manual_seed(len(seen))
        return weight.masked_fill(torch.rand(weight.shape, generator=generator) < 0.5, 0)
    return prune


@pytest.mark.parametrize("kind", list(TINY_HF))
def test_true_sequential_layers_see_the_already_pruned_layers(kind):
    """Each layer is pruned on the inputs the finished (fully pruned) model gives it: the earlier blocks and the
    earlier layers of its own block were already pruned (OPT calls q_proj before the k_proj it registers first)."""
    model = tiny_hf_model(kind)
    seen = []
    reports = sequential.prune_model(model, random_half(seen), LAYERS[kind], TOKENS, true_sequential=True,
                                     batch_size=2)
    expected = final_model_inputs(model, TOKENS)
    assert list(reports) == list(expected)
    for gram, (name, stats) in zip(seen, expected.items()):
        assert torch.allclose(gram, stats.gram, rtol=1e-4, atol=1e-4), name


def test_one_pass_mode_reads_a_block_before_pruning_it():
    dense = final_model_inputs(tiny_hf_model("llama"), TOKENS)
    model = tiny_hf_model("llama")
    seen = []
    sequential.prune_model(model, random_half(seen), LAYERS["llama"], TOKENS, true_sequential=False, batch_size=3)
    pruned = final_model_inputs(model, TOKENS)
    names = list(pruned)
    for i in range(7):  # block 0: every layer saw the dense block
        assert torch.allclose(seen[i], dense[names[i]].gram, rtol=1e-5), names[i]
    assert torch.allclose(seen[7], pruned[names[7]].gram, rtol=1e-4, atol=1e-4)  # block 1 after pruned block 0
    assert not torch.allclose(seen[3], pruned[names[3]].gram, rtol=1e-2)  # o_proj saw the unpruned q/k/v


def compose_hf(model_dir, *overrides):
    return compose_config(["model=tiny-opt", f"model.path={model_dir}", "logger=none", *overrides])


def test_check_config_on_transformers_models(tmp_path):
    cfg = compose_hf(tmp_path, "pruner=multi", "sparsity=4:8")
    pruning.check_config(cfg, TINY_HF["opt"])
    with pytest.raises(ConfigError, match="OPTDecoderLayer blocks have no prunable layer in_proj: choose from "
                                          "self_attn.k_proj"):
        pruning.check_config(compose_hf(tmp_path, "pruner=wanda", "sparsity=0.5", "pruner.targets=[in_proj]"),
                             TINY_HF["opt"])
    with pytest.raises(ConfigError, match="self_attn.k_proj: N:M sparsity 4:8 needs the input width \\(36\\)"):
        pruning.check_config(cfg, {**TINY_HF["opt"], "hidden_size": 36, "word_embed_proj_dim": 36})
    for kind in ("llama", "gpt2"):
        pruning.check_config(compose_hf(tmp_path, "pruner=sparsegpt", "sparsity=2:4",
                                        f"pruner.targets=[{LAYERS[kind][-1]}]"), TINY_HF[kind])
    for name in ("opt-350m", "llama-2-7b"):  # the hub configs' own architecture and targets, before any download
        runner.validate(compose_config([f"model={name}", "model.random_init=true", "pruner=multi",  # tokenizer:
                                        "sparsity=4:8", "logger=none", "model.tokenizer=${asset:models/tiny-opt}"]))


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return save_tiny_hf(tmp_path_factory.mktemp("opt-random"), "opt")


def prune_dir(model_dir, name, sparsity, *overrides):
    cfg = compose_hf(model_dir, f"pruner={name}", f"sparsity={sparsity}", *(QUICK if name != "magnitude" else []),
                     *overrides)
    pruning.check_config(cfg, hf.load_config(str(model_dir)))
    model = hf.load_model(str(model_dir), "cpu", "float32")
    return model, pruning.from_config(model, None, cfg)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "multi"])
def test_sparsity_zero_leaves_a_transformers_model_bit_identical(opt_dir, name):
    before = hf.load_model(str(opt_dir), "cpu", "float32").state_dict()
    model, summary = prune_dir(opt_dir, name, 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert summary["achieved_sparsity"] == 0.0


@pytest.mark.parametrize("name,sparsity", [("wanda", "2:4"), ("sparsegpt", "0.5"), ("multi", "4:8"),
                                           ("magnitude", "2:4")])
def test_pruned_transformer_layers_and_the_record_section(opt_dir, name, sparsity):
    before = hf.load_model(str(opt_dir), "cpu", "float32").state_dict()
    model, summary = prune_dir(opt_dir, name, sparsity)
    assert summary["targets"] == LAYERS["opt"] and len(summary["layers"]) == 6 * 2
    assert summary["achieved_sparsity"] == pytest.approx(0.5)
    for key, value in model.state_dict().items():
        layer = key.removesuffix(".weight")
        if layer in summary["layers"]:
            assert summary["layers"][layer]["zeros"] == int((value == 0).sum())
            if ":" in sparsity:
                assert follows_nm(value, *map(int, sparsity.split(":")))
        elif key != "lm_head.weight":  # embeddings, positions, norms, biases: untouched
            assert torch.equal(before[key], value), key


def test_gpt2_nm_groups_run_along_the_inputs(tmp_path):
    model_dir = save_tiny_hf(tmp_path / "gpt2", "gpt2")
    model, summary = prune_dir(model_dir, "sparsegpt", "2:4", "pruner.targets=[attn.c_attn,mlp.c_proj]")
    assert list(summary["layers"]) == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                                       "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    block = hf_targets.blocks(model)[1]
    assert follows_nm(hf_targets.get_weight(block, "mlp.c_proj"), 2, 4)  # (out x in): groups of 4 inputs
    assert (block.mlp.c_fc.weight != 0).all()


def test_saved_pruned_transformer_reloads_bit_identical(opt_dir, tmp_path):
    model, summary = prune_dir(opt_dir, "wanda", "0.5", f"pruner.save_dir={tmp_path / 'pruned'}")
    reloaded = hf.load_model(summary["saved_to"], "cpu", "float32")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_runner_prunes_the_bundled_tiny_opt_and_evaluates_it(tmp_path):
    overrides = ["model=tiny-opt", f"results_dir={tmp_path / 'results'}", "logger=none", "model.device=cpu",
                 "benchmark=pruning", "benchmark.limit=3", "benchmark.measure.repeats=1", "pruner=multi",
                 "sparsity=0.5", *QUICK]
    cfg = compose_config(overrides)
    runner.validate(cfg)
    record = runner.run(cfg, run_dir=tmp_path / "run")
    stored = tracking.load(tmp_path / "results")[0]
    assert stored["model_info"]["family"] == "hf" and stored["pruner"] == "multi"
    assert stored["pruning"]["targets"] == LAYERS["opt"] and stored["pruning"]["achieved_sparsity"] == 0.5
    assert len(stored["pruning"]["layers"]) == 6 * 4
    assert record["metrics"]["shakespeare_ppl"]["word_perplexity"] > 1
    assert stored["flops"] is None and stored["efficiency"]["dense_latency_ms"] > 0
