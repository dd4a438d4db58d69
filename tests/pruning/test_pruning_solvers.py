"""The four pruners on tiny matrices: hand-computed results, the multi-removal closed form against masked least
squares, N:M patterns, and the properties that tie them together."""
import itertools

import pytest
import torch

from ssmcompress.pruning import PRUNERS, magnitude, multi, sparsegpt, wanda
from ssmcompress.pruning.hessian import LayerInputs, inverse_factor
from ssmcompress.pruning.masks import parse_pattern
from pruning_fixtures import one_thread, output_loss, random_layer, zeros_per_group  # noqa: F401

HALF = parse_pattern(0.5)
# three tokens with Σ x xᵀ = [[2, 1], [1, 2]]: H ∝ G, G⁻¹ = [[2, -1], [-1, 2]] / 3
TWO_INPUTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)


def masked_least_squares(weight, x, mask, damping_matrix=None):
    """Each row's kept weights refitted to reproduce W X: min ||w X - ŵ_R X_R||² (+ δw D δwᵀ), ŵ_Q = 0."""
    refit = torch.zeros_like(weight)
    for r in range(weight.shape[0]):
        keep = ~mask[r]
        a, b = x[:, keep], x @ weight[r]
        if damping_matrix is not None:  # + ||sqrt(D) (ŵ - w)||²: the damping term δw D δwᵀ
            root = damping_matrix.sqrt()
            a = torch.cat([a, root[:, keep]])
            b = torch.cat([b, root @ weight[r]])
        refit[r, keep] = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    return refit


# ---------------------------------------------------------------- hand-computed

def test_magnitude_by_hand():
    weight = torch.tensor([[1.0, -2.0, 3.0, -5.0], [0.4, 3.0, -2.5, 8.0]])
    # unstructured: the 4 smallest |W| of the whole matrix (0.4, 1, 2, 2.5)
    assert magnitude.prune(weight, None, HALF).tolist() == [[0, 0, 3, -5], [0, 3, 0, 8]]
    # 2:4: the 2 smallest of each row's group
    assert magnitude.prune(weight, None, parse_pattern("2:4")).tolist() == [[0, 0, 3, -5], [0, 3, 0, 8]]
    assert magnitude.prune(weight, None, parse_pattern("1:4")).tolist() == [[0, -2, 3, -5], [0, 3, -2.5, 8]]


def test_wanda_by_hand():
    weight = torch.tensor([[1.0, -2.0, 3.0, -5.0], [0.4, 3.0, -2.5, 8.0]])
    inputs = LayerInputs.of(torch.diag(torch.tensor([4.0, 1.0, 1.0, 0.5])))  # ||X_j|| = 4, 1, 1, 0.5
    # scores |W|·||X||: row 0 = 4, 2, 3, 2.5 -> remove columns 1, 3; row 1 = 1.6, 3, 2.5, 4 -> columns 0, 2
    assert wanda.prune(weight, inputs, HALF).tolist() == [[1, 0, 3, 0], [0, 3, 0, 8]]
    # per row, unlike magnitude: row 0 keeps its 1.0 (large input) and loses its -5.0 (small input)
    assert wanda.prune(weight, inputs, parse_pattern("1:4")).tolist() == [[1, 0, 3, -5], [0, 3, -2.5, 8]]


def test_sparsegpt_by_hand():
    weight = torch.tensor([[1.0, 1.2], [2.0, 0.5]], dtype=torch.float64)
    inputs = LayerInputs.of(TWO_INPUTS)
    # U = chol_upper(G⁻¹): U_00² = [G⁻¹]_00 = 2/3; U_11² = 1/G_11 = 1/2 (column 0 eliminated).
    # saliencies w²/U_jj²: row 0: 1.5, 2.88; row 1: 6, 0.5 -> the 2 lowest of the 2x2 slab: (0,0) and (1,1).
    # row 0 removes column 0: err = w0/U_00 and column 1 moves by -err·U_01 = w0·G_01/G_11 = +0.5 -> 1.7;
    # row 1 removes column 1, the last one: nothing to its right compensates, column 0 stays 2.0.
    pruned = sparsegpt.prune(weight, inputs, HALF, damping=0.0)
    assert torch.allclose(pruned, torch.tensor([[0.0, 1.7], [2.0, 0.0]], dtype=torch.float64), atol=1e-12)


