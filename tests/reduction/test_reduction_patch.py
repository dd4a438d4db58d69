"""The reducer on tiny random mamba-ssm models: exact unwrapping, batching, protection, alignment, the budget."""
import pytest
import torch

from ssmcompress import reduction
from ssmcompress.reduction import budget, patch
from conftest import batch_of, tiny_model
from reduction_fixtures import ALL_METHODS, compose, mamba1, mamba2, one_thread  # noqa: F401


def dense_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits



def test_no_reduction_layers_is_bit_identical_to_dense(mamba2):
    model, info = mamba2
    ids, _, _ = batch_of([30, 30], 30)
    reducer = reduction.from_config(model, compose("ours", 0.3, "layers=[]"), info)
    out = reducer(ids)
    assert torch.equal(out.logits, dense_logits(model, ids))
    assert torch.equal(out.positions, torch.arange(30).expand(2, 30))
    reducer.remove()


@pytest.mark.parametrize("method", ["ours", "official"])
def test_remove_restores_the_dense_model_exactly(mamba2, method):
    model, info = mamba2
    ids, _, _ = batch_of([40], 40)
    dense = dense_logits(model, ids)
    flags = [block.mixer.use_mem_eff_path for block in model.backbone.layers]
    reducer = reduction.from_config(model, compose(method, 0.3), info)
    assert reducer(ids).logits.shape[1] < 40
    assert torch.equal(dense_logits(model, ids), dense), "hooks are inert outside reducer calls"
    reducer.remove()
    assert torch.equal(dense_logits(model, ids), dense)
    assert [block.mixer.use_mem_eff_path for block in model.backbone.layers] == flags
    for block in model.backbone.layers:
        assert not block._forward_hooks and not block.mixer.out_proj._forward_pre_hooks
    with pytest.raises(RuntimeError, match="removed"):
        reducer(ids)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_padded_batch_equals_each_sequence_alone(mamba2, method):
    model, info = mamba2
    ids, lengths, protect = batch_of([48, 29, 11], 48, seed=1)
    reducer = reduction.from_config(model, compose(method, 0.3), info)
    try:
        out = reducer(ids, lengths=lengths, protect=protect)
        assert out.logits.shape[:2] == out.positions.shape and out.counts.max() == out.logits.shape[1]
        for row, length in enumerate(lengths.tolist()):
            alone = reducer(ids[row:row + 1, :length], protect=protect[row:row + 1, :length])
            kept = int(out.counts[row])
            assert kept == alone.logits.shape[1] <= length
            assert kept < length or method == "official"  # official keeps ceil(11 * 0.92) = 11 of 11
            assert torch.equal(out.positions[row, :kept], alone.positions[0])
            assert torch.allclose(out.logits[row, :kept], alone.logits[0], atol=1e-5, rtol=1e-4)
            assert bool(out.logits[row, kept:].isnan().all()), "filler slots hold NaN"
            real = out.positions[row, :kept]
            assert bool((real[1:] > real[:-1]).all()) and bool((real < length).all())
            assert set(protect[row].nonzero().flatten().tolist()) <= set(real.tolist())
    finally:
        reducer.remove()


def test_padded_batch_equals_alone_on_mamba1(mamba1):
    model, info = mamba1
    ids, lengths, protect = batch_of([30, 17], 30, seed=2)
    reducer = reduction.from_config(model, compose("ours", 0.3), info)
    out = reducer(ids, lengths=lengths, protect=protect)
    alone = reducer(ids[1:, :17], protect=protect[1:, :17])
    kept = int(out.counts[1])
    assert torch.equal(out.positions[1, :kept], alone.positions[0])
    assert torch.allclose(out.logits[1, :kept], alone.logits[0], atol=1e-5, rtol=1e-4)
    reducer.remove()


@pytest.mark.parametrize("method", ["prune_only", "evit"])
def test_both_streams_shortened_alike_and_cumulatively(mamba2, method):
    """Recompute the reduced forward by hand from the trace: every block runs dense, and after each reduction
    layer both streams keep exactly the traced slots. Pruning methods only, so no merge arithmetic is involved."""
    model, info = mamba2
    ids, lengths, protect = batch_of([36, 21], 36, seed=3)
    reducer = reduction.from_config(model, compose(method, 0.3), info)
    out = reducer(ids, lengths=lengths, protect=protect, trace=True)
    reducer.remove()
    assert [entry["layer"] for entry in out.trace] == budget.default_layers(12)
    steps = {entry["layer"]: entry for entry in out.trace}
    with torch.no_grad():
        backbone = model.backbone
        hidden, residual = backbone.embedding(ids), None
        for index, block in enumerate(backbone.layers):
            hidden, residual = block(hidden, residual)
            if index in steps:
                entry = steps[index]
                keep = entry["valid"] & (entry["hidden"] == patch.KEPT)
                assert torch.equal(keep, entry["valid"] & (entry["residual"] == patch.KEPT))
                order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : hidden.shape[1]]
                width = int(keep.sum(1).max())
                hidden = hidden.gather(1, order[:, :width, None].expand(-1, -1, hidden.shape[-1]))
                residual = residual.gather(1, order[:, :width, None].expand(-1, -1, residual.shape[-1]))
        logits = model.lm_head(backbone.norm_f((hidden + residual).to(backbone.norm_f.weight.dtype)))
    for row in range(2):
        kept = int(out.counts[row])
        assert torch.allclose(out.logits[row, :kept], logits[row, :kept], atol=1e-5, rtol=1e-4)


