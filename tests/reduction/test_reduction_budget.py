"""ratio -> keep rate -> FLOPs, the default layers, the integer schedules."""
import itertools
import math

import pytest
import torch

from ssmcompress import reduction
from ssmcompress.config import ConfigError
from ssmcompress.reduction import budget
from reduction_fixtures import ALL_METHODS, compose, mamba2, one_thread  # noqa: F401

MAMBA2_2_7B = dict(mamba_version=2, d_model=2560, n_layer=64, vocab_size=50288, d_inner=5120, d_state=128, d_conv=4,
                   nheads=80, headdim=64, ngroups=1, chunk_size=256)
MAMBA_1_4B = dict(mamba_version=1, d_model=2048, n_layer=48, vocab_size=50280, d_inner=4096, d_state=16, d_conv=4,
                  dt_rank=128)
TINY = dict(mamba_version=2, d_model=128, n_layer=12, vocab_size=4096, d_inner=256, d_state=64, d_conv=4, nheads=8,
            headdim=32, ngroups=1, chunk_size=64)


# TINY with attention at layers 4 and 9 (as the bundled hybrid): a token's cost grows with the length
HYBRID = dict(TINY, layers="MMMM*MMMM*MM", attn_heads=4, attn_kv_heads=4, attn_head_dim=32, ffn="-" * 12)


def items(info: dict) -> tuple:
    return tuple(sorted(info.items()))


@pytest.mark.parametrize("ratio,layers", [(0.1, (2, 5, 8)), (0.3, (1, 3, 6, 7, 10)), (0.45, (0, 2))])
def test_keep_rates_per_length_solved_together_equal_each_solved_alone(ratio, layers):
    lengths = [1, 2, 3, 7, 63, 64, 65, 200, 2048]
    together = budget.keep_rates_at(items(HYBRID), layers, ratio, 0.5, lengths)
    for n, rate in zip(lengths, together.tolist()):
        assert rate == budget.keep_rates_at(items(HYBRID), layers, ratio, 0.5, [n])[0]
        try:
            alone = budget.solve_keep_rate(HYBRID, list(layers), ratio, 0.5, n)
        except ConfigError:  # the ratio is out of reach at n: the method's limit
            assert rate == 0.5
        else:
            # the ratio (up to the jump a scan chunk's ceiling makes where a layer's count crosses it)
            assert rate == alone and abs(budget.flops_ratio(HYBRID, list(layers), rate, n) - ratio) < 1e-3
    # attention makes long rows' tokens dearer: the same ratio keeps more of them
    assert together[-1] > together[-3]


def test_default_layers():
    assert budget.default_layers(64) == [12, 17, 22, 27, 32, 37, 42]
    assert budget.default_layers(48) == [10, 15, 20, 25, 30, 35]
    assert budget.default_layers(12) == [2, 3, 4, 5, 6, 7, 8]  # the bundled tiny models
    assert budget.default_layers(24) == [4, 6, 8, 10, 12, 14, 16]
    assert budget.default_layers(4) == [1, 2, 3]


@pytest.mark.parametrize("info", [MAMBA2_2_7B, MAMBA_1_4B, TINY], ids=["mamba2-2.7b", "mamba-1.4b", "tiny"])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_ratio_keep_rate_flops_round_trip(info, ratio):
    layers = budget.default_layers(info["n_layer"])
    keep = budget.solve_keep_rate(info, layers, ratio, 0.5, 2048)
    assert 0.5 < keep < 1
    assert budget.flops_ratio(info, layers, keep, 2048) == pytest.approx(ratio, abs=1e-9)
    for n in (300, 2048):  # integer token counts per row, as the reducer applies them
        counts = budget.predicted_counts("cumulative", keep, n, len(layers), 0.5)
        dense, reduced, _ = budget.row_flops(tuple(sorted(info.items())), tuple(layers), n, tuple(counts), "none")
        assert 1 - reduced / dense == pytest.approx(ratio, abs=0.01)


@pytest.mark.parametrize("n_layer,reduce_ratio,fraction", [
    (64, 0.9729, 0.10), (64, 0.9415, 0.20), (64, 0.9043, 0.30), (48, 0.9651, 0.10), (48, 0.9248, 0.20),
    (48, 0.8768, 0.30)])
def test_paper_reduce_ratio_table_is_the_codes_token_fraction(n_layer, reduce_ratio, fraction):
    # the official code's "Model Sparsity" (src/pom/mamba_model.py) = 1 - mean fraction of tokens entering each layer
    layers = budget.default_layers(n_layer)
    assert budget.token_fraction(layers, reduce_ratio, n_layer) == pytest.approx(fraction, abs=0.001)


