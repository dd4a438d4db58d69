"""Post-training token reduction for mamba-ssm models (issue #4).

Contract used by the runner and the lm-eval backend:

    reducer = from_config(model, cfg, info)        # cfg: the composed Hydra config (method, ratio, layers, ...)
    out = reducer(input_ids, lengths=None, protect=None)
        input_ids: LongTensor (batch, length), right-padded; lengths: LongTensor (batch,) of real lengths, or None
        (all rows real, or the `paper` protocol where padding is reduced like real tokens); protect: BoolTensor
        (batch, length) of positions that must be neither removed nor merged, or None.
        out.logits: (batch, kept, vocab) for the kept positions, in original order
        out.positions: LongTensor (batch, kept): the original position of each kept row of out.logits
    reducer.describe() -> dict: method, layers, keep rate, achieved FLOPs ratio, token counts (for the record)
    reducer.remove()   -> restores the dense model exactly
"""


def from_config(model, cfg, info: dict):
    raise NotImplementedError(f"token reduction method {cfg.method.name!r} is not implemented yet (issue #4)")
