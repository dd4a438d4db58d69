"""Mixers run a few rows at a time: the same logits and the same reduction, the model unchanged afterwards."""
import pytest
import torch

from ssmcompress import mixer_slices, reduction
from ssmcompress.hosts import mamba_ssm
from conftest import compose_config, tiny_model


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """conftest.single_thread"""


def batch(rows=5, length=48):
    return torch.randint(1, 4000, (rows, length), generator=torch.Generator().manual_seed(0))


def count_mixer_calls(model, monkeypatch):
    """The rows of every call of a mixer's forward (the class's, which batch_slices wraps)."""
    calls = []
    mixer_class = type(model.backbone.layers[0].mixer)
    forward = mixer_class.forward

    def counted(self, hidden_states, *args, **kwargs):
        calls.append(hidden_states.shape[0])
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(mixer_class, "forward", counted)
    return calls


@pytest.mark.parametrize("generation", [1, 2])
def test_sliced_mixers_give_the_whole_batch_logits(generation, monkeypatch):
    model = tiny_model(generation, seed=2)
    ids = batch()
    with torch.no_grad():
        whole = model(ids).logits
        calls = count_mixer_calls(model, monkeypatch)
        with mixer_slices.batch_slices(model, 2):
            sliced = model(ids).logits
        monkeypatch.undo()
        again = model(ids).logits
    assert calls == [2, 2, 1] * len(model.backbone.layers)  # rows 0-1, 2-3, 4 through every mixer
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, whole), "the class's forward is back"
    assert not any("forward" in vars(block.mixer) for block in model.backbone.layers)


@pytest.mark.parametrize("method", ["ours", "evit", "official"])
@pytest.mark.parametrize("generation", [1, 2])
def test_a_reducer_over_sliced_mixers_keeps_the_same_tokens(generation, method):
    model = tiny_model(generation, seed=1, n_layer=12 if generation == 2 else 6)
    reducer = reduction.from_config(model, compose_config([f"method={method}", "ratio=0.3"]),
                                    mamba_ssm.model_info(model))
    ids = batch()
    whole = reducer(ids)
    with mixer_slices.batch_slices(model, 2):
        sliced = reducer(ids)
    reducer.remove()
    assert whole.positions.shape[1] < ids.shape[1]
    assert torch.equal(sliced.positions, whole.positions) and torch.equal(sliced.counts, whole.counts)
    torch.testing.assert_close(sliced.logits, whole.logits, rtol=1e-5, atol=1e-5)


def test_a_batch_within_the_rows_and_a_cached_state_run_unsliced():
    calls = []

    def forward(hidden, inference_params=None):
        calls.append(hidden.shape[0])
        return hidden

    sliced = mixer_slices.sliced_forward(forward, 4)
    sliced(torch.zeros(3, 2, 1))
    sliced(torch.zeros(9, 2, 1), inference_params=object())
    out = sliced(torch.arange(9.0).reshape(9, 1, 1))
    assert calls == [3, 9, 4, 4, 1]
    assert torch.equal(out.flatten(), torch.arange(9.0)), "rows concatenated in order"


def test_rows_below_one_are_refused():
    model = tiny_model(2)
    with pytest.raises(ValueError, match="at least 1"):
        with mixer_slices.batch_slices(model, 0):
            pass
