"""Model families: the ONE table of what differs per Hugging Face `config.model_type`.

Adding a family is one entry here plus one row in `tests/test_families.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What LoRA sequence classification needs to know about one architecture."""

    decoder: bool
    """Decoder-only LM (classifies from the last non-pad token; has no pad token of its own)."""
    layers: str
    """Regex of the transformer blocks' module path: LoRA targets are looked for inside these only,
    so the classification head is never also a LoRA target."""
    attention_qv: tuple[str, ...]
    """Query and value projections (the LoRA paper's and the blog's default)."""
    attention: tuple[str, ...]
    """All attention projections, output included."""
    mlp: tuple[str, ...]
    """Feed-forward projections (all_linear = attention + mlp)."""
    head: tuple[str, ...]
    """Modules created fresh for classification: trained in full and saved with the adapter."""

    def target_modules(self, preset: str) -> str:
        """A PEFT target_modules regex for a preset: attention_qv | attention | all_linear."""
        names = {"attention_qv": self.attention_qv, "attention": self.attention,
                 "all_linear": self.attention + self.mlp}[preset]
        return rf"{self.layers}\.({'|'.join(re.escape(n) for n in names)})"


_BERT_LIKE = dict(
    decoder=False, layers=r".*encoder\.layer\.\d+.*",
    attention_qv=("query", "value"), attention=("query", "key", "value", "attention.output.dense"),
    mlp=("intermediate.dense", "output.dense"),
)
_LLAMA_LIKE = dict(
    decoder=True, layers=r".*layers\.\d+.*",
    attention_qv=("q_proj", "v_proj"), attention=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp=("gate_proj", "up_proj", "down_proj"), head=("score",),
)

FAMILIES: dict[str, Family] = {
    "bert": Family(**_BERT_LIKE, head=("classifier",)),
    "roberta": Family(**_BERT_LIKE, head=("classifier",)),
    "xlm-roberta": Family(**_BERT_LIKE, head=("classifier",)),
    "deberta-v2": Family(
        decoder=False, layers=r".*encoder\.layer\.\d+.*",
        attention_qv=("query_proj", "value_proj"),
        attention=("query_proj", "key_proj", "value_proj", "attention.output.dense"),
        mlp=("intermediate.dense", "output.dense"), head=("pooler", "classifier")),
    "distilbert": Family(
        decoder=False, layers=r".*transformer\.layer\.\d+.*",
        attention_qv=("q_lin", "v_lin"), attention=("q_lin", "k_lin", "v_lin", "out_lin"),
        mlp=("lin1", "lin2"), head=("pre_classifier", "classifier")),
    "llama": Family(**_LLAMA_LIKE),
    "mistral": Family(**_LLAMA_LIKE),
    "qwen2": Family(**_LLAMA_LIKE),
    "gemma": Family(**_LLAMA_LIKE),
    "gpt2": Family(
        decoder=True, layers=r".*h\.\d+.*",
        attention_qv=("c_attn",), attention=("c_attn", "attn.c_proj"),
        mlp=("c_fc", "mlp.c_proj"), head=("score",)),
}


class UnknownFamilyError(ValueError):
    pass


def family_for(model_type: str) -> Family:
    """The family of a `config.model_type`, or an error that lists the known ones and the way out."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnknownFamilyError(
            f"model_type {model_type!r} is not in tune_app's family table (known: {', '.join(FAMILIES)}). "
            f"Set the LoRA targets by hand in the YAML: models.<name>.target_modules: [q_proj, v_proj] "
            f"(names of the model's linear layers)") from None
