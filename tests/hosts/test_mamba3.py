"""Mamba-3 (mamba-ssm's `Mamba3` SISO mixer, `ssm_cfg.layer: Mamba3`) as a mamba-ssm model: built and run on a CPU
(compat), described, counted, and reduced by every method, with the reducer's contract as on Mamba-2: a padded
batch equals each sequence alone, the budget is met, removing the reducer restores the dense model bit for bit."""
from functools import partial

import pytest
import torch

from ssmcompress import flops, generation, mamba3_reference, reduction
from ssmcompress.errors import ConfigError
from ssmcompress.hosts import mamba_ssm
from ssmcompress.reduction.patch import MERGED
from conftest import TINY, batch_of, compose_config, tiny_model

METHODS = ["ours", "official", "evit", "tome", "pumer", "random", "early", "strided", "late", "utr_early"]


@pytest.fixture(scope="module")
def mamba3():
    model = tiny_model(3, seed=1, n_layer=12)
    return model, mamba_ssm.model_info(model)


def test_a_mamba3_model_is_described_by_its_config(mamba3):
    model, info = mamba3
    assert type(model.backbone.layers[0].mixer).__name__ == "Mamba3"
    assert info == {**mamba_ssm.info_from_config({**TINY[3], "n_layer": 12}), "params": info["params"]}
    assert (info["mamba_version"], info["nheads"], info["n_angles"], info["d_conv"]) == (3, 8, 4, 0)
    assert flops.mixer_flops_per_token(info, 64)["in_proj"] == 64 * (2 * 128 + 2 * 16 + 3 * 8 + 4)


MIMO = dict(TINY[3], ssm_cfg=dict(TINY[3]["ssm_cfg"], is_mimo=True, mimo_rank=2, chunk_size=8))


@pytest.fixture(scope="module")
def mimo():
    """A MIMO model (rank 2) on the pure-torch layer, its biases and rank projections away from their initial values
    (biases 1, projections 1/R), which would hide a mix-up of the ranks."""
    model = tiny_model(3, seed=2, **{**MIMO, "n_layer": 8})
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o"):
                weight.copy_(torch.randn_like(weight) * 0.5 + 1)
    return model, mamba_ssm.model_info(model)


def test_a_mimo_model_is_described_by_its_config(mimo):
    model, info = mimo
    assert model.backbone.layers[0].mixer.is_mimo
    assert info == {**mamba_ssm.info_from_config({**MIMO, "n_layer": 8}), "params": info["params"]}
    assert info["mimo_rank"] == 2 and "mimo_rank" not in mamba_ssm.info_from_config(TINY[3])
    parts = flops.mixer_flops_per_token(info, 64)
    assert parts["in_proj"] == 64 * (2 * 128 + 2 * 16 * 2 + 3 * 8 + 4) and parts["mimo_out"] == 2 * 128


@pytest.mark.parametrize("method", ["ours", "tome", "evit", "official"])
def test_every_method_reduces_a_mimo_model_a_padded_batch_as_each_sequence_alone(mimo, method):
    model, info = mimo
    achieved = reduces_a_padded_batch_as_each_row_alone(model, info, [f"method={method}", "rotation=positions"],
                                                        [40, 23], 40, seed=2)
    assert achieved == pytest.approx(0.3, abs=0.05)


def test_a_mimo_model_decodes_from_its_prefills_states_as_the_whole_sequence(mimo):
    steps_continue_the_prefill(mimo[0], prompt=19, steps=4, seed=5)