def test_multi_by_hand_compensates_on_both_sides():
    weight = torch.tensor([[1.0, 1.2], [2.0, 0.5]], dtype=torch.float64)
    inputs = LayerInputs.of(TWO_INPUTS)
    # per row, SRP scores w²/[G⁻¹]_jj: row 0: 1.5, 2.16 -> column 0; row 1: 6, 0.375 -> column 1.
    # joint update ŵ_R = w_R + w_Q G_QR / G_RR: row 0: 1.2 + 1·½ = 1.7; row 1: 2 + 0.5·½ = 2.25 (left side too)
    pruned = multi.prune(weight, inputs, HALF, damping=0.0)
    assert torch.allclose(pruned, torch.tensor([[0.0, 1.7], [2.25, 0.0]], dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------- the multi-removal closed form

CASES = [(sparsity, options) for sparsity in (0.5, 0.7, "2:4")
         for options in (dict(blocksize=None), dict(blocksize=4), dict(blocksize=None, refit=False))]


@pytest.mark.parametrize("sparsity,options", CASES + [(0.5, dict(blocksize=5)), (0.7, dict(blocksize=5))])
def test_multi_equals_masked_least_squares(sparsity, options):
    weight, x, inputs = random_layer(rows=5, columns=16)
    pruned = multi.prune(weight, inputs, parse_pattern(sparsity), damping=0.0, **options)
    assert torch.allclose(pruned, masked_least_squares(weight, x, pruned == 0), atol=1e-8, rtol=1e-8)


def test_multi_with_damping_is_the_ridge_refit_of_the_change():
    weight, x, inputs = random_layer(rows=4, columns=12)
    damping = 0.1
    hessian = inputs.hessian()
    lam = damping * hessian.diagonal().mean()
    pruned = multi.prune(weight, inputs, HALF, damping=damping)
    # minimises δw (2XXᵀ/N + λI) δwᵀ: least squares on [X·sqrt(2/N); sqrt(λ)·I]
    scaled = x * (2.0 / x.shape[0]) ** 0.5
    expected = masked_least_squares(weight, scaled, pruned == 0, damping_matrix=lam * torch.eye(12, dtype=x.dtype))
    assert torch.allclose(pruned, expected, atol=1e-8)


def test_multi_refit_beats_sparsegpt_and_wanda_on_their_own_masks():
    weight, x, inputs = random_layer(rows=6, columns=16, seed=3)
    for other in (sparsegpt.prune(weight, inputs, HALF, damping=0.0, blocksize=4), wanda.prune(weight, inputs, HALF)):
        refit = multi.prune(weight, inputs, HALF, damping=0.0, mask=other == 0)
        assert ((refit == 0) == (other == 0)).all()
        assert output_loss(weight, refit, x) <= output_loss(weight, other, x) * (1 + 1e-9)


def test_multi_with_one_column_blocks_is_sparsegpt_for_the_same_mask():
    weight, _, inputs = random_layer(rows=5, columns=12, seed=4)
    mask = torch.rand(5, 12, generator=torch.Generator().manual_seed(0)) < 0.5
    expected = sparsegpt.prune(weight, inputs, HALF, damping=0.01, mask=mask)
    got = multi.prune(weight, inputs, HALF, damping=0.01, blocksize=1, refit=False, mask=mask)
    assert torch.allclose(got, expected, atol=1e-10)


def test_lazy_blocks_do_not_change_sparsegpt_for_a_fixed_mask():
    weight, _, inputs = random_layer(rows=5, columns=12, seed=5)
    mask = torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) < 0.5
    one = sparsegpt.prune(weight, inputs, HALF, blocksize=1, mask=mask)
    assert torch.allclose(sparsegpt.prune(weight, inputs, HALF, blocksize=4, mask=mask), one, atol=1e-10)
    assert torch.allclose(sparsegpt.prune(weight, inputs, HALF, blocksize=128, mask=mask), one, atol=1e-10)


@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
def test_joint_nm_mask_picks_the_subset_with_the_least_refit_error(sparsity):
    pattern = parse_pattern(sparsity)
    weight, x, inputs = random_layer(rows=3, columns=2 * pattern.m, seed=6)
    U, dead = inverse_factor(inputs.hessian(), 0.0)
    mask = multi.joint_nm_mask(weight, U.T @ U, dead, pattern.n, pattern.m)
    for r, g in itertools.product(range(3), range(2)):
        columns = range(g * pattern.m, (g + 1) * pattern.m)
        errors = {}
        for subset in itertools.combinations(columns, pattern.n):  # remove only this subset, refit the row
            only = torch.zeros(1, weight.shape[1], dtype=torch.bool)
            only[0, list(subset)] = True
            errors[subset] = output_loss(weight[r:r + 1], masked_least_squares(weight[r:r + 1], x, only), x)
        chosen = tuple(c for c in columns if mask[r, c])
        assert errors[chosen] <= min(errors.values()) * (1 + 1e-9)


# ---------------------------------------------------------------- patterns and shared properties

@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
def test_nm_patterns_have_exactly_n_zeros_per_group(name, sparsity):
    pattern = parse_pattern(sparsity)
    weight, _, inputs = random_layer(rows=6, columns=32, seed=7)
    pruned = PRUNERS[name].prune(weight.float(), inputs, pattern)
    assert (zeros_per_group(pruned, pattern.m) == pattern.n).all()


@pytest.mark.parametrize("name", sorted(PRUNERS))
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_is_exact(name, sparsity):
    weight, _, inputs = random_layer(rows=6, columns=40, seed=8)
    pruned = PRUNERS[name].prune(weight.float(), inputs, parse_pattern(sparsity))
    assert int((pruned == 0).sum()) == int(sparsity * 240 + 1e-9)
    assert pruned.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_sparsity_zero_is_the_identity(name):
    weight, _, inputs = random_layer(seed=9)
    for dtype in (torch.float32, torch.float16):
        w = weight.to(dtype)
        assert torch.equal(PRUNERS[name].prune(w, inputs, parse_pattern(0)), w)


@pytest.mark.parametrize("name", ["sparsegpt", "multi"])
def test_dead_inputs_are_removed_first_and_cost_nothing(name):
    weight, x, _ = random_layer(rows=4, columns=8, seed=10)
    x[:, [2, 5]] = 0  # two inputs never active during calibration
    inputs = LayerInputs.of(x)
    pruned = PRUNERS[name].prune(weight, inputs, parse_pattern(0.25))
    assert ((pruned == 0).nonzero()[:, 1].unique().tolist()) == [2, 5]
    assert output_loss(weight, pruned, x) < 1e-18 * float((weight @ x.T).pow(2).sum()) + 1e-20


def test_fp16_weights_are_solved_in_fp32_and_returned_in_fp16():
    weight, _, inputs = random_layer(rows=4, columns=16, seed=11)
    for name in ("sparsegpt", "multi"):
        pruned = PRUNERS[name].prune(weight.half(), inputs, HALF)
        assert pruned.dtype == torch.float16 and int((pruned == 0).sum()) == 32


def test_option_errors_are_clear():
    weight, _, inputs = random_layer(rows=2, columns=8)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsegpt.prune(weight, inputs, parse_pattern("2:4"), blocksize=6)
    with pytest.raises(ValueError, match="multiple of 8"):
        multi.prune(weight, inputs, parse_pattern("4:8"), blocksize=4)
    with pytest.raises(ValueError, match="nm_mask"):
        multi.prune(weight, inputs, HALF, nm_mask="greedy")
    with pytest.raises(ValueError, match="damping"):
        multi.prune(weight, inputs, HALF, damping=-1)
    with pytest.raises(ValueError, match="no calibration tokens"):
        sparsegpt.prune(weight, LayerInputs(8), HALF)
