"""Input capture at the mixers (Mamba-1 and Mamba-2) and layer-by-layer pruning through the pruned layers."""
import pytest
import torch

from conftest import tiny_model
from ssmcompress.pruning import sequential, targets
from ssmcompress.pruning.hessian import LayerInputs
from pruning_fixtures import one_thread  # noqa: F401

TOKENS = torch.randint(0, 4000, (3, 24), generator=torch.Generator().manual_seed(0))


def test_every_target_is_observed_once_per_token():
    for generation in (1, 2):
        model = tiny_model(generation)
        names = list(targets.TARGETS[generation])
        inputs = sequential.embed(model, TOKENS, batch_size=2)
        stats, _ = sequential.observe_inputs(targets, model.backbone.layers[0], 0, inputs, names)
        widths = {name: getattr(model.backbone.layers[0].mixer, name).in_features for name in names}
        for name in names:
            assert stats[name].tokens == TOKENS.numel(), (generation, name)
            assert stats[name].gram.shape == (widths[name], widths[name])
            assert stats[name].gram.diagonal().min() > 0


def test_mamba1_dt_proj_input_is_what_its_raw_matmul_multiplies(monkeypatch):
    """dt_proj is applied as `dt_proj.weight @ dt`: no hook on it fires; check the captured dt against the delta
    the selective scan receives."""
    import mamba_ssm.modules.mamba_simple as m1

    model = tiny_model(1)
    mixer = model.backbone.layers[0].mixer
    deltas, captured = [], []
    scan = m1.selective_scan_fn

    def spy(u, delta, *args, **kwargs):
        deltas.append(delta)
        return scan(u, delta, *args, **kwargs)

    monkeypatch.setattr(m1, "selective_scan_fn", spy)
    handle = targets.observe_mixer(mixer, "dt_proj", captured.append)
    with torch.no_grad():
        model(TOKENS[:1])
    handle.remove()
    dt = captured[0].reshape(-1, mixer.dt_rank)  # (b l, dt_rank)
    expected = (mixer.dt_proj.weight @ dt.T).reshape(mixer.d_inner, 1, -1).transpose(0, 1)  # (b, d, l)
    assert torch.allclose(deltas[0], expected, atol=1e-6)


def test_mamba2_in_proj_input_matches_the_module_call():
    model = tiny_model(2)
    mixer = model.backbone.layers[1].mixer
    captured, module_inputs = [], []
    handles = [targets.observe_mixer(mixer, "in_proj", captured.append),
               mixer.in_proj.register_forward_pre_hook(lambda m, args: module_inputs.append(args[0]))]
    with torch.no_grad():
        model(TOKENS[:1])
    for handle in handles:
        handle.remove()
    assert torch.equal(captured[0], module_inputs[0])


def test_unfused_restores_the_flags():
    model = tiny_model(2)
    mixer = model.backbone.layers[0].mixer
    mixer.use_mem_eff_path = True
    with targets.unfused([mixer]):
        assert mixer.use_mem_eff_path is False
    assert mixer.use_mem_eff_path is True


def final_model_inputs(model, tokens, names):
    """Input statistics of every target in a plain forward of the (pruned) model."""
    stats = {}
    handles = []
    for index, block in enumerate(model.backbone.layers):
        for name in names:
            layer = stats.setdefault(f"backbone.layers.{index}.mixer.{name}",
                                     LayerInputs(getattr(block.mixer, name).in_features))
            handles.append(targets.observe_mixer(block.mixer, name, layer.add))
    with torch.no_grad(), targets.unfused(targets.mixers(model)):
        model(tokens)
    for handle in handles:
        handle.remove()
    return stats


@pytest.mark.parametrize("generation,mlp", [(1, 0), (2, 0), (2, 32)])
def test_true_sequential_layers_see_the_already_pruned_layers(generation, mlp):
    """Each layer is pruned on the inputs that the finished (fully pruned) model gives it: everything before it,
    earlier blocks and earlier targets of its own block, was already pruned. (Without an MLP the next block's
    inputs come from a linear correction for the pruned out_proj, with one a second pass.)"""
    model = tiny_model(generation, d_intermediate=mlp)
    names = list(targets.TARGETS[generation])
    seen = []

    def halve(weight, inputs):  # a stand-in pruner that changes the outputs a lot
        seen.append(inputs.gram.clone())
        return weight.masked_fill(torch.rand(weight.shape, generator=torch.Generator().manual_seed(len(seen))) < 0.5, 0)

    reports = sequential.prune_model(model, halve, names, TOKENS, true_sequential=True, batch_size=2)
    expected = final_model_inputs(model, TOKENS, names)
    assert list(reports) == list(expected)
    for gram, (name, stats) in zip(seen, expected.items()):
        assert torch.allclose(gram, stats.gram, rtol=1e-4, atol=1e-4), name


def test_one_pass_mode_reads_a_block_before_pruning_it():
    model = tiny_model(2)
    dense = final_model_inputs(tiny_model(2), TOKENS, ["in_proj", "out_proj"])
    seen = {}

    def zero_half(weight, inputs):
        seen[len(seen)] = inputs.gram.clone()
        return weight.masked_fill(torch.arange(weight.shape[1]) % 2 == 0, 0)

    sequential.prune_model(model, zero_half, ["in_proj", "out_proj"], TOKENS, true_sequential=False, batch_size=3)
    pruned = final_model_inputs(model, TOKENS, ["in_proj", "out_proj"])
    names = list(pruned)
    assert torch.allclose(seen[0], dense[names[0]].gram) and torch.allclose(seen[1], dense[names[1]].gram)
    assert torch.allclose(seen[2], pruned[names[2]].gram, rtol=1e-4, atol=1e-4)  # block 1 after pruned block 0
    assert not torch.allclose(seen[3], pruned[names[3]].gram, rtol=1e-2)  # out_proj saw the unpruned in_proj


def test_reports_and_no_calibration_path():
    model = tiny_model(1)
    reports = sequential.prune_model(model, lambda w, x: w.masked_fill(torch.ones_like(w, dtype=torch.bool), 0),
                                     ["out_proj", "in_proj"])  # order given does not matter
    assert list(reports)[:2] == ["backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj"]
    assert all(r["sparsity"] == 1.0 and r["error"] is None for r in reports.values())
    assert (model.backbone.layers[3].mixer.in_proj.weight == 0).all()
    with pytest.raises(ValueError, match="no prunable layer x_proj"):
        sequential.prune_model(tiny_model(2), lambda w, x: w, ["x_proj"])
