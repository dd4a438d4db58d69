"""Mamba-3's SISO layer in pure torch (ssmcompress.mamba3_reference) against the recurrence it unrolls, token by
token; mamba-ssm's Mamba3 module runs on a CPU through compat and stays causal. Against mamba-ssm's Triton kernel:
experiments/gpu/check_mamba3.py, on a GPU (the kernel's PTX approximations and tensor descriptors do not run under
Triton's interpreter)."""
import math

import pytest
import torch

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


def recurrence(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, final=False):
    """The layer token by token: the state S (b, h, n, p) and the previous token's rotated k and v. `final`: the
    state and the angles after the last token instead of the outputs."""
    b, length, h, p = V.shape
    repeat = h // Q.shape[2]
    Q, K = Q.repeat_interleave(repeat, 2), K.repeat_interleave(repeat, 2)
    S = torch.zeros(b, h, Q.shape[-1], p, dtype=torch.float64)
    theta = torch.zeros(b, h, Angles.shape[-1], dtype=torch.float64)
    k_prev, v_prev = torch.zeros(b, h, Q.shape[-1], dtype=torch.float64), torch.zeros(b, h, p, dtype=torch.float64)
    out = []
    for t in range(length):
        dt, adt, share = DT[:, :, t].double(), ADT[:, :, t].double(), torch.sigmoid(Trap[:, :, t].double())
        theta = theta + math.pi * torch.tanh(Angles[:, t].double()) * dt[..., None]
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
