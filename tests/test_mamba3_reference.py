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
