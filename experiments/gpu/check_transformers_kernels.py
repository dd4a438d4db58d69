"""GPU check of the transformers host's kernel routing (compat.route_transformers) on a hybrid: a Granite 4.0-H 1B
layout cut to a few layers (Mamba-2 layers and one NoPE attention layer, transformers' GraniteMoeHybrid) and
transformers' Mamba2, random weights, float32 and bfloat16. On the same GPU, the routed kernels (mamba-ssm's Triton
SSD scan and state update, our Triton causal conv, mamba-ssm's Triton RMSNorms) against transformers' own pure-torch
code (compat.reference_kernels):
- prefill logits of 2 x LENGTH (512) tokens, dense and token-reduced (method=ours ratio=0.3), where both paths kept
  the same tokens;
- greedy generation of 16 tokens after a dense and a reduced prefill (float32: the same tokens);
- the ops a dense forward of the full-size model spends its GPU time in (torch.profiler), so the share of each
  kernel (the causal conv among them) is on record.

    python experiments/gpu/check_transformers_kernels.py [OUT_DIR]    # wheels as in experiments/gpu/efficiency.sh
"""
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir

from ssmcompress import compat, generation, reduction
from ssmcompress.config import CONF_DIR, register_resolvers
from ssmcompress.hosts import transformers as hf
from ssmcompress.metrics import efficiency


def model_config(name: str, **overrides) -> dict:
    return {**yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())["config"], **overrides}


DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu: a dry run of the script (both paths are then the reference)
LENGTH = int(os.environ.get("LENGTH", 512))  # prompt tokens of the checks (2 rows)
SMALL = {  # a few layers of each, the full widths
    "granite-4.0-h-1b": dict(num_hidden_layers=6, layer_types=["mamba", "mamba", "attention", "mamba", "mamba",
                                                                "mamba"]),
    "mamba2-2.7b-hf": dict(num_hidden_layers=4),
}


def reducer_for(model, info, name: str):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[f"model={name}", "method=ours", "ratio=0.3", "benchmark=efficiency"])
    return reduction.from_config(model, cfg, info)


def prefill(model, reducer, ids, reference: bool):
    with torch.no_grad(), compat.reference_kernels() if reference else contextlib.nullcontext():
        if reducer is None:
            return hf.logits(model, ids).float(), torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        out = reducer(ids)
        return out.logits.float(), out.positions


def compare(fast, ref) -> dict:
    """Logit differences where both paths hold the same token (a reduced forward decides from activations, so the
    paths can keep different tokens where scores are nearly tied; from a row's first differing slot on, slots are
    not compared and `same_tokens` says how much was)."""
    (fast_logits, fast_pos), (ref_logits, ref_pos) = fast, ref
    width = min(fast_pos.shape[1], ref_pos.shape[1])
    same = (fast_pos[:, :width] == ref_pos[:, :width]).long().cumprod(1).bool()
    a, b = fast_logits[:, :width][same], ref_logits[:, :width][same]
    scale = b.abs().max().item()
    return dict(max_abs=(a - b).abs().max().item(), rel_to_max=(a - b).abs().max().item() / scale,
                argmax_agree=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                same_tokens=same.float().mean().item())


def generated(model, reducer, ids, reference: bool):
    with compat.reference_kernels() if reference else contextlib.nullcontext():
        return generation.generate(model, ids, 16, reducer)[:, ids.shape[1]:]


def check(name: str, dtype: torch.dtype) -> dict:
    model = hf.build_model(model_config(name, **SMALL[name]), device=DEVICE, dtype=dtype)
    info = hf.model_info(model)
    hf.route_kernels(model)
    ids = efficiency.synthetic_batch(model.config.vocab_size, 2, LENGTH, DEVICE, seed=1)
    out = dict(model=name, dtype=str(dtype), paths=efficiency.kernel_paths(model, info, ids.device))
    reducer = reducer_for(model, info, name)
    try:
        out["dense"] = compare(prefill(model, None, ids, False), prefill(model, None, ids, True))
        out["reduced"] = compare(prefill(model, reducer, ids, False), prefill(model, reducer, ids, True))
        for label, r in (("dense", None), ("reduced", reducer)):
            fast, ref = generated(model, r, ids, False), generated(model, r, ids, True)
            out[f"generation_{label}_same_tokens"] = (fast == ref).float().mean().item()
    finally:
        reducer.remove()
    return out


def profile(name: str, batch: int, length: int) -> str:
    """The ops of one dense bf16 forward of the full-size model, by GPU time."""
    model = hf.build_model(model_config(name), device="cuda", dtype=torch.bfloat16)
    hf.route_kernels(model)
    ids = efficiency.synthetic_batch(model.config.vocab_size, batch, length, "cuda")
    with torch.no_grad():
        for _ in range(2):
            hf.logits(model, ids)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            hf.logits(model, ids)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in SMALL:
        for dtype in (torch.float32, torch.bfloat16):  # one line each, written as it finishes
            results.append(check(name, dtype))
            print(json.dumps(results[-1]), flush=True)
            with open(out_dir / "check_transformers_kernels.jsonl", "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    text = "\n".join(f"# {name}: one dense bf16 forward, batch 8 x 2048, by GPU time\n{profile(name, 8, 2048)}"
                     for name in ("granite-4.0-h-1b", "mamba2-2.7b-hf"))
    print(text)
    (out_dir / "profile_transformers.txt").write_text(text + "\n")
    # float32: the Triton scan's dot products run in TF32 (mamba-ssm's kernels), the reference's in float32
    failed = [r for r in results if r["dtype"] == "torch.float32" and (
        r["dense"]["rel_to_max"] > 1e-2 or r["dense"]["argmax_agree"] < 0.99 or r["generation_dense_same_tokens"] < 1)]
    if failed:
        sys.exit(f"routed kernels disagree with transformers' reference: {failed}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/check_transformers_kernels"))
