"""Post-training token reduction and weight pruning for Mamba / Mamba-2 language models and SSM-attention hybrids.

Importing the package registers the lm-eval model `ssmcompress` (lazily: nothing heavy is imported until lm-eval
builds it), so `lm_eval.simple_evaluate(model="ssmcompress", model_args="pretrained=...,method=ours,ratio=0.3")` works.
"""
__version__ = "0.1.0"


def _register_lm_eval_model() -> None:
    try:
        import lm_eval.models  # noqa: F401  (lm-eval's own models first: an empty registry would skip them)
        from lm_eval.api.registry import model_registry
    except ImportError:  # lm-eval is not installed: nothing to register with
        return
    if "ssmcompress" not in model_registry:
        model_registry.register("ssmcompress", target="ssmcompress.lmeval:SsmcompressLM")


_register_lm_eval_model()
