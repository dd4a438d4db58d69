"""GPU check of the reduction's fused kernels (src/ssmcompress/reduction/kernels.py) against their pure-torch
references, at a real model's widths and dtype, on the streams a random-weight model produces at its first
reduction layer: agreement and per-kernel timings (CUDA events), then each method's whole reduced forward on both
routes (latency, the reduction's own time, host synchronisations, kept tokens, logits).

    python experiments/gpu/check_reduction_kernels.py OUT [model] [batch] [length] [methods]
    python experiments/gpu/check_reduction_kernels.py results/gpu/reduction_kernels      # mamba2-2.7b, 8 x 2048, bf16
    TRITON_INTERPRET=1 python experiments/gpu/check_reduction_kernels.py /tmp/rk mamba2-tiny 2 64   # CPU smoke test

Writes OUT/check_reduction_kernels.json. Expected on a GPU: merging bit-identical where a slot receives at most one
token (elsewhere torch's index_add sums in an unspecified order); matching partners identical except near-ties
(`flips_margin_max` is then the reference's own gap between the two choices, a few float32 ulps); the same tokens
kept by both routes; no host synchronisation inside the reduction layers on the fused route.
"""
import json
import statistics
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from ssmcompress import reduction
from ssmcompress.hosts import mamba_ssm
from ssmcompress.config import CONF_DIR, register_resolvers
from ssmcompress.metrics import efficiency
from ssmcompress.reduction import budget, kernels, merge, methods
from ssmcompress.reduction.patch import importance_of
from ssmcompress.timing import Stopwatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_reduction import count_syncs  # noqa: E402

ROUTES = ("fused", "reference")


def timed(call, repeats: int, cuda: bool) -> float:
    """Median milliseconds of call() after one warm-up (CUDA events on a GPU)."""
    return efficiency.median_ms(call, "cuda" if cuda else "cpu", repeats, warmup=1)


def on_route(route, call):
    previous, kernels.ROUTE = kernels.ROUTE, route
    try:
        return call()
    finally:
        kernels.ROUTE = previous