def test_unreachable_ratio_says_what_is_possible():
    with pytest.raises(ConfigError, match=r"at most 0\.\d+ of the forward FLOPs"):
        budget.solve_keep_rate(TINY, [8], 0.3, 0.5, 2048)
    with pytest.raises(ConfigError, match="at most half"):
        budget.solve_keep_rate(TINY, budget.default_layers(12), 0.9, 0.5, 2048)
    layers = budget.default_layers(12)
    half = budget.flops_ratio(TINY, layers, 0.5, 2048)  # the most a bipartite method can remove
    assert budget.solve_keep_rate(TINY, layers, half + 0.05, 0.0, 2048) < 0.5  # EViT can go further


def test_removal_rules():
    # ceil: the official code's num_keep = math.ceil(N * reduce_ratio), in the same float arithmetic
    n = torch.arange(1, 400)
    removed = budget.removals("ceil", 0.905, n, n, 1)
    assert removed.tolist() == [k - math.ceil(k * 0.905) for k in range(1, 400)]
    # cumulative: after the j-th layer round(n0 * rho^j) remain, whatever the earlier rounding did
    counts = budget.predicted_counts("cumulative", 0.93, 101, 7, 0.5)
    assert counts == [math.floor(101 * 0.93 ** j + 0.5) for j in range(1, 8)]
    # a method that removes at most half per layer is capped
    assert budget.predicted_counts("cumulative", 0.2, 10, 2, 0.5) == [5, 3]


def test_row_tokens_follow_the_reduction_layers():
    entering, final = budget.row_tokens(10, (8, 6), [1, 3], 5)
    assert entering == [10, 10, 8, 8, 6] and final == 6
    entering, final = budget.row_tokens(10, (7,), [4], 5)  # after the last block: only the lm_head is shorter
    assert entering == [10] * 5 and final == 7


# ------------------------------------------------------------------------------------------------ schedule=chunk

TINY16 = dict(TINY, d_model=64, d_inner=128, d_state=16, headdim=16, chunk_size=16)  # tests/conftest.py's Mamba-2


def achieved(info, layers, n0, counts):
    dense, reduced, _ = budget.row_flops(tuple(sorted(info.items())), tuple(layers), n0, tuple(counts), "none")
    return 1 - reduced / dense


def valid_schedule(counts, n0, chunk, min_keep_rate):
    previous = n0
    for count in counts:
        if count > previous or count < max(math.ceil(previous * min_keep_rate), 1):
            return False
        if count != n0 and count % chunk:
            return False
        previous = count
    return True


def brute_force(info, layers, n0, ratio, min_keep_rate):
    """The smallest achieved ratio >= `ratio` over every valid chunk schedule."""
    chunk = budget.count_multiple(info)
    values = sorted({n0, *range(chunk, n0 + 1, chunk)}, reverse=True)
    best = None
    for combo in itertools.combinations_with_replacement(values, len(layers)):
        counts = sorted(combo, reverse=True)
        if valid_schedule(counts, n0, chunk, min_keep_rate):
            reached = achieved(info, layers, n0, counts)
            if reached >= ratio and (best is None or reached < best):
                best = reached
    return best


@pytest.mark.parametrize("layers,n0,ratio,min_keep_rate", [
    ((2, 3, 4, 5, 6, 7, 8), 100, 0.2, 0.5), ((2, 3, 4, 5, 6, 7, 8), 100, 0.3, 0.0), ((1, 5, 9), 87, 0.1, 0.5),
    ((0, 11), 64, 0.3, 0.4286), ((3, 4, 6, 10), 120, 0.35, 0.5), ((2, 3, 4, 5, 6, 7, 8), 37, 0.1, 0.5)])
def test_chunk_counts_are_the_closest_chunk_multiple_schedule_that_reaches_the_ratio(layers, n0, ratio,
                                                                                    min_keep_rate):
    counts = budget.chunk_counts(tuple(sorted(TINY16.items())), layers, n0, ratio, min_keep_rate)
    expected = brute_force(TINY16, layers, n0, ratio, min_keep_rate)
    assert counts is not None and expected is not None
    assert valid_schedule(counts, n0, 16, min_keep_rate)  # chunk multiples, non-increasing, within the limit
    assert achieved(TINY16, layers, n0, counts) == expected >= ratio


MAMBA1_TINY = dict(mamba_version=1, d_model=64, n_layer=12, vocab_size=4096, d_inner=128, d_state=8, d_conv=4, dt_rank=4)


@pytest.mark.parametrize("layers,n0,ratio", [((2, 3, 4, 5, 6, 7, 8), 100, 0.2), ((1, 5, 9), 87, 0.1),
                                             ((2, 3, 4, 5, 6, 7, 8), 37, 0.3)])