def test_achieved_ratio_matches_the_target_on_a_long_sequence(mamba2):
    model, info = mamba2
    ids, _, _ = batch_of([400], 400, seed=4)
    reducer = reduction.from_config(model, compose("ours", 0.2), info)
    described = reducer.describe()
    assert described["observed"] is None and described["nominal"]["flops_ratio"] == pytest.approx(0.2)
    out = reducer(ids)
    described = reducer.describe()
    observed = described["observed"]
    assert observed["achieved_ratio"] == pytest.approx(0.2, abs=0.01)
    assert observed["achieved_ratio_with_overhead"] < observed["achieved_ratio"]
    assert observed["final_tokens"] == out.logits.shape[1] == round(400 * described["keep_rate"] ** 7)
    assert 0 < observed["token_fraction"] < 1 and described["min_length"] <= 400
    # the evaluator's hook for the reduction's own work: one similarity matrix per reduction layer
    assert reducer.reduction_flops([400] * 12) == 7 * 200 * 200 * info["d_model"]
    reducer.remove()


def test_official_on_a_model_removes_even_positions_at_the_start(mamba2):
    model, info = mamba2
    ids, _, _ = batch_of([64, 64], 64, seed=5)
    reducer = reduction.from_config(model, compose("official", 0.3), info)
    out = reducer(ids, trace=True)
    reducer.remove()
    first = out.trace[0]
    removed = first["hidden"] != patch.KEPT
    r = 64 - -(-64 * reducer.setup.keep_rate // 1)  # the code's N - ceil(N * reduce_ratio)
    for row in range(2):
        assert first["position"][row][removed[row]].tolist() == list(range(0, 2 * int(r), 2))
        assert set(first["into"][row][removed[row]].tolist()) == {1}
    for entry in out.trace:  # every later layer too: the removed slots are the first even slots
        slots = (entry["hidden"][0] != patch.KEPT).nonzero().flatten().tolist()
        assert slots == list(range(0, 2 * len(slots), 2))


def test_official_accepts_the_papers_reduce_ratio(mamba2):
    model, info = mamba2
    reducer = reduction.from_config(model, compose("official", 0.3, "method.reduce_ratio=0.905"), info)
    described = reducer.describe()
    assert described["keep_rate"] == 0.905 and described["target_ratio"] is None
    assert described["nominal"]["token_fraction"] == pytest.approx(budget.token_fraction(
        budget.default_layers(12), 0.905, 12))
    reducer.remove()


def test_nan_importance_is_a_clear_error():
    model = tiny_model(2, seed=2)
    from ssmcompress.hosts import mamba_ssm

    info = mamba_ssm.model_info(model)
    reducer = reduction.from_config(model, compose("ours", 0.2), info)
    with torch.no_grad():
        model.backbone.layers[1].mixer.in_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="layer 1: token importance is NaN/inf"):
        reducer(torch.randint(1, 4000, (1, 20)))
    reducer.remove()


def test_strict_names_the_shortest_sequence_that_reaches_the_budget(mamba2):
    model, info = mamba2
    reducer = reduction.from_config(model, compose("official", 0.3, "method.strict=true"), info)
    shortest = reducer.min_length()
    assert shortest is not None and shortest > 10
    with pytest.raises(ValueError, match=f"too short for ratio=0.3.*at least {shortest} tokens"):
        reducer(torch.randint(1, 4000, (1, 10)))
    assert reducer(torch.randint(1, 4000, (1, shortest))).logits.shape[1] < shortest
    reducer.remove()


def test_bad_calls_are_clear_errors(mamba2):
    model, info = mamba2
    reducer = reduction.from_config(model, compose("tome", 0.2), info)
    ids = torch.randint(1, 4000, (2, 12))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 12\]"):
        reducer(ids, lengths=torch.tensor([12, 13]))
    with pytest.raises(ValueError, match="protect must be a bool tensor"):
        reducer(ids, protect=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        reducer(ids.float())
    assert reducer(ids).trace is None
    reducer.remove()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_reduction_run_a_few_rows_at_a_time_is_the_whole_batch_reduction(mamba2, method):
    model, info = mamba2
    ids, _, _ = batch_of([40] * 5, 40, seed=4)
    reducer = reduction.from_config(model, compose(method, 0.3), info)
    whole = reducer(ids, trace=True)
    calls = []
    function = reducer.setup.function
    reducer.setup.function = lambda tokens, n_remove, **params: calls.append(tokens.valid.shape[0]) or function(
        tokens, n_remove, **params)
    reducer.row_slices = 2
    sliced = reducer(ids, trace=True)
    reducer.setup.function = function
    reducer.remove()
    assert calls == [2, 2, 1] * len(reducer.setup.layers)
    assert torch.equal(sliced.positions, whole.positions) and torch.equal(sliced.counts, whole.counts)
    torch.testing.assert_close(sliced.logits, whole.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(sliced.trace, whole.trace):
        assert all(torch.equal(a[key], b[key]) for key in ("position", "hidden", "residual", "into"))


def test_rows_at_a_time_leave_a_padded_batch_whole(mamba2):
    model, info = mamba2
    ids, lengths, protect = batch_of([40, 31, 25], 40)
    reducer = reduction.from_config(model, compose("ours", 0.3), info)
    whole = reducer(ids, lengths, protect)
    reducer.row_slices = 1  # the widths come from the GPU here: one call over the whole batch
    sliced = reducer(ids, lengths, protect)
    reducer.remove()
    assert torch.equal(sliced.positions, whole.positions)
    assert torch.equal(sliced.logits.nan_to_num(), whole.logits.nan_to_num())
