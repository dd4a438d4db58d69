"""Post-training token reduction and weight pruning for Mamba / Mamba-2 language models."""
__version__ = "0.1.0"
