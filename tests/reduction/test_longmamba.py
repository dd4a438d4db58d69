"""LongMamba's Δ filter (reduction.longmamba, method=longmamba): its calibration statistics and its filter against
the authors' code, and the filter on models of both hosts.

longmamba_reference.json holds what the authors' code (GATECH-EIC/LongMamba at 5da3e17: load_align_target.py's
calibration loop and aggregation, mamba_ssm/modules/mamba2.py's `dt_thre` branch of the forward) computed on the
inputs stored beside it: three 200-token calibration windows of 4 heads (their target lengths scaled by 200/2000),
clamp_top 0.15, both aggregates, and the kept (token, head) pairs of the forward's filter at five lengths (c = 0.05,
b = 1, their `int(seqlen/1e3) > 2` scaled to 1.5 windows). The repository holds no code of theirs (it has no
license), only these numbers."""
import json
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_DIR, compose_config, tiny_model
from ssmcompress import convert, generation, models, reduction
from ssmcompress.config import ASSETS
from ssmcompress.errors import ConfigError
from ssmcompress.hosts import mamba_ssm
from ssmcompress.hosts import transformers as hf
from ssmcompress.reduction import longmamba

REFERENCE = json.loads((Path(__file__).parent / "longmamba_reference.json").read_text())


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Every test here runs on one thread (conftest.single_thread)."""


def reference_calibration(how: str) -> longmamba.Calibration:
    windows = torch.tensor(REFERENCE["windows"])  # (windows, length, heads)
    A = torch.tensor(REFERENCE["A"])
    lengths = longmamba.target_lengths(REFERENCE["window"])
    stats = [longmamba.window_statistics(w.T, A, REFERENCE["clamp_top"], lengths) for w in windows]
    return longmamba.Calibration((0,), REFERENCE["window"], lengths,
                                 longmamba.aggregate([p for p, _ in stats], how)[None],
                                 longmamba.aggregate([t for _, t in stats], how)[None])


def test_the_target_lengths_are_the_authors_scaled_to_the_window():
    assert list(longmamba.target_lengths(REFERENCE["window"])) == REFERENCE["lengths"]
    assert longmamba.target_lengths(2000)[:3] == (1000, 2000, 3000)


@pytest.mark.parametrize("how", ["avg", "max"])
def test_calibration_statistics_equal_the_authors_code(how):
    calibration = reference_calibration(how)
    expected = REFERENCE[how]
    torch.testing.assert_close(calibration.decay_product[0], torch.tensor(expected["decay_product"]),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(calibration.thresholds[0], torch.tensor(expected["thresholds"]), rtol=1e-5, atol=1e-6)


def test_the_filter_keeps_the_tokens_the_authors_code_keeps():
    calibration = reference_calibration("avg")
    stream = torch.cat([torch.tensor(w) for w in REFERENCE["windows"]])  # the runs' Δ: the windows one after another
    min_length = 3 * REFERENCE["window"] // 2
    filtered = 0
    for run in REFERENCE["runs"]:
        n = run["length"]
        limits = longmamba.row_thresholds(calibration, [n], REFERENCE["channel_threshold"], REFERENCE["scale"],
                                          min_length)[:, 0]
        kept = longmamba.keep_mask(stream[None, :n], limits)[0]
        expected = torch.tensor([[c == "1" for c in head] for head in run["kept"]]).T
        assert torch.equal(kept, expected), n
        filtered += int((~kept).sum())
    assert filtered > 1000, "the reference filters nothing: a vacuous check"


def test_global_heads_and_short_rows_keep_every_token():
    calibration = reference_calibration("avg")
    limits = longmamba.row_thresholds(calibration, [10, 400], 0.05, 1.0, 300)
    glob = calibration.decay_product[0] > 0.05
    assert glob.any() and not glob.all()
    assert (limits[0] == longmamba.KEEP_ALL).all()  # a row shorter than min_length
    assert (limits[1, 0, ~glob] == longmamba.KEEP_ALL).all() and (limits[1, 0, glob] > 0).all()


# ---------------------------------------------------------------------------------------------------- on models

def long_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 4000, (batch, length), generator=torch.Generator().manual_seed(seed))


def filter_config(*extra):
    # windows of 24 tokens: the filter acts from 36 tokens; c = 0.5 makes some heads of a random model global
    return compose_config(["method=longmamba", "method.calibration.length=24", "method.calibration.samples=4",
                           "method.channel_threshold=0.5", "method.scale=3.0", *extra])


@pytest.fixture(scope="module")
def model():
    net = tiny_model(2, seed=2, n_layer=4)
    return net, mamba_ssm.model_info(net)


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(str(TOKENIZER_DIR))


def test_the_filter_zeroes_delta_exactly_where_it_drops_and_only_on_long_rows(model, tokenizer):
    net, info = model
    reducer = reduction.from_config(net, filter_config(), info, tokenizer)
    seen = {}

    def record(index, module, args, out):  # registered after the filter's own hook: sees the filtered columns
        mixer = net.backbone.layers[index].mixer
        seen[index] = torch.nn.functional.softplus(out[..., -mixer.nheads:] + mixer.dt_bias)

    handles = [layer.mixer.in_proj.register_forward_hook(partial(record, index))
               for index, layer in enumerate(net.backbone.layers)]
    try:
        ids = long_ids(1, 60)
        with torch.no_grad():
            dense = net(ids).logits
            short = net(ids[:, :30]).logits
        reduced = reducer(ids)
        assert not torch.equal(reduced.logits, dense), "no Δ was dropped: a vacuous check"
        global_heads = reducer.describe()["delta_filter"]["global_heads"]
        dropped = {index: delta == 0 for index, delta in seen.items()}
        for index, heads in enumerate(global_heads):
            assert dropped[index].any(1).sum() == heads  # only the global heads drop tokens, and each drops some
        observed = reducer.describe()["observed"]
        zeros = sum(int(d.sum()) for d in dropped.values())
        assert zeros > 0 and observed["filter_dropped_share"] == zeros / (60 * 4 * net.backbone.layers[0].mixer.nheads)
        assert observed["achieved_ratio"] == 0.0
        assert torch.equal(reducer(ids[:, :30]).logits, short)  # below min_length (36): the dense model, bit for bit
        assert reducer.describe()["observed"]["filter_dropped_share"] == zeros / ((60 + 30) * 4 * 8)
    finally:
        for handle in handles:
            handle.remove()
        reducer.remove()
    with torch.no_grad():
        assert torch.equal(net(ids).logits, dense)  # removed: dense again


def test_each_row_is_filtered_by_its_own_length_in_a_padded_batch(model, tokenizer):
    net, info = model
    reducer = reduction.from_config(net, filter_config(), info, tokenizer)
    try:
        ids = long_ids(2, 60, seed=3)
        ids[1, 30:] = 0
        both = reducer(ids, lengths=torch.tensor([60, 30]))
        alone = [reducer(ids[:1]), reducer(ids[1:, :30])]
        torch.testing.assert_close(both.logits[0], alone[0].logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both.logits[1, :30], alone[1].logits[0], atol=1e-5, rtol=1e-5)
    finally:
        reducer.remove()


def test_the_same_filter_on_the_model_converted_to_transformers_gives_the_same_logits(model, tokenizer):
    net, info = model
    twin = convert.to_transformers(net)
    ids = long_ids(2, 60, seed=4)
    out = {}
    for name, host_model, details in (("mamba_ssm", net, info), ("transformers", twin, hf.model_info(twin))):
        reducer = reduction.from_config(host_model, filter_config(), details, tokenizer)
        try:
            out[name] = (reducer(ids).logits, reducer.setup.calibration)
        finally:
            reducer.remove()
    torch.testing.assert_close(out["mamba_ssm"][1].thresholds, out["transformers"][1].thresholds, atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(out["mamba_ssm"][0], out["transformers"][0], atol=1e-4, rtol=1e-4)


def test_a_generation_filters_its_prefill_as_a_forward_and_short_prompts_as_dense(model, tokenizer):
    # the prefill runs the filter (its first new token is the filtered forward's greedy choice); decoding steps pass
    # one token per mixer call and are not filtered, as in the authors' code
    net, info = model
    reducer = reduction.from_config(net, filter_config(), info, tokenizer)
    try:
        ids = long_ids(2, 60, seed=5)
        filtered = reducer(ids).logits[:, -1].argmax(-1)
        before = reducer.totals["filter_dropped"]
        out = generation.generate(net, ids, 4, reducer=reducer)
        assert torch.equal(out[:, 60], filtered)
        assert reducer.totals["filter_dropped"] == 2 * before  # the prefill dropped what the forward did, no more
        short = ids[:, :30]
        assert torch.equal(generation.generate(net, short, 4, reducer=reducer), generation.generate(net, short, 4))
    finally:
        reducer.remove()


@pytest.mark.parametrize("overrides, message", [
    (["ratio=0.3"], "removes no token"),
    (["model=mamba-tiny"], "Mamba-2"),
    (["model.train_length=null"], "model.train_length or method.calibration.length"),
    (["method.clamp_top=0"], "clamp_top"),
    (["method.aggregate=median"], "aggregate"),
    (["method.calibration.source=pile"], "calibration source"),
])
def test_bad_settings_are_one_line_errors_before_any_work(overrides, message):
    cfg = compose_config(["method=longmamba", *overrides])
    with pytest.raises(ConfigError, match=message):
        reduction.check_config(cfg, dict(cfg.model.config))


def test_a_mixer_that_clamps_delta_from_below_is_refused_before_the_calibration(tokenizer, monkeypatch):
    # transformers' NemotronH (the bundled hybrid) clamps Δ at time_step_min after the softplus: no Δ of it can be 0
    model = hf.load_model(str(ASSETS / "models" / "hybrid-tiny"), "cpu", "float32")
    monkeypatch.setattr(reduction.calibration, "windows", lambda *args: pytest.fail("calibrated before refusing"))
    with pytest.raises(ConfigError, match="clamps Δ to at least 0.001"):
        reduction.from_config(model, filter_config(), hf.model_info(model), tokenizer)
