"""Tiny random transformers models (OPT, LLaMA, GPT-2) in the hub format, for the `hf` family's tests."""
from conftest import TOKENIZER_DIR
from ssmcompress.hosts import transformers as hf

TINY_HF = {
    "opt": dict(model_type="opt", vocab_size=4096, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=0,
                eos_token_id=0, pad_token_id=None),
    "llama": dict(model_type="llama", vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                  eos_token_id=0),
    "gpt2": dict(model_type="gpt2", vocab_size=4096, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                 bos_token_id=0, eos_token_id=0),
}


def tiny_hf_model(kind: str = "opt", seed: int = 0, **overrides):
    return hf.build_model({**TINY_HF[kind], **overrides}, "cpu", "float32", seed=seed)


def save_tiny_hf(directory, kind: str = "opt", seed: int = 0, **overrides):
    """A random model saved as save_pretrained writes it, with the bundled tokenizer."""
    hf.save_model(tiny_hf_model(kind, seed, **overrides), directory,
                         tokenizer=hf.load_tokenizer(str(TOKENIZER_DIR)))
    return directory
