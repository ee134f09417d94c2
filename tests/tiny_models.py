"""Tiny random-weight models of each family, built from a config and saved with a tokenizer (no Hub)."""

from __future__ import annotations

from pathlib import Path

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=256)


def make_tiny_model(model_type: str, out: Path, minilm_path: str, **overrides) -> str:
    """Save a tiny `model_type` classifier base + tokenizer under `out`; returns the folder."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)  # WordPiece vocab of the real MiniLM
    if model_type != "bert":
        raise NotImplementedError(f"tiny {model_type} models are added with their family tests")
    config = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, **{**TINY, **overrides})
    model = AutoModel.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