def config(model_name, *overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("config", overrides=[f"model={model_name}", "model.random_init=true", *overrides])


def first_layer_streams(model, ids, layer):
    """(hidden, residual, importance) leaving block `layer` of the dense model."""
    captured = {}
    block = model.backbone.layers[layer]
    handles = [block.mixer.out_proj.register_forward_pre_hook(
                   lambda m, args: captured.__setitem__("importance", importance_of(args[0], "clip"))),
               block.register_forward_hook(lambda m, args, out: captured.__setitem__("streams", out))]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return (*captured["streams"], captured["importance"])


def matching_report(hidden, src, dst, repeats, cuda) -> dict:
    ref_partner, ref_score = on_route("reference", lambda: merge.best_match(hidden, src, dst))
    partner, score = on_route("fused", lambda: merge.best_match(hidden, src, dst))
    finite = ref_score > -float("inf")
    flips = (partner != ref_partner) & finite
    # the reference's own similarity of the fused choice: how far below its best the flipped choice was
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
    chosen = (unit * merge.gather_slots(unit, partner)).sum(-1)
    margins = (ref_score - chosen)[flips]
    return dict(
        sources=int(finite.sum()), partners_equal=1.0 - flips.sum().item() / max(int(finite.sum()), 1),
        flips=int(flips.sum()), flips_margin_max=margins.abs().max().item() if margins.numel() else 0.0,
        score_max_abs_diff=(score - ref_score)[finite].abs().max().item(),
        ms={route: timed(lambda: on_route(route, lambda: merge.best_match(hidden, src, dst)), repeats, cuda)
            for route in ROUTES})


def merging_report(x, source, target, merged, weights, repeats, cuda) -> dict:
    args = (x, weights, source, target, merged, weights)  # the weights as the carried sizes (ToMe's)
    expected, expected_sizes = on_route("reference", lambda: merge.merge_stream(*args))
    out, out_sizes = on_route("fused", lambda: merge.merge_stream(*args))
    senders = torch.zeros(target.shape, device=x.device).scatter_add_(1, target, merged.float()).gather(1, source)
    equal = out == expected
    return dict(dtype=str(x.dtype), elements=out.numel(), bit_equal=equal.float().mean().item(),
                bit_equal_where_at_most_one_sender=equal[senders <= 1].float().mean().item(),
                max_abs_diff=(out.float() - expected.float()).abs().max().item(),
                sizes_equal=bool(torch.equal(out_sizes, expected_sizes)), max_senders=int(senders.max()),
                ms={route: timed(lambda: on_route(route, lambda: merge.merge_stream(*args)), repeats, cuda)
                    for route in ROUTES})


def selecting_report(key, count, eligible, repeats, cuda) -> dict:
    """merge.lowest / highest: the bisection kernel's slots against the stable sort's."""
    report = {}
    for select in (merge.lowest, merge.highest):
        expected = on_route("reference", lambda: select(key, count, eligible))
        report[select.__name__] = dict(
            equal=bool(torch.equal(on_route("fused", lambda: select(key, count, eligible)), expected)),
            ms={route: timed(lambda: on_route(route, lambda: select(key, count, eligible)), repeats, cuda)
                for route in ROUTES})
    return report


def sender_table_report(target, merged, repeats, cuda) -> dict:
    """kernels.sender_groups in one program per row against the stable sort and count of longer rows."""
    table = kernels.sender_groups(target, merged)
    longest, kernels.ARRANGE_MAX = kernels.ARRANGE_MAX, 0
    try:
        expected = kernels.sender_groups(target, merged)
        sort_ms = timed(lambda: kernels.sender_groups(target, merged), repeats, cuda)
    finally:
        kernels.ARRANGE_MAX = longest
    return dict(equal=all(torch.equal(a, b) for a, b in zip(table, expected)),
                ms=dict(kernel=timed(lambda: kernels.sender_groups(target, merged), repeats, cuda), sort=sort_ms))


def kernel_reports(model, ids, layer, repeats, cuda) -> dict:
    hidden, residual, importance = first_layer_streams(model, ids, layer)
    b, n = hidden.shape[:2]
    tokens = merge.Tokens(hidden, residual, importance, torch.ones(b, n, device=ids.device),
                          torch.ones(b, n, device=ids.device), torch.ones(b, n, dtype=torch.bool, device=ids.device),
                          torch.zeros(b, n, dtype=torch.bool, device=ids.device),
                          torch.arange(n, device=ids.device).expand(b, n), layer)
    less = merge.lowest(importance, torch.full((b,), n // 2, device=ids.device), tokens.movable)
    even, odd = merge.alternate(tokens.valid)
    # ours' plan (reference route): the merges each stream's average carries out
    plan = on_route("reference", lambda: methods.utr(tokens, torch.full((b,), n // 10, device=ids.device))).plan
    source, _ = merge.compact(~plan.removed, tokens.valid)
    weights = torch.ones(b, n, device=ids.device)
    return dict(
        shape=dict(batch=b, length=n, d_model=hidden.shape[-1], hidden=str(hidden.dtype), residual=str(residual.dtype)),
        select_importance=selecting_report(importance, torch.full((b,), n // 2, device=ids.device), tokens.movable,
                                           repeats, cuda),
        sender_table=sender_table_report(plan.target, plan.merge_hidden | plan.merge_residual, repeats, cuda),
        match_utr_halves=matching_report(hidden, less, ~less, repeats, cuda),
        match_tome_alternate=matching_report(hidden, even, odd, repeats, cuda),
        merge_hidden=merging_report(hidden, source, plan.target, plan.merge_hidden, weights, repeats, cuda),
        merge_residual=merging_report(residual, source, plan.target, plan.merge_residual, weights, repeats, cuda))


def forward_reports(model, info, model_name, ids, method_names, repeats, cuda) -> dict:
    dense_ms = timed(lambda: model(ids).logits, repeats, cuda)
    report = dict(dense_ms=dense_ms)
    for name in method_names:
        reducer = reduction.from_config(model, config(model_name, f"method={name}", "ratio=0.3"), info)
        entry, outputs = {}, {}
        try:
            for route in ROUTES:
                def forward():
                    return on_route(route, lambda: reducer(ids))

                outputs[route] = forward()
                ms = timed(lambda: forward().logits, repeats, cuda)
                own = []
                for _ in range(repeats):
                    reducer.stopwatch = Stopwatch()
                    forward()
                    own.append(1000 * reducer.stopwatch.seconds())
                reducer.stopwatch = None
                syncs = count_syncs(forward) if cuda else None
                entry[route] = dict(latency_ms=ms, speedup=dense_ms / ms, own_ms=statistics.median(own),
                                    own_over_dense=statistics.median(own) / dense_ms, syncs_per_forward=syncs)
        finally:
            reducer.remove()
        fused, ref = outputs["fused"], outputs["reference"]
        same = fused.positions.shape == ref.positions.shape and bool((fused.positions == ref.positions).all())
        entry["same_tokens"] = same
        if same:
            diff = (fused.logits.float() - ref.logits.float()).nan_to_num().abs()
            entry["logits_max_abs_diff"] = diff.max().item()
        else:
            kept = [(set(f.tolist()), set(r.tolist())) for f, r in zip(fused.positions, ref.positions)]
            entry["kept_jaccard"] = statistics.mean(len(f & r) / len(f | r) for f, r in kept)
        report[name] = entry
        print(name, json.dumps(entry), flush=True)
    return report


def main() -> None:
    out = Path(sys.argv[1])
    model_name = sys.argv[2] if len(sys.argv) > 2 else "mamba2-2.7b"
    batch, length = (int(x) for x in sys.argv[3:5]) if len(sys.argv) > 4 else (8, 2048)
    method_names = (sys.argv[5] if len(sys.argv) > 5 else "ours,tome,pumer,official,evit,random").split(",")
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    repeats = 5 if cuda else 1
    register_resolvers()
    base = config(model_name)
    model = mamba_ssm.load_model(base.model.path, device, dtype, True, config=base.model.get("config")).eval()
    info = mamba_ssm.model_info(model)
    ids = efficiency.synthetic_batch(info["vocab_size"], batch, length, device)
    first = budget.default_layers(info["n_layer"])[0]
    report = dict(device=torch.cuda.get_device_name() if cuda else "cpu", model=model_name, dtype=dtype,
                  triton_interpreted=kernels.INTERPRETED, layer=first)
    with torch.no_grad():
        report["kernels"] = kernel_reports(model, ids, first, repeats, cuda)
        print(json.dumps(report["kernels"], indent=1), flush=True)
        report["forwards"] = forward_reports(model, info, model_name, ids, method_names, repeats, cuda)
    out.mkdir(parents=True, exist_ok=True)
    (out / "check_reduction_kernels.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
