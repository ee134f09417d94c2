"""Model families: the ONE table of what differs per Hugging Face `config.model_type`.

Adding a family is one entry here plus one row in `tests/test_families.py` (which builds a tiny model of it and
checks every preset's LoRA targets, the head and a save/reload round trip).

Module names were checked against transformers 5 (`model.named_modules()` of each
`AutoModelForSequenceClassification`). Nothing here imports torch at module level: `validate` uses it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_app.errors import UnknownFamilyError


@dataclass(frozen=True)
class Family:
    """What LoRA sequence classification needs to know about one architecture."""

    decoder: bool
    """Decoder-only LM: classifies from the last non-pad token and usually ships without a pad token."""
    layers: str
    """Regex of the transformer blocks' module path: LoRA targets are looked for inside these only,
    so the classification head (and a pooler) is never also a LoRA target."""
    attention_qv: tuple[str, ...]
    """Query and value projections (the LoRA paper's and the blog's default)."""
    attention: tuple[str, ...]
    """All attention projections, output included."""
    mlp: tuple[str, ...]
    """Feed-forward projections (all_linear = attention + mlp)."""
    head: tuple[str, ...]
    """Modules created fresh for classification: trained in full and saved with the adapter (modules_to_save)."""
    pad: str = "own"
    """Pad policy: 'own' (the tokenizer has a pad token) | 'eos' (use eos when there is no pad token)."""
    padding_side: str = "right"
    """Where the tokenizer pads. Right everywhere: transformers' decoder classifiers find the last non-pad token
    on either side, and right padding keeps position ids of real tokens unchanged."""
    fan_in_fan_out: bool = False
    """Target layers store weights as (in, out) (GPT-2's Conv1D), which LoRA must be told."""
    positions: tuple[str, int] | None = ("max_position_embeddings", 0)
    """Learned absolute positions: the config key of their count and how many of them real tokens cannot use
    (RoBERTa's start at padding_idx + 1); a batch longer than what is left fails. None: rotary or relative
    positions, no such limit."""
    prepared_mask: bool = True
    """The model takes a ready 4D additive attention mask as it is (transformers' masking_utils). Training hands it
    one (`train.model.attention_bias`): from a 2D mask, transformers first asks whether the batch has any padding at
    all, a device->host sync in every forward. DeBERTa-v2 builds its own mask from the 2D one, without a sync."""

    def target_modules(self, preset: str) -> str:
        """A PEFT target_modules regex (full match) for a preset: attention_qv | attention | all_linear."""
        names = {"attention_qv": self.attention_qv, "attention": self.attention,
                 "all_linear": self.attention + self.mlp}[preset]
        # Any path inside a block that ends in one of the names: `...layer.3.attention.self.query`.
        return rf"{self.layers}\.(?:.*\.)?({'|'.join(re.escape(n) for n in names)})"


_BERT_LIKE = dict(
    decoder=False, layers=r".*encoder\.layer\.\d+",
    attention_qv=("query", "value"), attention=("query", "key", "value", "attention.output.dense"),
    mlp=("intermediate.dense", "output.dense"),
)
_LLAMA_LIKE = dict(
    decoder=True, layers=r".*layers\.\d+", pad="eos", positions=None,
    attention_qv=("self_attn.q_proj", "self_attn.v_proj"),
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), head=("score",),
)

FAMILIES: dict[str, Family] = {
    # BERT: the pooler is pretrained (NSP) in BERT checkpoints; if one lacks it, build_model saves it too.
    "bert": Family(**_BERT_LIKE, head=("classifier",)),
    # RoBERTa's head is classifier.dense + classifier.out_proj (no pooler).
    "roberta": Family(**_BERT_LIKE, head=("classifier",), positions=("max_position_embeddings", 2)),
    "xlm-roberta": Family(**_BERT_LIKE, head=("classifier",), positions=("max_position_embeddings", 2)),
    # DeBERTa-v2/v3: a fresh ContextPooler (pooler.dense) sits before the classifier.
    "deberta-v2": Family(
        decoder=False, layers=r".*encoder\.layer\.\d+",
        attention_qv=("query_proj", "value_proj"),
        attention=("query_proj", "key_proj", "value_proj", "attention.output.dense"),
        mlp=("intermediate.dense", "output.dense"), head=("pooler", "classifier"), prepared_mask=False,
        positions=None),  # relative attention (v3 as published: position_biased_input false)
    # DistilBERT: pre_classifier (fresh) then classifier.
    "distilbert": Family(
        decoder=False, layers=r".*transformer\.layer\.\d+",
        attention_qv=("q_lin", "v_lin"), attention=("q_lin", "k_lin", "v_lin", "out_lin"),
        mlp=("ffn.lin1", "ffn.lin2"), head=("pre_classifier", "classifier")),
    "llama": Family(**_LLAMA_LIKE),  # _LLAMA_LIKE: rotary positions
    "mistral": Family(**_LLAMA_LIKE),
    "qwen2": Family(**_LLAMA_LIKE),
    "gemma": Family(**_LLAMA_LIKE),
    # GPT-2: q, k, v are one fused Conv1D (c_attn), so attention_qv adapts all three.
    "gpt2": Family(
        decoder=True, layers=r".*h\.\d+", pad="eos", fan_in_fan_out=True, positions=("n_positions", 0),
        attention_qv=("attn.c_attn",), attention=("attn.c_attn", "attn.c_proj"),
        mlp=("mlp.c_fc", "mlp.c_proj"), head=("score",)),
}


