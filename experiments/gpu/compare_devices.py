"""GPU vs CPU accuracy of the same runs: for every (model, method, ratio) present in both results stores,
each task's main metric on either device and the largest difference, as a markdown table.

    python experiments/gpu/compare_devices.py results/gpu/records.jsonl results/records.jsonl [--tag main]
"""
import argparse
import json


def load(path: str, tag: str | None) -> dict:
    """(model, method, ratio, importance, limit) -> latest record on that store, offline benchmark only."""
    runs = {}
    for line in open(path):
        r = json.loads(line)
        if r["benchmark"] != "offline" or (tag and r.get("tag") not in (tag, f"gpu-{tag}")):
            continue
        importance = ((r.get("reduction") or {}).get("params") or {}).get("importance")
        limit = r["config"]["benchmark"].get("limit")  # a quick run (limit) compares only with its own kind
        runs[(r["model"], r["method"], r["ratio"], importance, limit)] = r
    return runs


def main_metric(record: dict, task: str) -> float:
    main = record["config"]["benchmark"]["main_metric"]
    return record["metrics"][task][main.get(task, "acc")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gpu")
    parser.add_argument("cpu")
    parser.add_argument("--tag", default="main")
    args = parser.parse_args()
    gpu, cpu = load(args.gpu, args.tag), load(args.cpu, args.tag)
    shared = sorted(set(gpu) & set(cpu), key=lambda k: (k[0], k[1], k[2] or 0))
    if not shared:
        raise SystemExit("no run is in both stores")
    tasks = list(gpu[shared[0]]["metrics"])
    print("| model | method | ratio | " + " | ".join(f"{t} GPU / CPU" for t in tasks) + " | max abs diff |")
    print("|---|---|---|" + "---|" * (len(tasks) + 1))
    worst = 0.0
    for key in shared:
        g, c = gpu[key], cpu[key]
        pairs = [(main_metric(g, t), main_metric(c, t)) for t in tasks]
        diff = max(abs(a - b) for a, b in pairs)
        worst = max(worst, diff)
        cells = " | ".join(f"{100 * a:.1f} / {100 * b:.1f}" for a, b in pairs)
        print(f"| {key[0]} | {key[1]} | {key[2] or '-'} | {cells} | {100 * diff:.2f} |")
    print(f"\n{len(shared)} runs on both devices; largest difference of a task score: {100 * worst:.2f} points "
          f"(GPU: {gpu[shared[0]]['env'].get('gpu') or gpu[shared[0]]['env'].get('device')}, "
          f"{gpu[shared[0]]['config']['model']['dtype']})")


if __name__ == "__main__":
    main()
