"""The starting point of the bundled hybrid's training: the bundled Mamba-2's layers in the hybrid's Mamba-2 places.

    python experiments/hybrid_init.py OUT_DIR [--seed 0]

conf/model/hybrid-tiny.yaml is transformers' NemotronH with mamba2-tiny's widths: 12 layers, of which the two
attention layers (`*` in its pattern) take the places of two of mamba2-tiny's Mamba-2 layers. This writes a checkpoint
(transformers' format, with the bundled tokenizer) whose embedding, final norm and ten Mamba-2 layers (norm and mixer)
are mamba2-tiny's, layer for layer, as is its lm_head, and whose attention layers are NemotronH's own random init (seeded),
for `python -m ssmcompress.train --model hybrid-tiny --init OUT_DIR`: the attention layers have to learn what the two
Mamba-2 layers they replace did, so the trained hybrid uses them (a hybrid whose attention starts as a no-op
could leave it unused). The parameter names of a Mamba-2 layer are the same in both libraries (convert.py).
"""
from __future__ import annotations

import argparse

import torch
import yaml

from ssmcompress import architecture, models
from ssmcompress.config import ASSETS, CONF_DIR
from ssmcompress.hosts import mamba_ssm
from ssmcompress.hosts import transformers as hf

SOURCE = ASSETS / "models" / "mamba2-tiny"


def initial_state(hybrid_state: dict, source_state: dict, kinds: str) -> dict:
    """The hybrid's state dict with the source's embedding, final norm and Mamba-2 layers where the hybrid has one."""
    state = dict(hybrid_state)
    state["model.embeddings.weight"] = source_state["backbone.embedding.weight"]
    state["model.norm_f.weight"] = source_state["backbone.norm_f.weight"]
    state["lm_head.weight"] = source_state["lm_head.weight"]  # tied to the embedding in the source, apart here
    for name, tensor in source_state.items():
        parts = name.split(".")
        if parts[:2] == ["backbone", "layers"] and kinds[int(parts[2])] == architecture.SSM:
            state["model." + ".".join(parts[1:])] = tensor
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = yaml.safe_load((CONF_DIR / "model" / "hybrid-tiny.yaml").read_text())["config"]
    hybrid = hf.build_model(config, "cpu", "float32", seed=args.seed)
    source = mamba_ssm.load_model(str(SOURCE), "cpu", "float32")
    kinds = architecture.kinds(hf.model_info(hybrid))
    state = initial_state(hybrid.state_dict(), {k: v.float() for k, v in source.state_dict().items()}, kinds)
    hybrid.load_state_dict(state)
    hf.save_model(hybrid, args.out, tokenizer=models.load_tokenizer(str(SOURCE)), dtype=torch.float32)
    print(f"{args.out}: {kinds}, Mamba-2 layers from {SOURCE.name}")


if __name__ == "__main__":
    main()