def position_limit(model_type: str | None, config: dict[str, Any]) -> int | None:
    """The most tokens a row of this checkpoint can have (learned absolute positions), from its config.json's
    values; None when its family has no such limit or the config does not say."""
    family = FAMILIES.get(model_type or "")
    if family is None or family.positions is None:
        return None
    count = config.get(family.positions[0])
    return int(count) - family.positions[1] if isinstance(count, int) and count > 0 else None


def unknown_family_message(model_type: str, where: str = "models.<name>") -> str:
    """What to do about a model_type outside the table: the known ones, and how to set targets by hand."""
    return (f"model_type {model_type!r} is not in tune_app's family table (known: {', '.join(FAMILIES)}). "
            f"Set the LoRA targets by hand in the YAML: {where}.target_modules: [q_proj, v_proj] "
            f"(names of the model's attention linear layers; the classification head is saved automatically)")


def family_for(model_type: str) -> Family:
    """The family of a `config.model_type`, or an error that lists the known ones and the way out."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnknownFamilyError(unknown_family_message(model_type)) from None


def local_model_type(folder: str | Path) -> str | None:
    """`model_type` from a local model folder's config.json (None if absent or unreadable); no torch import."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def local_family_problem(folder: str | Path, where: str) -> str | None:
    """Why a local checkpoint cannot be tuned without explicit target_modules (its model_type is not in the
    table), or None. `where` is the model's YAML path, e.g. models.roberta."""
    model_type = local_model_type(folder)
    if model_type is None:
        return f"{folder}/config.json has no model_type; set {where}.target_modules by hand"
    return None if model_type in FAMILIES else unknown_family_message(model_type, where)


# ------------------------------------------------------------------------------------ tokenizer and head


def prepare_tokenizer(tokenizer: Any, family: Family | None, vocab_size: int | None = None) -> int:
    """Apply the family's pad policy and padding side to a tokenizer; returns the pad token id.

    Decoder checkpoints (Llama, Mistral, GPT-2) ship without a pad token: pad = eos, or batches > 1 fail
    (transformers#34055). The model side (`config.pad_token_id`) must get the same id. A pad token the tokenizer
    class adds by itself beyond the model's embeddings (`vocab_size`; transformers 5's Qwen2Tokenizer adds
    <|endoftext|> as a new token when the files name none) would index past them: such a decoder pads with eos too.
    """
    eos_pad = family is None or family.pad == "eos" or family.decoder
    outside = vocab_size is not None and tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= vocab_size
    if (tokenizer.pad_token is None or outside) and tokenizer.eos_token is not None and eos_pad:
        tokenizer.pad_token = tokenizer.eos_token
    if family is not None:
        tokenizer.padding_side = family.padding_side
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token")
    return int(tokenizer.pad_token_id)


def checkpoint_head_labels(hf_config: Any) -> list[str] | None:
    """Label names of the classification head a checkpoint already has (None for a base checkpoint)."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return None
    id2label = getattr(hf_config, "id2label", None) or {}
    try:
        return [str(id2label[i]) for i in range(len(id2label))]
    except KeyError:
        return None


def inside(module: str, head: str) -> bool:
    """Whether module path `module` is the module `head` or lies inside it (`roberta.classifier.out_proj`)."""
    parts, sub = module.split("."), head.split(".")
    return any(parts[i:i + len(sub)] == sub for i in range(len(parts) - len(sub) + 1))


def fresh_weights(loading_info: dict[str, Any]) -> list[str]:
    """Weight names from_pretrained initialised fresh (output_loading_info): missing from the checkpoint, or there
    in another shape (mismatched keys come as (name, saved shape, model shape))."""
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in loading_info.get("mismatched_keys", ())]
    return list(loading_info.get("missing_keys", ())) + mismatched


def head_modules(family: Family | None) -> list[str]:
    """The classification head's modules: the family's, or transformers' usual names for a model type outside
    the table (encoders' `classifier`, decoders' `score`)."""
    return list(family.head) if family else ["classifier", "score"]


def modules_to_save(family: Family | None, loading_info: dict[str, Any]) -> list[str]:
    """Head modules plus every module whose weights the checkpoint lacked or had in another shape (freshly
    initialised, e.g. a pooler missing from an MLM-only BERT): all of them train in full and are saved with the
    adapter, so a reloaded adapter scores the same. `loading_info` is from_pretrained's output_loading_info."""
    names = head_modules(family)
    for key in fresh_weights(loading_info):
        module = key.rsplit(".", 1)[0]
        if not any(inside(module, h) for h in names):
            names.append(module)
    return names