def test_mamba1_chunk_counts_are_multiples_of_16(layers, n0, ratio):
    assert budget.count_multiple(MAMBA1_TINY) == 16 and budget.count_multiple(TINY16) == 16
    counts = budget.chunk_counts(tuple(sorted(MAMBA1_TINY.items())), layers, n0, ratio, 0.5)
    assert counts is not None and valid_schedule(counts, n0, 16, 0.5)
    assert achieved(MAMBA1_TINY, layers, n0, counts) == brute_force(MAMBA1_TINY, layers, n0, ratio, 0.5) >= ratio


def test_chunk_counts_at_the_reference_length_of_mamba2_2_7b():
    layers = budget.default_layers(64)
    counts = budget.chunk_counts(tuple(sorted(MAMBA2_2_7B.items())), tuple(layers), 2048, 0.3, 0.5)
    assert valid_schedule(counts, 2048, 256, 0.5)
    # one such schedule, measured on an H200 (1.407x against the smooth counts' 1.336x), removes 0.3004
    known = achieved(MAMBA2_2_7B, layers, 2048, (2048, 2048, 1792, 1024, 1024, 1024, 1024))
    assert 0.3 <= achieved(MAMBA2_2_7B, layers, 2048, counts) <= known < 0.3005


def test_chunk_counts_none_where_no_chunk_schedule_reaches_the_ratio():
    info, layers = tuple(sorted(TINY16.items())), (2, 3, 4, 5, 6, 7, 8)
    assert budget.chunk_counts(info, layers, 15, 0.1, 0.5) is None  # under one chunk
    most = (32, 16, 16, 16, 16, 16, 16)  # of 40, half at most per layer: 20 rounds up to 32, then 16
    assert budget.chunk_counts(info, layers, 40, achieved(TINY16, layers, 40, most), 0.5) == most
    assert budget.chunk_counts(info, layers, 40, achieved(TINY16, layers, 40, most) + 1e-6, 0.5) is None
    assert budget.chunk_counts(info, (), 100, 0.1, 0.5) is None


def test_removals_follow_the_chunk_table_and_the_rule_where_it_has_none():
    n0 = torch.tensor([100, 100])
    table = torch.tensor([[96, 80], [-1, -1]])
    smooth = budget.removals("cumulative", 0.9, n0, n0, 1)
    assert budget.removals("cumulative", 0.9, n0, n0, 1, table).tolist() == [4, int(smooth[1])]
    current = torch.tensor([97, 90])
    assert budget.removals("ceil", 0.9, n0, current, 2, table).tolist() == [17, 90 - math.ceil(90 * 0.9)]


@pytest.mark.parametrize("method", ALL_METHODS + ["ceiling"])
def test_every_method_runs_with_the_chunk_schedule(mamba2, method):
    """Unprotected rows keep their chunk counts at every reduction layer; a row under one chunk (16 tokens) keeps
    the smooth counts and is counted as a fallback."""
    model, info = mamba2
    extra = ["benchmark=efficiency"] if method == "ceiling" else []
    reducer = reduction.from_config(model, compose(method, 0.3, "schedule=chunk", *extra), info)
    lengths = torch.tensor([100, 61, 12])
    ids = torch.randint(1, 4000, (3, 100), generator=torch.Generator().manual_seed(8))
    try:
        out = reducer(ids, lengths=lengths, trace=True)
        described = reducer.describe()
    finally:
        reducer.remove()
    kept = torch.stack([(e["valid"] & (e["hidden"] == 0)).sum(1) for e in out.trace], 1).tolist()
    setup = reducer.setup
    for row, n in enumerate(lengths.tolist()):
        counts = reducer.chunk_counts(n)
        if n < 16:
            assert counts is None
            counts = budget.predicted_counts(setup.rule, setup.keep_rate, n, len(setup.layers), setup.min_keep_rate)
        else:
            assert all(c == n or c % 16 == 0 for c in counts)
        assert kept[row] == list(counts)
    assert described["schedule"] == "chunk" and described["observed"]["chunk_fallback_rows"] == 1
    assert described["nominal"]["chunk_counts"] == list(reducer.chunk_counts(2048))
    assert described["nominal"]["chunk_flops_ratio"] >= 0.3


def test_the_smooth_schedule_records_no_chunk_fields(mamba2):
    model, info = mamba2
    reducer = reduction.from_config(model, compose("ours", 0.3), info)
    reducer(torch.randint(1, 4000, (1, 40)))
    described = reducer.describe()
    reducer.remove()
    assert described["schedule"] == "smooth" and reducer.chunk_counts(40) is None
    assert "chunk_counts" not in described["nominal"] and "chunk_fallback_rows" not in described["observed"]
