"""GPU check of the Triton selective scan (`ssmcompress.selective_scan`) against mamba-ssm's `selective_scan_ref`.

1. Correctness over a grid of shapes (lengths 1 to 2048, not powers of two, batch > 1, the three B/C layouts,
   fp32 and bf16, with and without D, z, delta_bias, softplus, the last state): outputs, last states and the
   gradients of every input, as max |Triton - reference| / max |reference| (absolute where the reference is
   exactly zero), pass/fail against TOLERANCE.
2. Timings at mamba-2.8b size (batch 8, length 2048, d_inner 5120, d_state 16, bf16; CUDA events, median) of the
   Triton scan, the reference and mambapy's parallel scan, forward and forward+backward, with two lower bounds
   for the forward: memory (inputs read once, output written once, at HBM_BYTES_PER_S) and the special-function
   units (one exp2 per channel, step and state, 16 per clock per SM).
3. A sweep of the Triton kernels' tiles (`selective_scan.Tiles`) at that size.

    python experiments/gpu/check_selective_scan.py OUT     # on a GPU; wheels as in experiments/gpu/efficiency.sh
    TRITON_INTERPRET=1 python experiments/gpu/check_selective_scan.py OUT --smoke   # CPU: a tiny grid and sizes

Writes OUT/check_selective_scan.json and OUT/check_selective_scan.txt; exits 1 if a correctness case fails.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from ssmcompress import compat

compat.install()  # mamba-ssm imports its compiled extension unconditionally

from mamba_ssm.ops.selective_scan_interface import selective_scan_ref  # noqa: E402

from ssmcompress.selective_scan import Tiles, selective_scan_fn  # noqa: E402

# max |Triton - reference| / max |reference| over every output and gradient. fp32: the kernels use the GPU's
# approximate exp2 and division (~2 ulp) over up to 2048 steps; bf16: both round fp32 results to bf16, and the
# reference computes silu(z) in bf16
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e, the datasheet figure
SFU_EXP2_PER_CLOCK_PER_SM = 16  # special-function units of an SM (sm_80/sm_90)
MAMBA_2P8B = dict(batch=8, dim=5120, dstate=16, length=2048)
SWEEP = [Tiles(), Tiles(block_d=64), Tiles(block_d=128), Tiles(maxnreg=200), Tiles(block_d=64, maxnreg=200),
         Tiles(backward_chunk=4), Tiles(block_d=64, backward_chunk=4), Tiles(segment=32)]


def grid(smoke: bool) -> list[dict]:
    if smoke:
        return [dict(batch=2, dim=6, dstate=4, length=11, B="shared", C="shared"),
                dict(batch=1, dim=4, dstate=3, length=1, B="constant", C="grouped", dtype=torch.bfloat16),
                dict(batch=2, dim=8, dstate=4, length=9, B="grouped", C="grouped", z=False, softplus=False)]
    layouts = (("shared", "shared"), ("constant", "constant"), ("grouped", "grouped"), ("constant", "shared"))
    cases = [dict(batch=2, dim=96, dstate=16, length=length, B=B, C=C) for length in (1, 7, 200, 2048)
             for B, C in layouts]
    cases += [dict(batch=2, dim=96, dstate=16, length=length, B=B, C=C, dtype=torch.bfloat16)
              for length, (B, C) in [(1, layouts[0]), (333, layouts[0]), (2048, layouts[0]), (333, layouts[2]),
                                     (2048, layouts[2]), (200, layouts[1]), (200, layouts[3])]]
    cases += [dict(batch=3, dim=320, dstate=16, length=333, B="shared", C="shared", D=False, z=False, bias=False,
                   softplus=False, last=False),
              dict(batch=4, dim=256, dstate=5, length=65, B="shared", C="shared", dtype=torch.bfloat16, z=False),
              dict(batch=1, dim=40, dstate=16, length=130, B="grouped", C="grouped", bias=False, last=False)]
    return cases


def make_inputs(batch, dim, dstate, length, B, C, device, dtype=torch.float32, D=True, z=True, bias=True,
                softplus=True, last=True):
    """selective_scan_fn's arguments as mamba-ssm's Mamba builds them: u and z channel slices of one tensor, delta
    (b, d, l) with d slowest, A = -exp(A_log) from S4D-real init, dt bias the inverse softplus of dt in
    [1e-3, 1e-1] (without softplus: delta and bias themselves small and positive); grouped B/C have 4 groups (2 where
    the channel count is not a multiple of 4)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    groups = 4 if dim % 4 == 0 else 2
    matrix = {"shared": lambda: randn(batch, dstate, length),
              "constant": lambda: randn(dim, dstate, dt=torch.float32),
              "grouped": lambda: randn(batch, groups, dstate, length)}
    xz = randn(batch, 2 * dim, length)
    dt = torch.exp(torch.rand(dim, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    delta_raw = randn(dim, batch * length).view(dim, batch, length).permute(1, 0, 2) * 0.5
    delta = delta_raw if softplus else (torch.rand(batch, dim, length, generator=g) * 0.1).to(device, dtype)
    A = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1).to(device)
    dt_bias = dt + torch.log(-torch.expm1(-dt)) if softplus else dt  # softplus(dt_bias) = dt
    return dict(u=xz[:, :dim], delta=delta, A=A, B=matrix[B](), C=matrix[C](),
                D=randn(dim, dt=torch.float32) if D else None, z=xz[:, dim:] if z else None,
                delta_bias=dt_bias.to(device) if bias else None, delta_softplus=softplus, return_last_state=last)


ARGUMENTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def prepare(inputs: dict, requires_grad: bool):
    """(the tensor arguments as fresh leaves, the options, a fixed random upstream gradient for the output)."""
    leaves = {k: v.detach().clone().requires_grad_(requires_grad) for k, v in inputs.items() if torch.is_tensor(v)}
    upstream = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1)).to(inputs["u"])
    return leaves, {k: inputs[k] for k in ("delta_softplus", "return_last_state")}, upstream


