"""GPU check of the Triton causal conv (ssmcompress.causal_conv) against torch's conv1d + SiLU, the path Mamba layers
take without causal-conv1d: largest differences in float32 and bfloat16 and both paths' time (CUDA events, median of
20) at the conv shapes of granite-4.0-h-1b and mamba2-2.7b (inputs as the models pass them, transposed (batch,
length, dim) tensors); then a 4-layer mamba2-2.7b on mamba-ssm, logits with the routed kernels against the
reference path.

    python experiments/gpu/check_causal_conv.py OUT.jsonl      # on a GPU; wheels as in experiments/gpu/efficiency.sh
"""
import json
import sys

import torch
import yaml

from ssmcompress import causal_conv, compat
from ssmcompress.config import CONF_DIR
from ssmcompress.hosts import mamba_ssm
from ssmcompress.metrics import efficiency

SHAPES = {"granite-4.0-h-1b": 3072 + 2 * 128, "mamba2-2.7b": 5120 + 2 * 128}  # d_inner + 2 groups x d_state


def kernel_rows():
    for (name, dim), (batch, length) in [(s, b) for s in SHAPES.items() for b in ((8, 2048), (1, 8192))]:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            x = torch.randn(batch, length, dim, device="cuda").to(dtype).transpose(1, 2)
            weight, bias = torch.randn(dim, 4, device="cuda").to(dtype), torch.randn(dim, device="cuda").to(dtype)
            out = causal_conv.causal_conv1d_fn(x, weight, bias, "silu")
            torch_out = causal_conv.causal_conv1d_reference(x, weight, bias, "silu")
            exact = causal_conv.causal_conv1d_reference(x.double(), weight.double(), bias.double(), "silu")
            yield dict(check="kernel", shape=name, batch=batch, length=length, dtype=str(dtype),
                       triton_max_abs=(out.double() - exact).abs().max().item(),
                       torch_max_abs=(torch_out.double() - exact).abs().max().item(),
                       triton_ms=efficiency.median_ms(
                           lambda: causal_conv.causal_conv1d_fn(x, weight, bias, "silu"), x.device),
                       torch_ms=efficiency.median_ms(
                           lambda: causal_conv.causal_conv1d_reference(x, weight, bias, "silu"), x.device))


def model_rows():
    config = yaml.safe_load((CONF_DIR / "model" / "mamba2-2.7b.yaml").read_text())["config"]
    for dtype in ("float32", "bfloat16"):
        model = mamba_ssm.build_model({**config, "n_layer": 4}, device="cuda", dtype=dtype)
        ids = efficiency.synthetic_batch(config["vocab_size"], 2, 512, "cuda", seed=1)
        with torch.no_grad():
            fast = model(ids).logits.float()
            with compat.reference_kernels():
                ref = model(ids).logits.float()
        yield dict(check="mamba2-2.7b 4 layers, routed vs reference", dtype=dtype,
                   max_abs=(fast - ref).abs().max().item(), rel_to_max=((fast - ref).abs().max() / ref.abs().max()).item(),
                   argmax_agree=(fast.argmax(-1) == ref.argmax(-1)).float().mean().item())


def main(out: str) -> None:
    with open(out, "w") as f:
        for row in [*kernel_rows(), *model_rows()]:
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
