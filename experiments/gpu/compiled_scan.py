"""The anchor for the Triton Mamba-1 scan: mamba-ssm's compiled `selective_scan_cuda`, built for the GPU at hand, timed
beside `ssmcompress.selective_scan` at mamba-2.8b's shapes, and mamba-ssm's own scan tests run against our kernel.

    python experiments/gpu/compiled_scan.py build SDIST BUILD_DIR     # mamba-ssm's sdist (.tar.gz): its csrc, its flags
    python experiments/gpu/compiled_scan.py time BUILD_DIR OUT.json   # forward and forward+backward, both scans
    python experiments/gpu/compiled_scan.py tests TEST_FILE OUT.json [--shard K/N] [--skip N] [--compiled BUILD_DIR]
                                                                      # mamba-ssm's tests/ops/test_selective_scan.py
    python experiments/gpu/compiled_scan.py merge OUT.json SHARD.json...  # the shards' reports in one

`build` compiles the ten sources of mamba-ssm's setup.py with its nvcc flags, for this GPU's architecture only (the
sdist builds seven; one takes minutes with ninja's parallel jobs, MAX_JOBS). `time` imports the built module first,
so that mamba-ssm's `selective_scan_fn` is the compiled one, and compares it with ours on the same inputs (max
difference, CUDA-event medians). `tests` runs mamba-ssm's `test_selective_scan` (the file from state-spaces/mamba,
which its sdist does not ship) over the values its comments list (itype fp32/fp16/bf16, lengths 8..4096 with the
odd ones, every B/C layout; D, z, delta bias, softplus and the last state on, and each off in turn: 2340 cases), with
its `selective_scan_fn` bound to our Triton scan; our kernel refuses complex weights, so that half is reported as
refused.
"""
import importlib.util
import itertools
import json
import os
import sys
import tarfile
import tempfile
import traceback
from pathlib import Path

import torch

FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
         "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__",
         "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr", "--expt-extended-lambda",
         "--use_fast_math", "-lineinfo"]  # mamba-ssm 2.3.2's setup.py, without --ptxas-options=-v
SOURCES = ["selective_scan.cpp"] + [f"selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")] + [
    f"selective_scan_bwd_{t}_{w}.cu" for t in ("fp32", "fp16", "bf16") for w in ("real", "complex")]


def build(sdist: str, build_dir: str) -> None:
    from torch.utils.cpp_extension import load

    source = Path(tempfile.mkdtemp())
    with tarfile.open(sdist) as archive:
        archive.extractall(source, filter="data")
    csrc = next(source.glob("*/csrc/selective_scan"))
    major, minor = torch.cuda.get_device_capability()
    arch = f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"
    Path(build_dir).mkdir(parents=True, exist_ok=True)
    module = load("selective_scan_cuda", [str(csrc / name) for name in SOURCES], extra_cflags=["-O3", "-std=c++17"],
                  extra_cuda_cflags=FLAGS + [arch], extra_include_paths=[str(csrc)], build_directory=build_dir,
                  verbose=True)
    print("built", module.__file__)


def load_built(build_dir: str):
    """The built module, importable as `selective_scan_cuda` before mamba-ssm (and compat) import it."""
    path = next(Path(build_dir).glob("selective_scan_cuda*.so"))
    spec = importlib.util.spec_from_file_location("selective_scan_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["selective_scan_cuda"] = module
    return module


def scan_inputs(batch, length, dim=5120, dstate=16, dtype=torch.bfloat16, grad=False):
    """mamba-2.8b's mixer: d_inner 5120, d_state 16, B and C (b, n, l), D, z, delta bias, softplus."""
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, device="cuda", dtype=dt).requires_grad_(grad)  # noqa: E731
    return dict(u=r(batch, dim, length), delta=(0.5 * torch.rand(batch, dim, length, generator=g, device="cuda",
                                                                  dtype=dtype)).requires_grad_(grad),
                A=(-torch.rand(dim, dstate, generator=g, device="cuda")).requires_grad_(grad),
                B=r(batch, dstate, length), C=r(batch, dstate, length), D=r(dim, dt=torch.float32),
                z=r(batch, dim, length), delta_bias=(0.5 * torch.rand(dim, generator=g, device="cuda")).requires_grad_(grad),
                delta_softplus=True)