def call(scan, leaves: dict, options: dict, upstream=None) -> tuple:
    """The outputs of one call; with `upstream`, the backward too (into the leaves' .grad, reset first)."""
    for leaf in leaves.values():
        leaf.grad = None
    result = scan(**{k: leaves.get(k) for k in ARGUMENTS}, **options)
    outputs = result if isinstance(result, tuple) else (result,)
    if upstream is not None:
        outputs[0].backward(upstream)
    return outputs


def run(scan, inputs: dict):
    """(outputs, gradients of every tensor input) of one call."""
    leaves, options, upstream = prepare(inputs, requires_grad=True)
    outputs = call(scan, leaves, options, upstream)
    return outputs, {f"d{k}": v.grad for k, v in leaves.items()}


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, **options):
    return selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, **options)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|; where the reference b is exactly zero (dA at length 1: the state entering the scan is
    zero, so nothing depends on A) the absolute error, as a relative one would divide rounding by zero."""
    scale = b.double().abs().max()
    return ((a.double() - b.double()).abs().max() / (scale if scale > 0 else 1.0)).item()


def correctness(case: dict, device, tiles: Tiles) -> dict:
    inputs = make_inputs(**case, device=device)
    (ref_out, ref_grads), (tri_out, tri_grads) = run(reference_scan, inputs), run(
        lambda **k: selective_scan_fn(**k, tiles=tiles), inputs)
    pairs = {"out": (tri_out[0], ref_out[0]), **({"last_state": (tri_out[1], ref_out[1])} if len(ref_out) > 1 else {}),
             **{k: (tri_grads[k], ref_grads[k]) for k in ref_grads}}
    errors = {k: relative_error(a, b) for k, (a, b) in pairs.items()}
    dtypes_agree = all(a.dtype == b.dtype for a, b in pairs.values())
    tolerance = TOLERANCE[case.get("dtype", torch.float32)]
    return dict(errors=errors, dtypes_agree=dtypes_agree, tolerance=tolerance,
                passed=dtypes_agree and all(e <= tolerance for e in errors.values()))


def timed(fn, warmup: int, repeats: int, device) -> dict:
    """Median seconds of fn() (CUDA events on a GPU) and the peak memory it allocated beyond what was held."""
    for _ in range(warmup):
        fn()
    seconds = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - held if device.type == "cuda" else None
    return dict(ms=1000 * statistics.median(seconds), repeats=repeats, peak_mib=peak / 2 ** 20 if peak else None)


def sm_clock_hz() -> float:
    """The GPU's maximum SM clock (nvidia-smi), else the H200's 1.98 GHz."""
    try:
        mhz = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()[0]
        return float(mhz) * 1e6
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return 1.98e9


def bounds(shape: dict, device) -> dict:
    """Lower bounds of the bf16 forward (no state kept): bytes moved once, and one exp2 per element of the state."""
    b, d, n, l = shape["batch"], shape["dim"], shape["dstate"], shape["length"]
    elem = 2
    read = 3 * b * d * l * elem + 2 * b * n * l * elem + d * n * 4 + 2 * d * 4  # u, delta, z; B, C; A, D, bias
    write = b * d * l * elem
    exps = b * d * l * n
    out = dict(bytes_read=read, bytes_written=write, hbm_bytes_per_s=HBM_BYTES_PER_S,
               memory_bound_ms=1000 * (read + write) / HBM_BYTES_PER_S, exp2_count=exps)
    if device.type == "cuda":
        sms, clock = torch.cuda.get_device_properties(device).multi_processor_count, sm_clock_hz()
        out.update(sms=sms, sm_clock_hz=clock, sfu_bound_ms=1000 * exps / (SFU_EXP2_PER_CLOCK_PER_SM * sms * clock))
    return out


def timings(shape: dict, device, smoke: bool) -> dict:
    inputs = make_inputs(**shape, B="shared", C="shared", device=device, dtype=torch.bfloat16, last=False)
    frozen, options, _ = prepare(inputs, requires_grad=False)
    leaves, _, upstream = prepare(inputs, requires_grad=True)

    def forward(scan):
        def inference():
            with torch.no_grad():
                call(scan, frozen, options)
        return inference

    def train_step(scan):
        return lambda: call(scan, leaves, options, upstream)

    methods = {"triton": selective_scan_fn, "reference": reference_scan,
               "mambapy parallel": compat.selective_scan_parallel}
    report = {}
    for name, scan in methods.items():
        repeats = 1 if smoke else (10 if name == "triton" else 3)
        for kind, make in (("forward", forward), ("forward+backward", train_step)):
            try:
                report[f"{name} {kind}"] = timed(make(scan), warmup=1 if smoke else 2, repeats=repeats, device=device)
            except Exception as error:  # noqa: BLE001 - a method that cannot run at this size is reported, not fatal
                report[f"{name} {kind}"] = dict(error=f"{type(error).__name__}: {error}"[:300])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def sweep(shape: dict, device, smoke: bool) -> dict:
    inputs = make_inputs(**shape, B="shared", C="shared", device=device, dtype=torch.bfloat16, last=False)
    frozen, options, _ = prepare(inputs, requires_grad=False)
    leaves, _, upstream = prepare(inputs, requires_grad=True)
    report = {}
    for tiles in (SWEEP[:2] if smoke else SWEEP):
        key = " ".join(f"{k}={v}" for k, v in tiles._asdict().items() if v != Tiles._field_defaults[k]) or "defaults"

        def scan(**k):
            return selective_scan_fn(**k, tiles=tiles)
        try:
            forward = timed(lambda: call(scan, frozen, options), warmup=1, repeats=1 if smoke else 10, device=device)
            step = timed(lambda: call(scan, leaves, options, upstream), warmup=1, repeats=1 if smoke else 5,
                         device=device)
            report[key] = {"forward ms": forward["ms"], "forward+backward ms": step["ms"]}
        except Exception as error:  # noqa: BLE001 - e.g. a register cap this Triton does not accept
            report[key] = dict(error=f"{type(error).__name__}: {error}"[:300])
    return report


def text_report(result: dict) -> str:
    cases, shape, bound = result["cases"], result["shape"], result["bounds"]
    lines = [f"device: {result['device']}  torch {result['torch']}  triton {result['triton']}", "",
             f"correctness: {sum(c['passed'] for c in cases)}/{len(cases)} passed (max |Triton - reference| / "
             f"max |reference| per output and gradient; tolerance fp32 {TOLERANCE[torch.float32]:g}, "
             f"bf16 {TOLERANCE[torch.bfloat16]:g})"]
    for case in cases:
        verdict = "PASS" if case["passed"] else "FAIL"
        if "errors" in case:
            worst = max(case["errors"], key=case["errors"].get)
            detail = f"worst {worst} {case['errors'][worst]:.1e}" + ("" if case["dtypes_agree"] else ", dtypes differ")
        else:
            detail = case["error"].strip().splitlines()[-1]
        lines.append(f"  {verdict}  {case['case']}: {detail}")
    moved = (bound["bytes_read"] + bound["bytes_written"]) / 1e6
    memory = f"memory {bound['memory_bound_ms']:.3f} ms ({moved:.0f} MB at {bound['hbm_bytes_per_s'] / 1e12:.1f} TB/s)"
    sfu = f", exp2 units {bound['sfu_bound_ms']:.3f} ms ({bound['exp2_count'] / 1e9:.2f} G exp2 at " \
          f"{SFU_EXP2_PER_CLOCK_PER_SM}/clock x {bound['sms']} SMs x {bound['sm_clock_hz'] / 1e9:.2f} GHz)" \
        if "sfu_bound_ms" in bound else ""
    lines += ["", f"timings at {shape}, bf16, median (peak memory beyond the inputs)",
              f"  lower bounds of the forward: {memory}{sfu}"]
    for key, t in result["timings"].items():
        if "error" in t:
            lines.append(f"  {key:<34} {t['error']}")
            continue
        ratio = f"  = {t['ms'] / bound['memory_bound_ms']:.2f} x memory bound" if key == "triton forward" else ""
        peak = f"  ({t['peak_mib']:.0f} MiB)" if t.get("peak_mib") else ""
        lines.append(f"  {key:<34} {t['ms']:10.3f} ms{peak}{ratio}")
    lines += ["", "Triton tiles at that size (median ms):"]
    for key, t in result["sweep"].items():
        times = t["error"] if "error" in t else \
            f"forward {t['forward ms']:.3f}   forward+backward {t['forward+backward ms']:.3f}"
        lines.append(f"  {key:<36} {times}")
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path) -> None:
    (out / "check_selective_scan.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny grid and sizes (CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep of tiles")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no GPU: run with TRITON_INTERPRET=1 (and --smoke) to check the script on a CPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's einsums in fp32
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__, cases=[])
    tiles = Tiles(block_d=4, chunk=4, backward_chunk=4, segment=8) if args.smoke else Tiles()
    for case in grid(args.smoke):
        name = ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in case.items())
        try:
            result["cases"].append(dict(case=name, **correctness(case, device, tiles)))
        except Exception as error:  # noqa: BLE001 - one broken case must not hide the others
            result["cases"].append(dict(case=name, passed=False, error=traceback.format_exc()[-1500:]))
            print(error, file=sys.stderr)
        print(("PASS " if result["cases"][-1]["passed"] else "FAIL ") + name, flush=True)
    shape = dict(batch=1, dim=32, dstate=4, length=16) if args.smoke else MAMBA_2P8B
    result.update(shape=shape, bounds=bounds(shape, device), timings={}, sweep={})
    save(result, args.out)  # after each part, so that a run stopped by its time limit still reports
    result["timings"] = timings(shape, device, args.smoke)
    save(result, args.out)
    if not args.no_sweep:
        result["sweep"] = sweep(shape, device, args.smoke)
        save(result, args.out)
    report = text_report(result)
    (args.out / "check_selective_scan.txt").write_text(report)
    print(report)
    sys.exit(0 if all(c["passed"] for c in result["cases"]) else 1)


if __name__ == "__main__":
    main()
