"""Tokenized data as trials receive it: both splits' token ids in compact ragged arrays, made once per distinct
tokenizer on the driver and shared through the Ray object store.

Training, evaluation and an exported bundle's predictions all tokenize with `encode`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tune_app.spec.data import Splits


@dataclass
class TokenizedSplit:
    """Token ids of many texts as one flat int32 array plus offsets: cheap to store, share and slice."""

    ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def from_lists(cls, input_ids: list[list[int]], labels: np.ndarray) -> TokenizedSplit:
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=len(input_ids))
        offsets = np.zeros(len(input_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for x in input_ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids=ids, offsets=offsets, labels=np.asarray(labels, dtype=np.int64))


@dataclass
class TokenizedData:
    """What a trial receives by reference: both splits tokenized by one tokenizer."""

    key: str
    train: TokenizedSplit
    val: TokenizedSplit


def tokenizer_key(tokenizer: Any, max_length: int) -> str:
    """Same key <=> same token ids: the fast tokenizer's full definition (or its class and vocab) plus max_length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Calling a fast tokenizer leaves its last truncation/padding settings in the backend: not part of its
        # definition (max_length is added below), so equal tokenizers get equal keys whatever they encoded before.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        definition = json.dumps(spec, sort_keys=True)
    else:
        definition = type(tokenizer).__name__ + repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(f"{definition}|{max_length}".encode()).hexdigest()[:16]


def encode(tokenizer: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of texts, truncated, unpadded: how training, evaluation and exported bundles all tokenize."""
    return tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"] if texts else []


def tokenize(tokenizer: Any, splits: Splits, max_length: int) -> TokenizedData:
    """Tokenize both splits once, without padding (trials pad each batch dynamically)."""
    return TokenizedData(
        key=tokenizer_key(tokenizer, max_length),
        train=TokenizedSplit.from_lists(encode(tokenizer, splits.train_texts, max_length), splits.train_labels),
        val=TokenizedSplit.from_lists(encode(tokenizer, splits.val_texts, max_length), splits.val_labels),
    )


def fetch(ref: Any):
    """A TokenizedData from a Ray object reference (or the object itself, outside Ray)."""
    if type(ref).__name__ == "ObjectRef":
        import ray

        return ray.get(ref)
    return ref
