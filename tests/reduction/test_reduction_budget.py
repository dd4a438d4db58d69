"""ratio -> keep rate -> FLOPs, the default layers, the integer schedules."""
import math

import pytest
import torch

from ssmcompress.config import ConfigError
from ssmcompress.reduction import budget
from reduction_fixtures import one_thread  # noqa: F401

MAMBA2_2_7B = dict(generation=2, d_model=2560, n_layer=64, vocab_size=50288, d_inner=5120, d_state=128, d_conv=4,
                   nheads=80, headdim=64, ngroups=1, chunk_size=256)
MAMBA_1_4B = dict(generation=1, d_model=2048, n_layer=48, vocab_size=50280, d_inner=4096, d_state=16, d_conv=4,
                  dt_rank=128)
TINY = dict(generation=2, d_model=128, n_layer=12, vocab_size=4096, d_inner=256, d_state=64, d_conv=4, nheads=8,
            headdim=32, ngroups=1, chunk_size=64)


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
