"""Why a reduced Mamba-1 runs slower per token than dense: one Mamba-1 mixer of a given size timed at several
sequence lengths, whole and step by step (the steps of mamba-ssm's unfused `Mamba.forward`, the path taken without
the compiled causal-conv1d / selective-scan extensions), and with the input padded at the end to a multiple of 16
(causal: the first `length` outputs are unchanged), so that a slowdown at unaligned lengths shows where it is.

    python experiments/gpu/mamba1_lengths.py OUT.jsonl [d_model] [batch] [lengths]
    python experiments/gpu/mamba1_lengths.py m1.jsonl 2560 8 2048,1860,1856,1043,1040    # mamba-2.8b's mixer

Without the compiled CUDA extension the scan is ssmcompress.selective_scan (Triton). One JSON line per (length,
step): milliseconds (median of CUDA-event timings; wall clock on a CPU) and microseconds per token; a table is
printed. Its H200 records, before and after the scan padded its inputs: results/gpu/mamba1_lengths.jsonl.
"""
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from einops import rearrange

from ssmcompress import compat
from ssmcompress.metrics import efficiency

compat.install()  # the kernel routing, before mamba_ssm is imported
import mamba_ssm.modules.mamba_simple as mamba_simple  # noqa: E402

Mamba = mamba_simple.Mamba


def timed(fn, probe: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of `fn()`, timed as the efficiency benchmark times a forward (CUDA events where `probe`
    is on a GPU, else the wall clock)."""
    seconds = [efficiency.time_call(lambda _: fn(), probe) for _ in range(warmup + repeats)]
    return 1000 * statistics.median(seconds[warmup:])


def steps(m: Mamba, h: torch.Tensor) -> dict:
    """Each step of the unfused forward as a closure over its inputs (computed once here)."""
    b, l, _ = h.shape
    xz = rearrange(m.in_proj.weight @ rearrange(h, "b l d -> d (b l)"), "d (b l) -> b d l", l=l)
    x, z = xz.chunk(2, dim=1)
    xc = m.act(m.conv1d(x)[..., :l])
    x_dbl = m.x_proj(rearrange(xc, "b d l -> (b l) d"))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = rearrange(m.dt_proj.weight @ dt.t(), "d (b l) -> b d l", l=l)
    Bl = rearrange(B, "(b l) n -> b n l", l=l).contiguous()
    Cl = rearrange(C, "(b l) n -> b n l", l=l).contiguous()
    A = -torch.exp(m.A_log.float())

    def scan(u, dl, zz):  # mamba_simple's selective_scan_fn, as ssmcompress.compat routes it
        return mamba_simple.selective_scan_fn(u, dl, A, Bl, Cl, m.D.float(), z=zz, delta_bias=m.dt_proj.bias.float(),
                                              delta_softplus=True)

    y = scan(xc, delta, z)
    return {
        "in_proj": lambda: m.in_proj.weight @ rearrange(h, "b l d -> d (b l)"),
        "conv1d": lambda: m.act(m.conv1d(x)[..., :l]),
        "conv1d_contiguous_in": lambda: m.act(m.conv1d(x.contiguous())[..., :l]),
        "conv1d_functional": lambda: F.silu(F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1,
                                                     groups=x.shape[1])[..., :l]),
        "x_proj": lambda: m.x_proj(rearrange(xc, "b d l -> (b l) d")),
        "dt_proj": lambda: m.dt_proj.weight @ dt.t(),
        "B_C_layout": lambda: (rearrange(B, "(b l) n -> b n l", l=l).contiguous(),
                               rearrange(C, "(b l) n -> b n l", l=l).contiguous()),
        "scan": lambda: scan(xc, delta, z),
        "scan_contiguous_inputs": (lambda d=delta.contiguous(), zz=z.contiguous(): scan(xc, d, zz)),
        "out_proj": lambda: m.out_proj(rearrange(y, "b d l -> b l d")),
    }


def main() -> None:
    out = sys.argv[1]
    d_model = int(sys.argv[2]) if len(sys.argv) > 2 else 2560
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    lengths = [int(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "2048,1860,1856,1043,1040").split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    m = Mamba(d_model=d_model, use_fast_path=False, device=device, dtype=dtype).eval()
    records = []
    with torch.no_grad():
        for length in lengths:
            h = torch.randn(batch, length, d_model, device=device, dtype=dtype)
            padded = -(-length // 16) * 16
            hp = F.pad(h, (0, 0, 0, padded - length))
            if device == "cpu":  # causal: the padded input's first outputs are the same, up to the reference scan's
                # fp32 rounding at another length (~1e-8 here; a GPU may also pick other tiles)
                torch.testing.assert_close(m(hp)[:, :length], m(h))
            row = {"mixer": timed(lambda: m(h), h), "mixer_padded16": timed(lambda: m(hp)[:, :length], h)}
            row.update({name: timed(fn, h) for name, fn in steps(m, h).items()})
            for step, ms in row.items():
                records.append({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                "d_model": d_model, "batch": batch, "length": length, "step": step, "ms": ms,
                                "padded_length": padded,
                                "us_per_token": 1000 * ms / (batch * length)})
            print(f"length {length}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    names = list(dict.fromkeys(r["step"] for r in records))
    print(f"\nus per token, {d_model=} {batch=}")
    print(f"{'step':<24}" + "".join(f"{n:>10}" for n in lengths))
    for name in names:
        cells = {r["length"]: r["us_per_token"] for r in records if r["step"] == name}
        print(f"{name:<24}" + "".join(f"{cells.get(n, float('nan')):>10.4f}" for n in lengths))


if __name__ == "__main__":
    main()
