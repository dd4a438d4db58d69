"""The Triton selective scan against mamba-ssm's `selective_scan_ref`: outputs, last states and every gradient.

Triton runs the kernels on CPU tensors under its interpreter, which is switched on by TRITON_INTERPRET=1 before
triton is first imported. The suite imports triton long before this file (mamba-ssm does), so the interpreted
checks run in one subprocess that executes this file as a script; the tests read its report. Tiny tiles give
several channel blocks, chunks and state segments on tiny inputs.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

# max |Triton - reference| / max |reference| per output, last state and gradient; fp32 holds to ~1e-6 here. bf16:
# both round fp32 results to bf16, and the reference computes silu(z) in bf16 (Triton, like mamba-ssm's CUDA
# kernel, in fp32), which moves its results by up to ~4e-3
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# a whole model's parameter gradients carry the scan's rounding (exp2 with a log2(e)-scaled A, as the CUDA kernel
# does; the softplus series) through the later layers: ~7e-6 here, where mambapy's pure-torch scan gets ~1e-6
MODEL_TOLERANCE = 2e-5
SMALL_TILES = dict(block_d=4, chunk=4, backward_chunk=4, segment=8, length_multiple=1)  # unpadded: the masks
# the scan on inputs padded to a multiple of 16 steps against the same scan unpadded: identical, bit for bit
PADDED = {
    "softplus and bias, strided views": dict(batch=2, dim=4, dstate=4, length=13, B="shared", C="shared", views=True),
    "no softplus, no bias, grouped": dict(batch=1, dim=4, dstate=4, length=11, B="grouped", C="grouped",
                                          softplus=False, bias=False),
    "bf16, constant B": dict(batch=2, dim=4, dstate=4, length=10, B="constant", C="shared", dtype=torch.bfloat16),
}
CASES = {
    # (b, n, l) B and C shared by all channels; u, delta and z are strided views as in mamba-ssm's Mamba.forward
    "shared, all options, strided views": dict(batch=2, dim=6, dstate=4, length=19, B="shared", C="shared",
                                               views=True),
    "constant B and C, no D, no bias": dict(batch=2, dim=5, dstate=3, length=11, B="constant", C="constant",
                                           D=False, bias=False),
    "grouped, no z, no softplus": dict(batch=2, dim=8, dstate=4, length=13, B="grouped", C="grouped", z=False,
                                       softplus=False, last=False, tiles=dict(SMALL_TILES, block_d=8)),
    "length 1": dict(batch=3, dim=4, dstate=4, length=1, B="shared", C="shared"),
    "constant B, shared C, default tiles": dict(batch=2, dim=6, dstate=4, length=9, B="constant", C="shared",
                                                tiles={}),
    "bf16 inputs, default tiles": dict(batch=2, dim=4, dstate=4, length=10, B="shared", C="shared",
                                       dtype=torch.bfloat16, tiles={}),
}


def make_case(batch, dim, dstate, length, B, C, D=True, z=True, bias=True, softplus=True, last=True, views=False,
              dtype=torch.float32, tiles=None):
    """(leaf tensors, a function of the leaves giving selective_scan_fn's arguments, its keyword options)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    def matrix(layout):
        return {"shared": lambda: randn(batch, dstate, length),
                "constant": lambda: randn(dim, dstate, dt=torch.float32),
                "grouped": lambda: randn(batch, 2, dstate, length)}[layout]()

    leaves = dict(xz=randn(batch, 2 * dim, length),
                  delta=(randn(dim, batch * length, scale=0.5) - 1.0 if softplus else
                         (torch.rand(dim, batch * length, generator=g) * 0.4).to(dtype)),
                  A=-torch.rand(dim, dstate, generator=g) * 3 - 0.2, B=matrix(B), C=matrix(C),
                  D=randn(dim, dt=torch.float32) if D else None, bias=randn(dim, scale=0.3, dt=torch.float32)
                  if bias else None)

    def arguments(t):
        u, gate = t["xz"][:, :dim], t["xz"][:, dim:]  # channel slices of one tensor, as in Mamba.forward
        delta = t["delta"].view(dim, batch, length).permute(1, 0, 2)  # (b, d, l) with d as the slowest axis
        if not views:
            u, delta, gate = u.contiguous(), delta.contiguous(), gate.contiguous()
        return u, delta, t["A"], t["B"], t["C"], t["D"], gate if z else None, t["bias"]

    options = dict(delta_softplus=softplus, return_last_state=last)
    return leaves, arguments, options, tiles if tiles is not None else SMALL_TILES


def run(scan, leaves, arguments, options):
    """Outputs (and last state) of `scan` and the gradients of all leaves for a fixed random upstream gradient."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items() if v is not None}
    args = arguments({k: leaves.get(k) for k in ("xz", "delta", "A", "B", "C", "D", "bias")})
    result = scan(*args, **options)
    out, last = result if options["return_last_state"] else (result, None)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(upstream)
    return out, last, {f"d{k}": v.grad for k, v in leaves.items()}


def compare(case: dict) -> dict:
    """Per quantity, max |Triton - reference| / max |reference|; and whether the dtypes agree."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    from ssmcompress.selective_scan import Tiles, selective_scan_fn

    leaves, arguments, options, tiles = make_case(**case)
    reference = run(lambda *a, **k: selective_scan_ref(*a[:5], a[5], z=a[6], delta_bias=a[7], **k), leaves,
                    arguments, options)
    triton_scan = run(lambda *a, **k: selective_scan_fn(*a, **k, tiles=Tiles(**tiles)), leaves, arguments, options)
    report = {"dtypes agree": all(
        (x is None and y is None) or x.dtype == y.dtype
        for x, y in [(triton_scan[0], reference[0]), (triton_scan[1], reference[1])]
        + [(triton_scan[2][k], reference[2][k]) for k in reference[2]])}
    pairs = {"out": (triton_scan[0], reference[0]), "last state": (triton_scan[1], reference[1]),
             **{k: (triton_scan[2][k], reference[2][k]) for k in reference[2]}}
    for name, (got, expected) in pairs.items():
        if expected is not None:
            got, expected = got.double(), expected.double()
            report[name] = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    return report


def compare_padding(case: dict) -> dict:
    """Per quantity, max |padded - unpadded| (both Triton, small tiles; the padded run to a multiple of 16)."""
    from ssmcompress.selective_scan import Tiles, selective_scan_fn

    leaves, arguments, options, tiles = make_case(**case)
    runs = [run(lambda *a, **k: selective_scan_fn(*a, **k, tiles=Tiles(**dict(tiles, length_multiple=m))), leaves,
                arguments, options) for m in (16, 1)]
    pairs = {"out": (runs[0][0], runs[1][0]), "last state": (runs[0][1], runs[1][1]),
             **{k: (runs[0][2][k], runs[1][2][k]) for k in runs[1][2]}}
    return {name: (a.double() - b.double()).abs().max().item() for name, (a, b) in pairs.items()}


def compare_model() -> dict:
    """A tiny Mamba-1 LM whose scans compat routes to Triton, against the same model on the reference: logits and
    all parameter gradients of a forward, and the logits of a decoding step after a prefill (which hands the
    scan's last state to mamba-ssm's state update)."""
    from mamba_ssm.utils.generation import InferenceParams

    from conftest import tiny_model
    from ssmcompress import compat

    model = tiny_model(1, d_model=16, n_layer=2)  # 32 channels: one program per sequence and layer
    ids = torch.randint(1, 4096, (2, 9), generator=torch.Generator().manual_seed(0))
    routed = compat.mamba1_scan

    def run(route):
        compat.mamba1_scan = lambda device: route
        try:
            model.zero_grad()
            logits = model(ids).logits
            logits.square().mean().backward()
            with torch.no_grad():
                params = InferenceParams(max_seqlen=16, max_batch_size=2)
                model(ids, inference_params=params)
                params.seqlen_offset += ids.shape[1]
                step = model(ids[:, -1:], inference_params=params).logits
        finally:
            compat.mamba1_scan = routed
        return {"logits": logits, "decoding step": step, **{n: p.grad.clone() for n, p in model.named_parameters()}}

    reference, triton_scan = run("ref"), run("triton")
    return {k: ((triton_scan[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)).item()
            for k, v in reference.items()}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_all_gradients_match_mamba_ssm_reference(interpreted, name):
    report = dict(interpreted[name])
    assert report.pop("dtypes agree")
    tolerance = TOLERANCE[CASES[name].get("dtype", torch.float32)]
    assert {k: v for k, v in report.items() if not v <= tolerance} == {}, report
    expected = {"out", "dxz", "ddelta", "dA", "dB", "dC"} | ({"last state"} if CASES[name].get("last", True) else set())
    assert expected <= set(report)


@pytest.mark.parametrize("name", list(PADDED))
def test_padding_the_length_to_a_multiple_of_16_changes_no_bit(interpreted, name):
    report = interpreted["padded"][name]
    assert {"out", "last state", "dxz", "ddelta", "dB", "dC", "dA"} <= set(report)
    assert {k: v for k, v in report.items() if v != 0} == {}, report


def test_padding_is_skipped_where_the_padded_steps_would_decay_the_state():
    from ssmcompress.selective_scan import Tiles, _padding

    assert _padding(1043, Tiles(), delta_softplus=True, delta_bias=torch.zeros(3)) == 13
    assert _padding(1043, Tiles(), delta_softplus=False, delta_bias=None) == 13
    assert _padding(1040, Tiles(), delta_softplus=True, delta_bias=None) == 0
    assert _padding(1043, Tiles(), delta_softplus=False, delta_bias=torch.zeros(3)) == 0  # bias + 0 would be a step


def test_tiny_mamba1_lm_on_the_triton_route_matches_the_reference(interpreted):
    report = interpreted["model"]
    assert {"logits", "decoding step", "backbone.layers.0.mixer.A_log", "backbone.embedding.weight"} <= set(report)
    assert {k: v for k, v in report.items() if not v <= MODEL_TOLERANCE} == {}, report


def test_complex_A_and_bad_shapes_are_refused_before_any_work():
    from ssmcompress.selective_scan import selective_scan_fn

    u = torch.randn(2, 4, 5)
    B = torch.randn(2, 3, 5)
    with pytest.raises(NotImplementedError, match="complex A"):
        selective_scan_fn(u, u, torch.randn(4, 3, dtype=torch.complex64), B, B)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_fn(u, u, torch.randn(4, 3), torch.randn(2, 3, 4), B)
    with pytest.raises(ValueError, match="groups dividing"):
        selective_scan_fn(u, u, torch.randn(4, 3), torch.randn(2, 3, 3, 5), B)
    with pytest.raises(ValueError, match="D must be"):
        selective_scan_fn(u, u, torch.randn(4, 3), B, B, D=torch.randn(3))


if __name__ == "__main__":  # the interpreted checks (TRITON_INTERPRET=1 set by the `interpreted` fixture)
    from ssmcompress import compat

    compat.install()  # mamba-ssm imports its compiled extension unconditionally
    torch.set_num_threads(1)
    print(json.dumps({**{name: compare(case) for name, case in CASES.items()}, "model": compare_model(),
                      "padded": {name: compare_padding(case) for name, case in PADDED.items()}}))
