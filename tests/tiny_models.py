"""Tiny random-weight models of every family in `tune_app.spec.families.FAMILIES`, built from a config and saved with
a tokenizer (no Hub). Hidden size 32, 2 layers: a trial on a few hundred tweets takes seconds.

Encoders reuse the real MiniLM WordPiece tokenizer (it has a pad token). Decoders get a byte-level BPE
tokenizer trained here on a few hundred shared tweets, with an eos token and deliberately NO pad token, like
Llama / Mistral checkpoints: tune_app must set pad = eos itself.
"""

from __future__ import annotations

from pathlib import Path

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=256)

DECODER_EOS = "<|endoftext|>"

# What each family's config calls things, beyond TINY (several name the same sizes differently).
FAMILY_CONFIG = {
    "bert": {},
    "roberta": {},
    "xlm-roberta": {},
    # DeBERTa-v3 as published: relative attention shared with the content projections.
    "deberta-v2": dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                       max_relative_positions=-1, position_buckets=32, share_att_key=True, norm_rel_ebd="layer_norm",
                       pooler_hidden_size=32),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "llama": dict(num_key_value_heads=1),
    "mistral": dict(num_key_value_heads=1, sliding_window=None),
    "qwen2": dict(num_key_value_heads=1),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=256),
}
"""model_type -> extra config keys for a tiny, realistic member of the family."""

# Config keys each family does not know by TINY's names (they would be stored as unused extras).
_NOT_IN = {"distilbert": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
           "gpt2": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings")}


def decoder_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts`, with eos (and bos) but no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[DECODER_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=DECODER_EOS, bos_token=DECODER_EOS)
    assert tokenizer.pad_token is None  # the point of a decoder tokenizer here
    return tokenizer


def _tweets(n: int = 400) -> list[str]:
    import pandas as pd

    from tests.conftest import SHARED_TWEETS

    if SHARED_TWEETS.is_file():
        return pd.read_csv(SHARED_TWEETS)["text"].astype(str).head(n).tolist()
    # Without ../shared, a small fixed corpus still gives a working (if poorer) BPE vocabulary.
    return [f"tweet {i} about fire flood storm news people emergency" for i in range(n)]


def make_tiny_model(model_type: str, out: Path, wordpiece_tokenizer: str, **overrides) -> str:
    """Save a tiny random-weight `model_type` base model + tokenizer under `out`; returns the folder.

    `overrides` go into the config (e.g. architectures=..., id2label=... to save a classifier checkpoint:
    pass `head_labels=[...]` to save a sequence classifier whose head has those labels).
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from tune_app.spec.families import FAMILIES

    if model_type not in FAMILIES:
        raise ValueError(f"no tiny model for {model_type!r}; families: {', '.join(FAMILIES)}")
    torch.manual_seed(0)
    decoder = FAMILIES[model_type].decoder
    tokenizer = decoder_tokenizer(_tweets()) if decoder else AutoTokenizer.from_pretrained(wordpiece_tokenizer)
    head_labels = overrides.pop("head_labels", None)
    sizes = {k: v for k, v in TINY.items() if k not in _NOT_IN.get(model_type, ())}
    special = ({"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id} if decoder
               else {"pad_token_id": tokenizer.pad_token_id})
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer),
                                  **{**sizes, **FAMILY_CONFIG[model_type], **special, **overrides})
    if decoder:
        config.pad_token_id = None  # like the real checkpoints: no pad token anywhere
    if head_labels:
        config.num_labels = len(head_labels)
        config.id2label = dict(enumerate(head_labels))
        config.label2id = {name: i for i, name in enumerate(head_labels)}
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModel.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