def time_scans(build_dir: str, out: str) -> None:
    load_built(build_dir)
    from ssmcompress import compat, selective_scan
    from ssmcompress.metrics import efficiency

    compat.install()
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as compiled

    assert compat.HAS_SELECTIVE_SCAN_CUDA, "the built selective_scan_cuda was not picked up"
    rows = []
    for batch, length in ((8, 2048), (1, 8192)):
        for backward in (False, True):
            x = scan_inputs(batch, length, grad=backward)
            row = dict(batch=batch, length=length, pass_="forward+backward" if backward else "forward")
            for name, scan in (("compiled", compiled), ("triton", selective_scan.selective_scan_fn)):
                def call(scan=scan):
                    y = scan(**x)
                    if backward:
                        y.float().sum().backward()
                    return y
                with torch.set_grad_enabled(backward):
                    row[f"{name}_ms"] = efficiency.median_ms(call, "cuda")
                    row[f"{name}_out"] = call().float()
            compiled_out, triton_out = row.pop("compiled_out"), row.pop("triton_out")
            row["max_abs_diff"] = (compiled_out - triton_out).abs().max().item()
            row["max_abs_output"] = compiled_out.abs().max().item()  # bf16 outputs: the diff is in units of its ulp
            row["triton_over_compiled"] = row["triton_ms"] / row["compiled_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows),
                                    indent=1))


# the values in the comments of mamba-ssm's test_selective_scan (its active grid is a subset): every weight type,
# input type, length and B/C layout, with the test's active options (all on) and with each option off in turn
SWEPT = dict(wtype=[torch.float32, torch.complex64], itype=[torch.float32, torch.float16, torch.bfloat16],
             seqlen=[8, 16, 32, 64, 128, 256, 372, 512, 784, 1024, 1134, 2048, 4096])
LAYOUTS = [dict(is_variable_B=b, is_variable_C=c, varBC_groups=1) for b in (False, True) for c in (False, True)] + [
    dict(is_variable_B=True, is_variable_C=True, varBC_groups=2)]
OPTIONS = ("return_last_state", "has_delta_bias", "delta_softplus", "has_z", "has_D")


def cases():
    for values in itertools.product(*SWEPT.values()):
        for layout in LAYOUTS:
            for off in (None,) + OPTIONS:
                yield dict(zip(SWEPT, values), **layout, **{option: option != off for option in OPTIONS})


def run_tests(test_file: str, out: str, *options: str) -> None:
    """mamba-ssm's test over the grid (`cases`), on our Triton scan; options: --shard K/N (every N-th case from the
    K-th: processes side by side), --skip N (cases a cut run already did), --compiled BUILD_DIR (mamba-ssm's own
    compiled kernel instead: does it pass the same cases?), --only FAILED.json (the failed cases of a report)."""
    given = dict(zip(options[::2], options[1::2]))
    shard, shards = map(int, given.get("--shard", "0/1").split("/"))
    if "--compiled" in given:
        load_built(given["--compiled"])
    from ssmcompress import compat, selective_scan

    compat.install()
    spec = importlib.util.spec_from_file_location("mamba_ssm_scan_tests", test_file)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    if "--compiled" not in given:
        tests.selective_scan_fn = selective_scan.selective_scan_fn  # what the test calls its kernel
    test = getattr(tests.test_selective_scan, "__wrapped__", tests.test_selective_scan)
    grid = list(cases())
    if "--only" in given:
        failed = [{k: v for k, v in f.items() if k != "error"} for f in json.loads(Path(given["--only"]).read_text())["failed"]]
        grid = [case for case in grid if {k: str(v) for k, v in case.items()} in failed]
    grid = grid[int(given.get("--skip", 0)):][shard::shards]
    results = dict(kernel="mamba-ssm compiled" if "--compiled" in given else "ssmcompress Triton", shard=f"{shard}/{shards}",
                   skipped=int(given.get("--skip", 0)), cases=len(grid), passed=0, failed=[], refused=0)
    save = lambda: Path(out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), **results),  # noqa: E731
                                                   indent=1))
    for number, case in enumerate(grid):
        if number % 50 == 0:  # what a cut run has done so far stays on disk
            save()
            print(f"{number} cases: {results['passed']} passed, {len(results['failed'])} failed", flush=True)
        try:
            test(**case)
            results["passed"] += 1
        except Exception as error:  # noqa: BLE001 - every failure is reported with its case
            if case["wtype"] == torch.complex64 and "complex" in str(error).lower():
                results["refused"] += 1
                continue
            results["failed"].append(dict({k: str(v) for k, v in case.items()}, error=traceback.format_exception_only(
                type(error), error)[-1].strip()[:300]))
    results["complete"] = True
    save()
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in results.items()}))


def merge(out: str, *parts: str) -> None:
    """One report from the shards' reports: counts added, failures listed, complete where every shard was."""
    reports = [json.loads(Path(part).read_text()) for part in parts]
    merged = dict(device=reports[0]["device"], kernel=reports[0]["kernel"], skipped=reports[0]["skipped"],
                  shards=len(reports), complete=all(r.get("complete", False) for r in reports),
                  **{key: sum(r[key] for r in reports) for key in ("cases", "passed", "refused")},
                  failed=[f for r in reports for f in r["failed"]])
    Path(out).write_text(json.dumps(merged, indent=1))
    print(json.dumps({k: (len(v) if isinstance(v, list) else v) for k, v in merged.items()}))


if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count()))
    {"build": build, "time": time_scans, "tests": run_tests, "merge": merge}[sys.argv[1]](*sys.argv[2:])
