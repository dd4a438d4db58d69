"""Mamba-3's SISO layer in pure torch (ssmcompress.mamba3_reference) against the recurrence it unrolls, token by
token; mamba-ssm's Mamba3 module runs on a CPU through compat and stays causal. Against mamba-ssm's Triton kernel:
experiments/gpu/check_mamba3.py, on a GPU (the kernel's PTX approximations and tensor descriptors do not run under
Triton's interpreter); its angle cumsum, with an exact tanh in place of the approximation, here."""
import math

import pytest
import torch
import triton
import triton.language as tl

from ssmcompress import compat, mamba3_reference

compat.install()


def inputs(batch=2, length=37, nheads=4, groups=1, dstate=16, headdim=8, n_angles=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    dt = torch.nn.functional.softplus(r(batch, nheads, length) - 1)
    return dict(Q=r(batch, length, groups, dstate).to(dtype), K=r(batch, length, groups, dstate).to(dtype),
                V=r(batch, length, nheads, headdim).to(dtype), ADT=-dt * torch.rand(batch, nheads, length, generator=g),
                DT=dt, Trap=r(batch, nheads, length), Q_bias=r(nheads, dstate), K_bias=r(nheads, dstate),
                Angles=r(batch, length, nheads, n_angles), D=r(nheads), Z=r(batch, length, nheads, headdim).to(dtype))


def recurrence(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, final=False, steps=None):
    """The layer token by token: the state S (b, h, n, p) and the previous token's rotated k and v. `final`: the
    state and the angles after the last token instead of the outputs. `steps` (b, l): factors on the angle steps."""
    b, length, h, p = V.shape
    repeat = h // Q.shape[2]
    Q, K = Q.repeat_interleave(repeat, 2), K.repeat_interleave(repeat, 2)
    S = torch.zeros(b, h, Q.shape[-1], p, dtype=torch.float64)
    theta = torch.zeros(b, h, Angles.shape[-1], dtype=torch.float64)
    k_prev, v_prev = torch.zeros(b, h, Q.shape[-1], dtype=torch.float64), torch.zeros(b, h, p, dtype=torch.float64)
    out = []
    for t in range(length):
        dt, adt, share = DT[:, :, t].double(), ADT[:, :, t].double(), torch.sigmoid(Trap[:, :, t].double())
        factor = 1.0 if steps is None else steps[:, t, None, None].double()
        theta = theta + math.pi * torch.tanh(Angles[:, t].double()) * dt[..., None] * factor
        q = mamba3_reference.rotate(Q[:, t].double() + Q_bias.double(), theta)
        k = mamba3_reference.rotate(K[:, t].double() + K_bias.double(), theta)
        v = V[:, t].double()
        decay = adt.exp()[..., None, None]
        S = decay * S + ((1 - share) * dt)[..., None, None] * decay * k_prev[..., None] * v_prev[..., None, :] \
            + (share * dt)[..., None, None] * k[..., None] * v[..., None, :]
        y = torch.einsum("bhnp,bhn->bhp", S, q) + D.double()[:, None] * v
        out.append(y * torch.nn.functional.silu(Z[:, t].double()))
        k_prev, v_prev = k, v
    if final:
        return S, torch.remainder(theta, 2 * math.pi)
    return torch.stack(out, 1)


@pytest.mark.parametrize("shape", [dict(), dict(groups=2, length=16), dict(length=5, n_angles=8), dict(length=70)])
def test_the_chunked_layer_is_the_recurrence_it_unrolls(shape):
    given = inputs(**shape)
    expected = recurrence(**given)
    got = mamba3_reference.mamba3_siso(**given, chunk_size=16)
    assert got.dtype == given["V"].dtype
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_mamba_ssms_mamba3_module_runs_on_a_cpu_and_is_causal():
    from mamba_ssm.modules.mamba3 import Mamba3

    torch.manual_seed(0)
    layer = Mamba3(d_model=32, d_state=16, headdim=16, chunk_size=16)
    u = torch.randn(2, 40, 32)
    changed = u.clone()
    changed[:, 25:] = torch.randn(2, 15, 32)
    with torch.no_grad():
        a, b = layer(u), layer(changed)
    assert a.shape == u.shape and torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


def test_the_final_states_are_where_the_recurrence_ends():
    """What decoding continues from: the state after the last token, the angles, and its rotated k and its v."""
    given = inputs(length=37)
    expected_state, expected_theta = recurrence(**given, final=True)
    y, theta, state, k, v = mamba3_reference.mamba3_siso(**given, chunk_size=16, return_final_states=True)
    torch.testing.assert_close(state.double(), expected_state.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theta.double(), expected_theta, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, given["V"][:, -1]) and k.shape == (2, 4, 16)
    torch.testing.assert_close(y, mamba3_reference.mamba3_siso(**given, chunk_size=16))


def test_a_cache_to_continue_from_or_packed_sequences_are_refused():
    with pytest.raises(NotImplementedError, match="cached states"):
        mamba3_reference.mamba3_siso(**inputs(), Input_States=(None, None, None, None))
    with pytest.raises(NotImplementedError, match="packed"):
        mamba3_reference.mamba3_siso(**inputs(batch=1), cu_seqlens=torch.tensor([0, 20, 37]))


def wrapped_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The largest distance between angles in [0, 2π), going round the circle."""
    d = (a - b).abs()
    return torch.minimum(d, 2 * math.pi - d).max()


def test_factors_on_the_angle_steps_rotate_as_the_recurrence_with_those_steps():
    """ANGLE_STEP_SCALE (a token reduction's `rotation`): each token's angle step times its factor, nothing else; unset
    again, the layer is as before."""
    given = inputs(length=37)
    steps = torch.randint(1, 5, (2, 37), generator=torch.Generator().manual_seed(1)).float()
    token = mamba3_reference.ANGLE_STEP_SCALE.set(steps)
    try:
        got = mamba3_reference.mamba3_siso(**given, chunk_size=16)
    finally:
        mamba3_reference.ANGLE_STEP_SCALE.reset(token)
    torch.testing.assert_close(got.double(), recurrence(**given, steps=steps), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, mamba3_reference.mamba3_siso(**given, chunk_size=16))


def test_steps_times_the_positions_skipped_give_the_original_angles_where_the_skipped_share_the_step():
    """rotation=positions: a kept token's step times the positions since the previous kept one is its original angle
    exactly where every removed token had the step of the kept token after it."""
    g = torch.Generator().manual_seed(2)
    kept = torch.tensor([0, 3, 4, 9, 10, 11, 17])
    gaps = torch.diff(kept, prepend=torch.tensor([-1]))
    angles, dt = torch.randn(1, 7, 2, 4, generator=g), torch.rand(1, 2, 7, generator=g) * 0.5
    # the full sequence: each removed token a copy of the kept token after it
    owner = torch.repeat_interleave(torch.arange(7), gaps)
    full = mamba3_reference.cumulative_angles(angles[:, owner], dt[:, :, owner])[:, kept]
    token = mamba3_reference.ANGLE_STEP_SCALE.set(gaps[None].float())
    try:
        reduced = mamba3_reference.cumulative_angles(angles, mamba3_reference.angle_dt(dt))
    finally:
        mamba3_reference.ANGLE_STEP_SCALE.reset(token)
    assert wrapped_distance(reduced, full) < 1e-5
    assert wrapped_distance(mamba3_reference.cumulative_angles(angles, dt), full) > 0.1


@triton.jit
def exact_tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


def test_the_kernels_angle_cumsum_takes_the_same_factors(monkeypatch):
    """On a GPU mamba-ssm's kernel computes the angles (angle_dt_fwd); compat gives it the same factors. Run here under
    Triton's interpreter, with an exact tanh for its PTX approximation and one of its tuned configurations."""
    import mamba_ssm.modules.mamba3  # noqa: F401  (compat's routes are set when the module imports)
    import mamba_ssm.ops.triton.mamba3.angle_dt as angle_dt
    import mamba_ssm.ops.triton.mamba3.mamba3_siso_combined as combined

    monkeypatch.setattr(angle_dt, "tanh_approx", exact_tanh)
    monkeypatch.setattr(angle_dt.angle_dt_fwd_kernel, "configs", angle_dt.angle_dt_fwd_kernel.configs[:1])
    g = torch.Generator().manual_seed(3)
    angles, dt = torch.randn(2, 100, 4, 4, generator=g), torch.rand(2, 4, 100, generator=g) * 0.1
    steps = torch.randint(1, 5, (2, 100), generator=g).float()
    for factors in (None, steps):
        token = mamba3_reference.ANGLE_STEP_SCALE.set(factors)
        try:
            got, last = combined.angle_dt_fwd(angles, dt, return_output_state=True)
            expected = mamba3_reference.cumulative_angles(angles, mamba3_reference.angle_dt(dt))
        finally:
            mamba3_reference.ANGLE_STEP_SCALE.reset(token)
        assert wrapped_distance(got, expected) < 1e-5 and wrapped_distance(last, expected[:, -1]) < 1e-5


# ---------------------------------------------------------------------------------------------------------- MIMO


def mimo_inputs(batch=2, length=37, rank=3, nheads=4, groups=1, dstate=16, headdim=8, n_angles=4, seed=0,
                outputs=True):
    """`mamba3_mimo`'s arguments: R = rank pairs per token; `outputs`: with Z, MIMO_Z and MIMO_Out (the module's
    call without its output norm), else without them (the module norms and sums the ranks itself)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    dt = torch.nn.functional.softplus(r(batch, nheads, length) - 1)
    given = dict(Q=r(batch, length, rank, groups, dstate), K=r(batch, length, rank, groups, dstate),
                 V=r(batch, length, nheads, headdim), ADT=-dt * torch.rand(batch, nheads, length, generator=g), DT=dt,
                 Trap=r(batch, nheads, length), Q_bias=r(nheads, rank, dstate), K_bias=r(nheads, rank, dstate),
                 MIMO_V=r(nheads, rank, headdim) / rank, MIMO_Z=None, MIMO_Out=None,
                 Angles=r(batch, length, nheads, n_angles), D=r(nheads), Z=None)
    if outputs:
        given.update(MIMO_Z=r(nheads, rank, headdim), MIMO_Out=r(nheads, rank, headdim) / rank,
                     Z=r(batch, length, nheads, headdim))
    return given


def halves_rotation(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The MIMO kernel's rotation, element by element: dimension i < n_angles with i + n/2."""
    out, half = x.clone(), x.shape[-1] // 2
    for i in range(theta.shape[-1]):
        cos, sin = theta[..., i].cos(), theta[..., i].sin()
        out[..., i] = x[..., i] * cos - x[..., half + i] * sin
        out[..., half + i] = x[..., i] * sin + x[..., half + i] * cos
    return out


def mimo_recurrence(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z):
    """The MIMO layer token by token: R pairs (k_r, v_r = x ⊙ ψ_r) enter the state (b, h, n, p) per token, each rank's
    query reads it, the ranks' outputs gated by silu(z ⊙ ζ_r) and summed with weights φ_r. Also the final state, the
    angles and the last token's rotated k (b, R, h, n)."""
    b, length, h, p = V.shape
    rank = Q.shape[2]
    Q, K = Q.double().repeat_interleave(h // Q.shape[3], 3), K.double().repeat_interleave(h // K.shape[3], 3)
    q_bias, k_bias = Q_bias.double().transpose(0, 1), K_bias.double().transpose(0, 1)  # (R, h, n)
    S = torch.zeros(b, h, Q.shape[-1], p, dtype=torch.float64)
    theta = torch.zeros(b, h, Angles.shape[-1], dtype=torch.float64)
    k_prev, v_prev = torch.zeros(b, rank, h, Q.shape[-1], dtype=torch.float64), torch.zeros(b, rank, h, p,
                                                                                            dtype=torch.float64)
    out = []
    for t in range(length):
        dt, adt, share = DT[:, :, t].double(), ADT[:, :, t].double(), torch.sigmoid(Trap[:, :, t].double())
        theta = theta + math.pi * torch.tanh(Angles[:, t].double()) * dt[..., None]
        q = halves_rotation(Q[:, t] + q_bias, theta[:, None])  # (b, R, h, n)
        k = halves_rotation(K[:, t] + k_bias, theta[:, None])
        v = V[:, t].double()[:, None] * MIMO_V.double().transpose(0, 1)  # (b, R, h, p)
        decay = adt.exp()[..., None, None]
        S = decay * S + ((1 - share) * dt)[..., None, None] * decay * torch.einsum("brhn,brhp->bhnp", k_prev, v_prev) \
            + (share * dt)[..., None, None] * torch.einsum("brhn,brhp->bhnp", k, v)
        y = torch.einsum("bhnp,brhn->brhp", S, q) + D.double()[:, None] * v
        if Z is None:
            out.append(y)
        else:
            gate = torch.nn.functional.silu(Z[:, t].double()[:, None] * MIMO_Z.double().transpose(0, 1))
            out.append(((y * gate) * MIMO_Out.double().transpose(0, 1)).sum(1))
        k_prev, v_prev = k, v
    return torch.stack(out, 1), S, torch.remainder(theta, 2 * math.pi), k


@pytest.mark.parametrize("shape", [dict(), dict(groups=2, length=16, rank=2), dict(length=5, n_angles=8, rank=4),
                                   dict(length=70, rank=1), dict(outputs=False)])
def test_the_chunked_mimo_layer_is_the_recurrence_it_unrolls(shape):
    given = mimo_inputs(**shape)
    expected, state, theta, k = mimo_recurrence(**given)
    got, last_theta, last_state, last_k, last_v = mamba3_reference.mamba3_mimo(**given, chunk_size=8,
                                                                               return_state=True)
    assert got.shape == expected.shape and got.dtype == given["V"].dtype
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last_state.double(), state.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    assert wrapped_distance(last_theta.double(), theta) < 1e-5
    torch.testing.assert_close(last_k.double(), k, atol=1e-5, rtol=1e-5)
    assert torch.equal(last_v, given["V"][:, -1])
    torch.testing.assert_close(got, mamba3_reference.mamba3_mimo(**given, chunk_size=16))  # any chunk size


def test_the_mimo_layer_takes_the_angle_step_factors():
    given = mimo_inputs(length=30)
    steps = torch.randint(1, 5, (2, 30), generator=torch.Generator().manual_seed(1)).float()
    token = mamba3_reference.ANGLE_STEP_SCALE.set(steps)
    try:
        scaled = mamba3_reference.mamba3_mimo(**given, chunk_size=8, return_state=True)[1]
    finally:
        mamba3_reference.ANGLE_STEP_SCALE.reset(token)
    expected = mamba3_reference.cumulative_angles(given["Angles"], given["DT"] * steps[:, None])[:, -1]
    assert wrapped_distance(scaled, expected) < 1e-5
    assert wrapped_distance(mamba3_reference.mamba3_mimo(**given, chunk_size=8, return_state=True)[1], expected) > 0.1


@pytest.mark.parametrize("outproj_norm", [False, True])
def test_mamba_ssms_mimo_module_runs_on_a_cpu_and_its_steps_continue_its_prefill(outproj_norm):
    """mamba-ssm builds a MIMO mixer without TileLang (compat routes its kernel to the pure-torch layer); stepping
    token by token from a prefill's states (mamba3_reference.step, MIMO) gives the outputs of the whole sequence."""
    from mamba_ssm.modules.mamba3 import Mamba3
    from mamba_ssm.utils.generation import InferenceParams

    torch.manual_seed(0)
    layer = Mamba3(d_model=32, d_state=16, headdim=16, chunk_size=8, is_mimo=True, mimo_rank=2,
                   is_outproj_norm=outproj_norm, layer_idx=0)
    with torch.no_grad():  # away from the initial biases of 1 and projections of 1/R, which hide a rank mix-up
        for weight in (layer.B_bias, layer.C_bias, layer.mimo_x, layer.mimo_z, layer.mimo_o):
            weight.copy_(torch.randn_like(weight))
    u = torch.randn(2, 30, 32)
    cache = InferenceParams(max_seqlen=30, max_batch_size=2)
    with torch.no_grad():
        whole = layer(u)
        outputs = [layer(u[:, :20], inference_params=cache)]
        for t in range(20, 30):
            cache.seqlen_offset = t
            outputs.append(layer(u[:, t:t + 1], inference_params=cache))
    assert whole.shape == u.shape and torch.isfinite(whole).all()
    torch.testing.assert_close(torch.cat(outputs, 1), whole, atol=1e-4, rtol=1e-4)