def reduces_a_padded_batch_as_each_row_alone(model, info, overrides, lengths, total, seed) -> float:
    """Reduce a right-padded batch at 30 % and each of its rows alone: the same kept positions and logits per row.
    Returns the padded batch's achieved FLOPs ratio."""
    ids, lengths, protect = batch_of(lengths, total, seed=seed)
    reducer = reduction.from_config(model, compose_config([*overrides, "ratio=0.3"]), info)
    try:
        out = reducer(ids, lengths=lengths, protect=protect)
        achieved = reducer.describe()["observed"]["achieved_ratio"]
        for row, length in enumerate(lengths.tolist()):
            alone = reducer(ids[row:row + 1, :length], protect=protect[row:row + 1, :length])
            kept = int(out.counts[row])
            assert kept == alone.logits.shape[1] < length
            assert torch.equal(out.positions[row, :kept], alone.positions[0])
            assert torch.allclose(out.logits[row, :kept], alone.logits[0], atol=1e-5, rtol=1e-4)
    finally:
        reducer.remove()
    return achieved


def steps_continue_the_prefill(model, prompt: int, steps: int, seed: int) -> None:
    """Greedy decoding from a prefill's cache (the layer's final angles, state, last k and v), one token per step:
    each step's logits are the whole sequence's last ones."""
    from mamba_ssm.utils.generation import InferenceParams

    ids = torch.randint(1, 4000, (2, prompt), generator=torch.Generator().manual_seed(seed))
    cache = InferenceParams(max_seqlen=32, max_batch_size=2)
    with torch.no_grad():
        logits = model(ids, inference_params=cache).logits[:, -1]
        for _ in range(steps):
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            cache.seqlen_offset = ids.shape[1] - 1
            logits = model(ids[:, -1:], inference_params=cache).logits[:, -1]
            torch.testing.assert_close(logits, model(ids).logits[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [[f"method={method}"] for method in METHODS]
                         + [["method=ours", "rotation=positions"], ["method=tome", "rotation=sizes"]])
def test_every_method_reduces_mamba3_a_padded_batch_as_each_sequence_alone(mamba3, overrides):
    reduces_a_padded_batch_as_each_row_alone(*mamba3, overrides, [48, 29], 48, seed=1)


def test_the_budget_is_met_and_removal_restores_the_dense_model(mamba3):
    model, info = mamba3
    ids = torch.randint(1, 4000, (1, 400), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(ids).logits
    reducer = reduction.from_config(model, compose_config(["method=ours", "ratio=0.2"]), info)
    reducer(ids)
    assert reducer.describe()["observed"]["achieved_ratio"] == pytest.approx(0.2, abs=0.01)
    reducer.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_what_mamba3_does_not_support_is_a_clear_error(mamba3):
    model, info = mamba3
    with pytest.raises(ConfigError, match="Mamba-3's"):
        reduction.from_config(model, compose_config(["method=decimamba", "ratio=0.3"]), info)
    with pytest.raises(ConfigError, match="unknown ssm_cfg.layer 'Mamba4'"):
        mamba_ssm.info_from_config(dict(TINY[3], ssm_cfg=dict(layer="Mamba4")))


def test_keeping_each_rows_first_tokens_gives_the_prefix_logits(mamba3):
    """What a removal means for the rotation and the trapezoid, at its simplest: cutting a sequence to its first
    tokens (`late`) leaves every kept token's angles and previous token as they were, so the kept logits are the
    dense model's on that prefix."""
    model, info = mamba3
    ids = torch.randint(1, 4000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
    reducer = reduction.from_config(model, compose_config(["method=late", "ratio=0.3"]), info)
    try:
        out = reducer(ids)
    finally:
        reducer.remove()
    kept = out.logits.shape[1]
    assert kept < 48 and torch.equal(out.positions, torch.arange(kept).expand(2, kept))
    torch.testing.assert_close(out.logits, dense[:, :kept], atol=1e-5, rtol=1e-5)


def trap_columns(model, layers, record):
    """Hooks, registered after the reducer's, that hand `record(index, trap)` the trap columns each Mamba-3 mixer's
    in_proj output ends with (before the rope angles)."""
    def hook(index, mixer, module, args, out):
        end = out.shape[-1] - mixer.num_rope_angles
        record(index, out[..., end - mixer.nheads:end].clone())

    return [model.backbone.layers[i].mixer.in_proj.register_forward_hook(partial(hook, i, model.backbone.layers[i].mixer))
            for i in layers]


def test_trapezoid_none_drops_the_neighbour_term_exactly_after_a_removal(mamba3):
    """trapezoid=none: a kept token whose original predecessor was removed takes the step of the token alone (λ = 1);
    every other token, and every layer up to the first reduction, is as with trapezoid=kept."""
    model, info = mamba3
    ids = torch.randint(1, 4000, (2, 48), generator=torch.Generator().manual_seed(2))
    runs = {}
    for trapezoid in ("kept", "none"):
        reducer = reduction.from_config(model, compose_config(["method=strided", "ratio=0.3", "layers=[4]",
                                                               f"trapezoid={trapezoid}"]), info)
        seen = {}
        handles = trap_columns(model, range(12), lambda index, trap: seen.setdefault(index, trap))
        try:
            out = reducer(ids)
        finally:
            for handle in handles:
                handle.remove()
            reducer.remove()
        runs[trapezoid] = out, seen
    (kept, seen_kept), (none, seen_none) = runs["kept"], runs["none"]
    assert torch.equal(kept.positions, none.positions) and not torch.allclose(kept.logits, none.logits)
    for index in range(5):  # up to and including the reduction layer (4): nothing removed yet
        assert torch.equal(seen_kept[index], seen_none[index])
    before = torch.cat([torch.full_like(kept.positions[:, :1], -1), kept.positions[:, :-1]], 1)
    gap = kept.positions != before + 1  # the original predecessor is not the previous kept token
    assert gap.any() and not gap.all()
    assert (seen_none[5][gap] == 1e4).all() and torch.sigmoid(torch.tensor(1e4)) == 1.0
    assert torch.equal(seen_none[5][~gap], seen_kept[5][~gap])  # layer 5's input is the same in both runs


def test_trapezoid_none_changes_nothing_without_a_gap_and_is_refused_off_mamba3(mamba3):
    model, info = mamba3
    ids = torch.randint(1, 4000, (2, 48), generator=torch.Generator().manual_seed(3))
    outs = []
    for trapezoid in ("kept", "none"):  # `late` keeps each row's first tokens: every predecessor stays
        reducer = reduction.from_config(model, compose_config(["method=late", "ratio=0.3", f"trapezoid={trapezoid}"]),
                                        info)
        try:
            outs.append(reducer(ids).logits)
        finally:
            reducer.remove()
    assert torch.equal(outs[0], outs[1])
    mamba2 = tiny_model(2)
    with pytest.raises(ConfigError, match="Mamba-3's trapezoidal step"):
        reduction.from_config(mamba2, compose_config(["method=ours", "ratio=0.3", "trapezoid=none"]),
                              mamba_ssm.model_info(mamba2))
    with pytest.raises(ConfigError, match="unknown trapezoid"):
        reduction.check_config(compose_config(["method=ours", "ratio=0.3", "trapezoid=euler"]), dict(TINY[2]))


def reduce_once(model, info, overrides, ids, **kwargs):
    reducer = reduction.from_config(model, compose_config(overrides), info)
    try:
        return reducer(ids, **kwargs)
    finally:
        reducer.remove()


@pytest.mark.parametrize("rotation", ["positions", "sizes"])
def test_rotation_factors_are_the_tokens_each_kept_token_stands_for_after_the_first_reduction(mamba3, monkeypatch,
                                                                                             rotation):
    """rotation=positions | sizes: every Mamba-3 mixer after the first reduction layer multiplies a kept token's
    angle step by the original positions since the previous kept token (positions) or the tokens merged into it
    (sizes); the mixers up to it, and every forward after the reducer's, take none."""
    model, info = mamba3
    seen = []
    step_factors = mamba3_reference.angle_dt

    def record(dt):
        factors = mamba3_reference.ANGLE_STEP_SCALE.get()
        seen.append(None if factors is None else factors.clone())
        return step_factors(dt)

    monkeypatch.setattr(mamba3_reference, "angle_dt", record)
    ids = torch.randint(1, 4000, (2, 48), generator=torch.Generator().manual_seed(5))
    out = reduce_once(model, info, ["method=ours", "ratio=0.3", "layers=[4]", f"rotation={rotation}"], ids,
                         trace=True)
    assert len(seen) == 12 and all(factors is None for factors in seen[:5])
    kept = out.positions
    if rotation == "positions":
        expected = torch.diff(kept, dim=1, prepend=torch.full_like(kept[:, :1], -1)).float()
    else:  # one reduction layer: each token merged in the hidden stream adds one to its receiver's size
        entry = out.trace[0]
        into = torch.where(entry["hidden"] == MERGED, entry["into"], -1)
        expected = (1 + (into[:, :, None] == kept[:, None, :]).sum(1)).float()
    for factors in seen[5:]:
        assert torch.equal(factors, expected)
    assert (expected > 1).any() and mamba3_reference.ANGLE_STEP_SCALE.get() is None


def test_rotation_changes_nothing_where_no_kept_token_stands_for_another(mamba3):
    """Keeping each row's first tokens (`late`) leaves every gap and size at 1: the kept rotation, bit for bit; a
    method that only prunes has sizes of 1 everywhere, so rotation=sizes is its kept rotation, positions is not."""
    model, info = mamba3
    ids = torch.randint(1, 4000, (2, 48), generator=torch.Generator().manual_seed(6))
    late = [reduce_once(model, info, ["method=late", "ratio=0.3", f"rotation={r}"], ids).logits
            for r in ("kept", "positions", "sizes")]
    assert torch.equal(late[0], late[1]) and torch.equal(late[0], late[2])
    evit = {r: reduce_once(model, info, ["method=evit", "ratio=0.3", f"rotation={r}"], ids).logits
            for r in ("kept", "positions", "sizes")}
    assert torch.equal(evit["kept"], evit["sizes"]) and not torch.allclose(evit["kept"], evit["positions"])


def test_rotation_is_refused_off_mamba3_and_for_unknown_rules():
    mamba2 = tiny_model(2)
    with pytest.raises(ConfigError, match="Mamba-3's data-dependent rotation"):
        reduction.from_config(mamba2, compose_config(["method=ours", "ratio=0.3", "rotation=positions"]),
                              mamba_ssm.model_info(mamba2))
    with pytest.raises(ConfigError, match="unknown rotation"):
        reduction.check_config(compose_config(["method=ours", "ratio=0.3", "rotation=carried"]), dict(TINY[3]))


def test_a_reduced_prefill_with_the_rotation_carried_decodes_from_its_last_logits(mamba3):
    """Generation with rotation=positions: the prefill (its last position kept) gives the scored forward's last
    logits, and decoding runs on from its cache with no factor left set."""
    model, info = mamba3
    ids = torch.randint(1, 4000, (2, 40), generator=torch.Generator().manual_seed(7))
    reducer = reduction.from_config(model, compose_config(["method=ours", "ratio=0.3", "rotation=positions"]), info)
    try:
        generated = generation.generate(model, ids, 3, reducer=reducer)
        last = torch.zeros(ids.shape, dtype=torch.bool)
        last[:, -1] = True
        traced = reducer(ids, protect=last)
    finally:
        reducer.remove()
    first = traced.logits[torch.arange(2), traced.counts - 1].argmax(-1)
    assert generated.shape == (2, 43) and torch.equal(generated[:, 40], first)
    assert mamba3_reference.ANGLE_STEP_SCALE.get() is None


def test_decoding_from_the_prefills_states_equals_running_the_whole_sequence(mamba3):
    """A prefill that fills the cache (the layer's final angles, state, last k and v) and steps from it
    (mamba3_reference.step, in place of mamba-ssm's CuTe kernel) give each new token the logits the full forward
    gives it: the trapezoid's previous token and the rotation carry over the cache boundary."""
    steps_continue_the_prefill(mamba3[0], prompt=21, steps=5, seed=3)
