"""Mamba-3's pure-torch SISO layer (ssmcompress.mamba3_reference, what a CPU runs) against mamba-ssm's Triton kernel
`mamba3_siso_combined` on a GPU, at a tiny shape and at a 1.5B-class layer's (bf16 inputs, as the kernel takes them),
and mamba-ssm's Mamba3 module routed either way.

    python experiments/gpu/check_mamba3.py OUT.json
"""
import json
import sys

import torch

from ssmcompress import compat, mamba3_reference

compat.install()


def case(batch, length, nheads, headdim, dstate, n_angles, chunk, seed=0) -> dict:
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda")  # noqa: E731
    dt = torch.nn.functional.softplus(r(batch, nheads, length) - 1)
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    given = dict(Q=bf(r(batch, length, 1, dstate)), K=bf(r(batch, length, 1, dstate)),
                 V=bf(r(batch, length, nheads, headdim)), ADT=-dt * torch.rand(dt.shape, generator=g, device="cuda"),
                 DT=dt, Trap=bf(r(batch, nheads, length)), Q_bias=r(nheads, dstate), K_bias=r(nheads, dstate),
                 Angles=bf(r(batch, length, nheads, n_angles)), D=r(nheads), Z=bf(r(batch, length, nheads, headdim)))
    kernel = mamba3_siso_combined(**given, chunk_size=chunk).float()
    reference = mamba3_reference.mamba3_siso(**given, chunk_size=chunk)
    diff = (kernel - reference).abs()
    return dict(shape=dict(batch=batch, length=length, nheads=nheads, headdim=headdim, dstate=dstate,
                           n_angles=n_angles, chunk=chunk), max_abs=diff.max().item(), mean_abs=diff.mean().item(),
                scale=reference.abs().mean().item())


def main() -> None:
    cases = [case(2, 100, 4, 16, 16, 4, 64), case(2, 2048, 32, 64, 128, 32, 64)]
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cases=cases)
    print(json.dumps(out, indent=1))
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
