"""Mamba-3's pure-torch SISO layer (ssmcompress.mamba3_reference, what a CPU runs) against mamba-ssm's Triton kernel
`mamba3_siso_combined` on a GPU, at a tiny shape and at a 1.5B-class layer's (bf16 inputs, as the kernel takes them;
standard normals, and the distributions of mamba-ssm's own kernel test), with that test's metric (95th percentile of
the relative error, bound 5e-2) beside the absolute differences; the last case with factors on the angle steps (a
token reduction's `rotation`), which both paths must apply alike. Then the MIMO layer (`mamba3_reference.mamba3_mimo`)
against mamba-ssm's TileLang kernel `mamba3_mimo` at its tuned shape (rank 4, chunk 16, d_state 128, headdim 64), with
and without the factors, where TileLang is installed (`pip install tilelang`); the record says when it is not.

    python experiments/gpu/check_mamba3.py OUT.json
"""
import json
import math
import sys

import torch

from ssmcompress import compat, mamba3_reference

compat.install()


def p95_relative(kernel, reference, floor=1e-2) -> float:
    """mamba-ssm's test metric for these kernels (tests/ops/triton/test_mamba3_siso.py, `relative_error`): the 95th
    percentile of |kernel - reference| / |reference| over the entries with |reference| >= floor (its bound: 5e-2)."""
    mask = reference.abs() >= floor
    values = ((kernel - reference).abs()[mask] / (reference.abs()[mask] + 1e-6)).flatten()
    return values.kthvalue(max(1, math.ceil(0.95 * values.numel()))).values.item()


def inputs(batch, length, nheads, headdim, dstate, n_angles, g, test_like: bool) -> dict:
    """Random kernel inputs in bf16 (float32 tensors of bf16 values): standard normals, or (test_like) the
    distributions of mamba-ssm's own test: RMS-normed Q and K, dt log-uniform in [1e-3, 0.1], A uniform in [-16, -1],
    Trap uniform in [0, 1], D = 1."""
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda")  # noqa: E731
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    u = lambda *shape: torch.rand(*shape, generator=g, device="cuda")  # noqa: E731
    if test_like:
        dt = torch.exp(u(batch, nheads, length) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        adt, trap, d = -(1 + 15 * u(batch, nheads, length)) * dt, bf(u(batch, nheads, length)), torch.ones(nheads, device="cuda")
        q, k = (bf(torch.nn.functional.rms_norm(r(batch, length, 1, dstate), (dstate,))) for _ in range(2))
    else:
        dt = torch.nn.functional.softplus(r(batch, nheads, length) - 1)
        adt, trap, d = -dt * u(*dt.shape), bf(r(batch, nheads, length)), r(nheads)
        q, k = bf(r(batch, length, 1, dstate)), bf(r(batch, length, 1, dstate))
    return dict(Q=q, K=k, V=bf(r(batch, length, nheads, headdim)), ADT=adt, DT=dt, Trap=trap, Q_bias=bf(r(nheads, dstate)),
                K_bias=bf(r(nheads, dstate)), Angles=r(batch, length, nheads, n_angles), D=d,
                Z=bf(r(batch, length, nheads, headdim)))


def case(batch, length, nheads, headdim, dstate, n_angles, chunk, test_like=False, seed=0, steps=False) -> dict:
    """`steps`: with factors of 1 to 4 on the angle steps (a token reduction's rotation=positions / sizes), which
    compat hands to the kernel's angle cumsum."""
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

    generator = torch.Generator(device="cuda").manual_seed(seed)
    given = inputs(batch, length, nheads, headdim, dstate, n_angles, generator, test_like)
    factors = torch.randint(1, 5, (batch, length), device="cuda", generator=generator).float() if steps else None
    token = mamba3_reference.ANGLE_STEP_SCALE.set(factors)
    try:
        kernel = mamba3_siso_combined(**given, chunk_size=chunk).float()
        reference = mamba3_reference.mamba3_siso(**given, chunk_size=chunk)
    finally:
        mamba3_reference.ANGLE_STEP_SCALE.reset(token)
    diff = (kernel - reference).abs()
    return dict(shape=dict(batch=batch, length=length, nheads=nheads, headdim=headdim, dstate=dstate,
                           n_angles=n_angles, chunk=chunk), inputs="mamba-ssm's test" if test_like else "normal",
                angle_step_factors=steps,
                p95_relative=p95_relative(kernel, reference), max_abs=diff.max().item(), mean_abs=diff.mean().item(),
                scale=reference.abs().mean().item())


def mimo_case(batch, length, rank, nheads, headdim, dstate, chunk, seed=0, steps=False) -> dict:
    """The MIMO kernel against the pure-torch layer, bf16 inputs as mamba-ssm's MIMO test draws them (its
    rotary_dim_divisor 4: d_state / 4 angles), Z, MIMO_Z and MIMO_Out given (the module's call without its output
    norm)."""
    from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo import mamba3_mimo

    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda")  # noqa: E731
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    dt = torch.nn.functional.softplus(-3.0 + r(batch, nheads, length))
    given = dict(Q=bf(r(batch, length, rank, 1, dstate)), K=bf(r(batch, length, rank, 1, dstate)),
                 V=bf(r(batch, length, nheads, headdim)), ADT=-dt * torch.rand(dt.shape, generator=g, device="cuda"),
                 DT=dt, Trap=bf(torch.rand(dt.shape, generator=g, device="cuda")), Q_bias=r(nheads, rank, dstate),
                 K_bias=r(nheads, rank, dstate), MIMO_V=r(nheads, rank, headdim) / rank,
                 MIMO_Z=r(nheads, rank, headdim), MIMO_Out=r(nheads, rank, headdim) / rank,
                 Angles=torch.rand(batch, length, nheads, dstate // 4, generator=g, device="cuda"), D=r(nheads),
                 Z=bf(r(batch, length, nheads, headdim)))
    factors = torch.randint(1, 5, (batch, length), device="cuda", generator=g).float() if steps else None
    token = mamba3_reference.ANGLE_STEP_SCALE.set(factors)
    try:
        kernel = mamba3_mimo(**given, chunk_size=chunk, rotary_dim_divisor=4, dtype=torch.bfloat16).float()
        reference = mamba3_reference.mamba3_mimo(**given, chunk_size=chunk).float()
    finally:
        mamba3_reference.ANGLE_STEP_SCALE.reset(token)
    diff = (kernel - reference).abs()
    return dict(layer="MIMO", shape=dict(batch=batch, length=length, rank=rank, nheads=nheads, headdim=headdim,
                                         dstate=dstate, chunk=chunk), inputs="mamba-ssm's MIMO test",
                angle_step_factors=steps, p95_relative=p95_relative(kernel, reference), max_abs=diff.max().item(),
                mean_abs=diff.mean().item(), scale=reference.abs().mean().item())


def main() -> None:
    cases = [case(2, 100, 4, 16, 16, 4, 64), case(2, 2048, 32, 64, 128, 32, 64),
             case(2, 2048, 32, 64, 128, 32, 64, test_like=True), case(2, 2048, 32, 64, 128, 32, 64, test_like=True, steps=True)]
    if compat.HAS_MAMBA3_MIMO:
        cases += [mimo_case(2, 2048, 4, 16, 64, 128, 16), mimo_case(2, 2048, 4, 16, 64, 128, 16, steps=True)]
    else:
        cases.append(dict(layer="MIMO", skipped="TileLang is not installed: mamba-ssm's MIMO kernel does not import"))
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cases=cases)
    print(json.dumps(out, indent=1))
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
