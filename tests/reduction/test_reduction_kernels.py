"""The fused Triton kernels against their pure-torch references (run on the CPU under Triton's interpreter, which
tests/conftest.py selects), and the widths the reducer takes from the budget instead of the GPU.

Tolerances: merging has the reference's arithmetic, so it is compared bit for bit; similarity scores are the same
quantity rounded differently (kernels.py), compared within SCORE_TOL, on data whose best and second-best scores
are further apart than that, so that no near-tie can flip; exact ties are tested on purpose (lower slot wins).
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssmcompress import compat, reduction
from ssmcompress.hosts import mamba_ssm
from ssmcompress.reduction import METHODS, kernels, merge, patch
from conftest import tiny_model
from reduction_fixtures import ALL_METHODS, REMOVING, compose, make_tokens, mamba2, one_thread  # noqa: F401
import test_reduction_merge
from test_reduction_methods import method_call

SCORE_TOL = 1e-6  # |fused - reference| for cosine similarities at d <= 64 (float32 rounding, see kernels.py)


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setattr(kernels, "ROUTE", "fused")


def on_route(route, call):
    previous, kernels.ROUTE = kernels.ROUTE, route
    try:
        return call()
    finally:
        kernels.ROUTE = previous


def matching_inputs(b=4, n=37, d=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, d, generator=generator)
    src = torch.rand(b, n, generator=generator) < 0.5
    dst = ~src & (torch.rand(b, n, generator=generator) < 0.8)
    dst[2] = False  # a row with nowhere to go
    src[3, 20:] = dst[3, 20:] = False  # a row with padding
    metric[0, 4] = 0.0  # a zero vector: similarity 0 to everything
    return metric, src, dst


def second_best_margin(metric, src, dst):
    """Per source slot, how far its best destination's cosine lies above the second best's."""
    unit = torch.nn.functional.normalize(metric.double(), dim=-1)
    similarity = (unit @ unit.transpose(1, 2)).masked_fill(~dst[:, None, :], -math.inf)
    top = similarity.topk(2, dim=-1).values
    margin = (top[..., 0] - top[..., 1]).nan_to_num(math.inf)
    return margin[src & (dst.sum(1, keepdim=True) >= 2)]


def test_the_route_follows_compat_unless_forced(monkeypatch):
    x = torch.zeros(2, 3)
    assert not kernels.fused(x)  # a CPU tensor: the reference
    assert compat._triton_runs_on(torch.device("cuda")) and not compat._triton_runs_on(torch.device("cpu"))
    asked = []
    monkeypatch.setattr(compat, "_triton_runs_on", lambda device: asked.append(device) or device.type == "cpu")
    assert kernels.fused(x) and asked == [x.device]  # the route is asked about the tensor's device
    with compat.reference_kernels():  # fvcore's tracing and the GPU check take every reference
        assert not kernels.fused(x)
    monkeypatch.setattr(kernels, "ROUTE", "reference")
    assert not kernels.fused(x)
    monkeypatch.undo()
    with pytest.raises(TypeError, match="takes a torch.device"):  # a tensor itself is refused, never read as "not cuda"
        compat._triton_runs_on(x)
    monkeypatch.setattr(kernels, "ROUTE", "fast")
    with pytest.raises(ValueError, match="ROUTE must be one of"):
        kernels.fused(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_best_match_equals_the_reference(dtype):
    metric, src, dst = matching_inputs()
    metric = metric.to(dtype)
    assert bool((second_best_margin(metric.float(), src, dst) > 100 * SCORE_TOL).all()), "no near-tie in the data"
    partner, score = on_route("reference", lambda: merge.best_match(metric, src, dst))
    fused_partner, fused_score = on_route("fused", lambda: merge.best_match(metric, src, dst))
    assert torch.equal(fused_partner, partner)
    assert torch.equal(fused_score == -math.inf, score == -math.inf)
    finite = score > -math.inf
    assert (fused_score[finite] - score[finite]).abs().max() <= SCORE_TOL


def test_best_match_exact_ties_go_to_the_lower_destination(fused):
    test_reduction_merge.test_best_match_hand_example_and_missing_partners()  # its hand example, fused
    metric = torch.randn(1, 200, 16)
    metric[0, 170] = metric[0, 101]  # the same destination twice, in different blocks of the kernel's sweep
    metric[0, 10] = metric[0, 101]  # a source identical to both: an exact tie, to the lower slot
    src = torch.arange(200)[None] < 100
    partner, score = merge.best_match(metric, src, ~src)
    assert partner[0, 10] == 101 and score[0, 10] == pytest.approx(1.0, abs=SCORE_TOL)
    assert bool((partner[0, :100] != 170).all())


def test_best_match_rows_do_not_depend_on_their_batch(fused):
    metric, src, dst = matching_inputs(b=4, n=70)
    lengths = [70, 50, 33, 12]
    for row, length in enumerate(lengths):  # row r is a sequence of lengths[r] tokens, then padding
        src[row, length:] = dst[row, length:] = False
    partner, score = merge.best_match(metric, src, dst)
    for row, length in enumerate(lengths):
        alone = merge.best_match(metric[row:row + 1, :length], src[row:row + 1, :length], dst[row:row + 1, :length])
        assert torch.equal(alone[0][0], partner[row, :length]) and torch.equal(alone[1][0], score[row, :length])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_best_match_does_not_depend_on_how_destinations_are_split(dtype):
    """The spans meet in one packed (score, column) maximum per source: any number of spans gives one sweep's result,
    exact ties across spans included (the lower slot)."""
    metric, src, dst = matching_inputs(b=4, n=300, d=16)
    metric = metric.to(dtype)
    metric[1, 250] = metric[1, 10] = metric[1, 60]  # a source and two destinations tied exactly, far apart
    src[1, [60, 250]], dst[1, [60, 250]], src[1, 10], dst[1, 10] = False, True, True, False
    args = (metric, merge.pack(src, 300)[0], src.sum(-1), merge.pack(dst, 300)[0], dst.sum(-1))
    one = kernels.best_match(*args, splits=1)
    for splits in (2, 5, 40):
        split = kernels.best_match(*args, splits=splits)
        assert torch.equal(split[0], one[0]) and torch.equal(split[1], one[1])
    assert one[0][1, 10] == 60


@pytest.mark.parametrize("n", [1, 37, 300])
def test_arrange_equals_the_reference(n):
    generator = torch.Generator().manual_seed(n)
    first = torch.rand(5, n, generator=generator) < 0.4
    second = ~first & (torch.rand(5, n, generator=generator) < 0.5)
    count = first.sum(1, keepdim=True)
    for other, width in ((None, n), (second, n), (second, max(n // 3, 1)), (None, max(n // 2, 1))):
        expected = on_route("reference", lambda: merge.arrange(first, count, other, width))
        assert torch.equal(on_route("fused", lambda: merge.arrange(first, count, other, width)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_importance_equals_the_reference(dtype):
    """The importance in one read of the SSM output: torch's value to float32 rounding, a NaN kept (the finiteness
    check after the forward must see it), for every metric the kernel takes."""
    y = (torch.randn(3, 17, 300, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    y[1, 5, 7] = math.nan
    for metric in ("clip", "l1", "raw"):
        expected = patch.importance_of(y, metric)
        got = kernels.importance(y, metric)
        assert got.dtype == torch.float32 and got.shape == (3, 17)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True), metric
        assert got[1, 5].isnan() and int(got.isnan().sum()) == 1
    assert torch.allclose(kernels.importance(y[:, ::2], "clip"), patch.importance_of(y[:, ::2], "clip"), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 37, 300])
def test_select_equals_the_sorts_it_replaces(n):
    """lowest / highest as one bisection kernel per row: the same slots as the stable sort, on keys full of exact
    ties, both zeros and both infinities, at every count from none to more than a row's eligible slots."""
    generator = torch.Generator().manual_seed(n)
    b = 6
    key = torch.randint(-3, 4, (b, n), generator=generator).float() / 2  # few values: many ties
    key[0] = torch.randn(n, generator=generator)  # a row of distinct keys
    key[1, ::3] = -0.0
    key[2, ::4], key[2, 1::4] = math.inf, -math.inf
    key[3] = 1e30 * torch.randn(n, generator=generator).sign()
    eligible = torch.rand(b, n, generator=generator) < 0.7
    eligible[4] = False  # a row with nothing to choose
    for count in (0, 1, n // 3, n // 2, n, n + 5):
        counts = torch.full((b,), count) + torch.arange(b) % 2  # rows ask for different counts
        for select in (merge.lowest, merge.highest):
            expected = on_route("reference", lambda: select(key, counts, eligible))
            chosen = on_route("fused", lambda: select(key, counts, eligible))
            assert chosen.dtype == torch.bool and torch.equal(chosen, expected), (select.__name__, count)
            assert torch.equal(chosen.sum(1), torch.minimum(counts, eligible.sum(1)))


def test_one_sender_table_serves_both_streams(fused):
    """The merge takes its senders from a table of the union of both streams' merged slots and averages in only
    its own: the same bits as a table of its own."""
    x, sizes, source, target, merged, weights = merging_inputs(torch.bfloat16)
    other = merged | ((torch.rand(merged.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
                      & (target != torch.arange(merged.shape[1])))
    shared = kernels.sender_groups(target, merged | other)
    out = kernels.merge_stream(x, sizes, source, target, merged, weights, shared)
    own = kernels.merge_stream(x, sizes, source, target, merged, weights)
    assert torch.equal(out[0], own[0]) and torch.equal(out[1], own[1])
    assert torch.equal(out[0], merge.gather_slots(merge.average_into(x, target, merged, weights), source))
    assert torch.equal(out[1], merge.gather_slots(merge.carry_sizes(sizes, target, merged), source))


@pytest.mark.parametrize("n", [1, 37, 64, 300])
def test_sender_groups_equal_a_stable_sort(monkeypatch, n):
    """The one-program table (a sort of (receiver, slot) keys in registers and a histogram) against the stable sort
    and count that rows longer than ARRANGE_MAX take: the same senders, group starts and sizes."""
    generator = torch.Generator().manual_seed(n)
    target = torch.randint(0, n, (4, n), generator=generator)
    merged = torch.rand(4, n, generator=generator) < 0.4
    merged[1] = False  # nothing merged
    target[2], merged[2] = n - 1, torch.arange(n) != n - 1  # every slot into the last one (EViT's fused token)
    table = kernels.sender_groups(target, merged)
    monkeypatch.setattr(kernels, "ARRANGE_MAX", 0)
    for got, expected in zip(table, kernels.sender_groups(target, merged)):
        assert torch.equal(got, expected)
    assert torch.equal(table[2][2], torch.zeros(n, dtype=torch.long).index_fill(0, torch.tensor([n - 1]), n - 1))


def merging_inputs(dtype, b=3, n=40, d=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, n, d, generator=generator) * 3).to(dtype)
    slots = torch.arange(n).expand(b, n)
    merged = torch.rand(b, n, generator=generator) < 0.4
    target = torch.where(merged, torch.randint(0, n, (b, n), generator=generator), slots)
    merged &= target != slots
    target[2] = torch.where(merged[2], 7, slots[2])  # many-to-one (EViT's fused token)
    weights = torch.randint(1, 5, (b, n), generator=generator).float()
    weights[1] = torch.rand(n, generator=generator)  # non-integer weights (softmax importance)
    sizes = torch.randint(1, 9, (b, n), generator=generator).float()  # carried sizes: whole tokens
    source = torch.sort(torch.rand(b, n, generator=generator), 1).indices[:, :27]
    return x, sizes, source, target, merged, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_stream_equals_the_reference_bit_for_bit(dtype):
    x, sizes, source, target, merged, weights = merging_inputs(dtype)
    expected = merge.gather_slots(merge.average_into(x, target, merged, weights), source)
    out, out_sizes = on_route("fused", lambda: merge.merge_stream(x, sizes, source, target, merged, weights))
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(out_sizes, merge.gather_slots(merge.carry_sizes(sizes, target, merged), source))
    received = torch.zeros(target.shape).scatter_add_(1, target, merged.float()) > 0
    untouched = ~received.gather(1, source)
    assert torch.equal(out[untouched], merge.gather_slots(x, source)[untouched])  # copied, not x·w/w
    gathered = on_route("fused", lambda: merge.merge_stream(x, sizes, source))  # nothing merged: the gathers
    assert torch.equal(gathered[0], merge.gather_slots(x, source))
    assert torch.equal(gathered[1], merge.gather_slots(sizes, source))


def test_bfloat16_rounding_is_to_nearest_even():
    """Averages that fall between two bfloat16 values: halfway (ties to even), past halfway, and subnormal."""
    ulp = 2.0 ** -7  # bfloat16's spacing in [1, 2)
    pairs = [(1.0, 1.0 + ulp, 1.0), (1.0 + ulp, 1.0 + 2 * ulp, 1.0), (1.0, 1.0 + ulp, 3.0), (-1.0, -1.0 - ulp, 3.0),
             (1e-39, 2e-39, 1.0), (3e38, 3.3e38, 0.01), (0.0, -0.0, 1.0)]  # (receiver, sender, sender's weight)
    m = len(pairs)
    x = torch.tensor([p[0] for p in pairs] + [p[1] for p in pairs]).bfloat16()[None, :, None]
    weights = torch.tensor([1.0] * m + [p[2] for p in pairs])[None]
    target = torch.arange(2 * m)[None] % m  # slot m + i is merged into slot i
    merged = torch.arange(2 * m)[None] >= m
    source = torch.arange(m)[None]
    expected = merge.gather_slots(merge.average_into(x, target, merged, weights), source)
    assert expected[0, :2, 0].tolist() == [1.0, 1.0 + 2 * ulp]  # the reference ties to even
    out, _ = on_route("fused", lambda: merge.merge_stream(x, weights, source, target, merged, weights))
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------------------ the reducer


def small_reducer(model, method, info):
    return reduction.from_config(model, compose(method, 0.2, "layers=[0,2]"), info)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_reducer_forward_is_the_same_on_both_paths(method):
    model = tiny_model(2, seed=3)
    info = mamba_ssm.model_info(model)
    reducer = small_reducer(model, method, info)
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 4000, (3, 40), generator=generator)
    lengths = torch.tensor([40, 31, 12])
    protect = torch.zeros(3, 40, dtype=torch.bool)
    protect[[0, 1, 2], [30, 20, 5]] = True
    try:
        for call in (dict(), dict(lengths=lengths, protect=protect)):  # widths from the host, and from the data
            expected = on_route("reference", lambda: reducer(ids, **call))
            out = on_route("fused", lambda: reducer(ids, **call))
            assert torch.equal(out.positions, expected.positions) and torch.equal(out.counts, expected.counts)
            assert torch.equal(out.logits.isnan(), expected.logits.isnan())
            assert torch.equal(out.logits.nan_to_num(), expected.logits.nan_to_num())  # same tokens: same bits
    finally:
        reducer.remove()


# ------------------------------------------------------------------------------------------------ host widths


@pytest.mark.parametrize("method", ALL_METHODS)
def test_widths_from_the_budget_change_nothing(mamba2, method):
    model, info = mamba2
    reducer = reduction.from_config(model, compose(method, 0.3), info)
    ids = torch.randint(1, 4000, (2, 57), generator=torch.Generator().manual_seed(5))
    try:
        assert reducer.planned_counts(57) is not None
        planned = reducer(ids)  # unpadded, unprotected: every width from the budget
        read = reducer(ids, lengths=torch.tensor([57, 57]))  # the same rows, widths read from the masks
        assert torch.equal(planned.positions, read.positions) and torch.equal(planned.logits, read.logits)
        assert planned.counts.tolist() == [reducer.planned_counts(57)[-1]] * 2
    finally:
        reducer.remove()


@pytest.mark.parametrize("name", REMOVING)
def test_every_method_removes_exactly_what_is_asked_within_its_limit(name):
    """What the planned widths rely on: for an unpadded, unprotected row of c tokens, asked for r <= the limit
    its min_keep_rate implies (budget.predicted_counts), a method removes exactly r."""
    entry = METHODS[name]
    params = {**reduction.method_defaults(name), **entry.fixed}
    min_keep = entry.min_keep_rate(params)
    generator = torch.Generator().manual_seed(6)
    for c in (1, 2, 3, 4, 5, 7, 8, 13, 20, 33):
        limit = c - max(math.ceil(c * min_keep), 1)
        asked = torch.arange(limit + 1)
        tokens = make_tokens(torch.randn(len(asked), c, 8, generator=generator),
                             torch.rand(len(asked), c, generator=generator))
        out = method_call(name, tokens, asked)
        assert out.counts.tolist() == (c - asked).tolist(), f"{name}, {c} tokens"


def test_planned_counts_stand_aside_where_a_limit_binds(mamba2):
    model, info = mamba2
    reducer = reduction.from_config(model, compose("official", 0.3, "method.reduce_ratio=0.3"), info)
    ids = torch.randint(1, 4000, (2, 40), generator=torch.Generator().manual_seed(7))
    try:
        assert reducer.planned_counts(40) is None  # keeping 30 % asks for more than half: official's limit
        out = reducer(ids)
        assert out.counts.tolist() == [out.logits.shape[1]] * 2
    finally:
        reducer.remove()


def test_a_count_off_the_plan_is_a_clear_error(mamba2):
    model, info = mamba2
    reducer = reduction.from_config(model, compose("tome", 0.3), info)
    ids = torch.randint(1, 4000, (2, 40), generator=torch.Generator().manual_seed(8))
    try:
        planned = reducer.planned_counts(40)
        reducer._planned[40] = [15] + planned[1:]  # a plan ToMe cannot follow: 25 of 40 tokens, more than half
        with pytest.raises(RuntimeError, match="layer 2: the method kept a different number of tokens"):
            reducer(ids)
    finally:
        reducer.remove()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_the_fused_path_with_planned_widths_reads_nothing_back(fused, monkeypatch, method):
    """No value goes from the device to the host inside a reduction layer (each would be a synchronisation on a
    GPU): every conversion of a tensor to a Python value fails while one runs (the same call with lengths= fails)."""
    model = tiny_model(2, seed=3)
    info = mamba_ssm.model_info(model)
    ids = torch.randint(1, 4000, (2, 40), generator=torch.Generator().manual_seed(9))
    reducer = small_reducer(model, method, info)
    assert reducer.planned_counts(40) is not None
    step = reducer._reduce_step

    def guarded(*args):
        with monkeypatch.context() as guard:
            for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__"):
                guard.setattr(torch.Tensor, name, forbidden)
            return step(*args)

    reducer._reduce_step = guarded
    try:
        reducer(ids)
    finally:
        reducer.remove()


@pytest.mark.parametrize("method", [name for name in ALL_METHODS if name != "official"])
def test_the_fused_path_sorts_nothing(fused, method):
    """Selections, sender tables and orderings run as one-program kernels on the fused path: no torch sort inside a
    reduction layer (each is several launches on a GPU). `official` sorts by design (its channel-wise sort)."""
    model = tiny_model(2, seed=3)
    info = mamba_ssm.model_info(model)
    ids = torch.randint(1, 4000, (2, 40), generator=torch.Generator().manual_seed(9))
    reducer = small_reducer(model, method, info)
    step, called = reducer._reduce_step, []

    def watched(*args):
        with OpsSeen() as seen:
            result = step(*args)
        called.append(seen.names)
        return result

    reducer._reduce_step = watched
    try:
        reducer(ids)
    finally:
        reducer.remove()
    assert len(called) == 2 and not any({"sort", "argsort", "topk"} & names for names in called)


class OpsSeen(TorchDispatchMode):
    """The aten operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def forbidden(*args, **kwargs):
    raise AssertionError("a tensor was read back on the host inside a reduction layer")
