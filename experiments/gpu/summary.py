"""One line per efficiency, memory or generation record of the stores named on the command line (what a GPU script
prints at its end): speed-ups, the ceiling or the bound, own time, peak memory, KV cache, the kernel and forward paths."""
import json
import sys
from pathlib import Path


def efficiency_line(r: dict, e: dict) -> str:
    return (f"eff {r['model']:<18}{r['method']:<9}{r.get('ratio') or 0:<5}{e['batch_size']}x{e['length']:<6} dense "
            f"{e['dense_latency_ms']:.2f} ms speedup {e.get('speedup', 1):.3f} ceiling {e.get('ceiling_speedup', 0):.3f}"
            f" of ceiling {e.get('of_ceiling', 0):.3f} overhead {100 * e.get('reduction_overhead', 0):.2f} % | "
            f"{e.get('forward_path', 'eager')} | {e.get('scan_kernel')} | {e.get('conv_kernel')} | "
            f"{e.get('attention_kernel', '-')}")


def memory_line(r: dict, e: dict) -> str:
    return (f"mem {r['model']:<18}{r['method']:<9}{r.get('ratio') or 0:<5} peak {e['dense_peak_mib']:.0f} -> "
            f"{e.get('reduced_peak_mib', 0):.0f} MiB (saving {100 * e.get('peak_memory_saving', 0):.1f} %); mixers / "
            f"reduction {e.get('mixer_rows')} / {e.get('reduction_rows')} rows: {e.get('sliced_dense_peak_mib', 0):.0f}"
            f" -> {e.get('sliced_reduced_peak_mib', 0):.0f} MiB (saving {100 * e.get('sliced_peak_memory_saving', 0):.1f} %)")


def generation_line(r: dict, g: dict) -> str:
    return (f"gen {r['model']:<18}{r['method']:<9}speedup {g.get('speedup', 1):.3f} prefill "
            f"{g.get('prefill_speedup', 1):.3f} bound {g.get('bound', 0):.3f} of bound {g.get('of_bound', 0):.3f} "
            f"decode/token {g['dense_decode_ms_per_token']:.2f}/{g.get('reduced_decode_ms_per_token', 0):.2f} ms KV "
            f"{g.get('dense_kv_cache_mib', 0):.0f}/{g.get('reduced_kv_cache_mib', 0):.0f} MiB saved "
            f"{100 * (g.get('kv_cache_saving') or 0):.1f} % expected {100 * (g.get('expected_kv_cache_saving') or 0):.1f} %")


def main(stores: list[str]) -> None:
    for store in map(Path, stores):
        for line in store.read_text().splitlines() if store.exists() else []:
            r = json.loads(line)
            if r.get("efficiency"):
                sliced = "sliced_dense_peak_mib" in r["efficiency"]  # the memory protocol's runs
                print((memory_line if sliced else efficiency_line)(r, r["efficiency"]))
            if r.get("generation"):
                print(generation_line(r, r["generation"]))


if __name__ == "__main__":
    main(sys.argv[1:])
