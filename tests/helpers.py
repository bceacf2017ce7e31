"""Helpers the tests share: tiny models built here, never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama_folder(out: Path, seed: int = 0, tie: bool = False) -> Path:
    """A random-init Llama saved as a Hugging Face folder (config, safetensors, byte tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from wallbreak.coe.importers import BYTE_VOCAB, byte_tokenizer_dir

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    byte_tokenizer_dir(out)
    return out
