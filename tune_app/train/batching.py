"""Batches: which rows train together (length-grouped, reshuffled per epoch), the padded widths a step sees, and
the padded tensors themselves; inference batches by tokens, longest rows first.
"""

from __future__ import annotations

import math

import numpy as np

from tune_app.train.tokens import TokenizedSplit

IGNORE_INDEX = -100
"""Label of filler rows: cross-entropy skips them."""


GROUP_BATCHES = 4
"""Rows of a batching group, at least: this many batches' worth (a bucket with fewer rows is one group)."""


def length_groups(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Rows of similar length, for batches to be drawn from: within each padding bucket (`bucket_widths` up to the
    longest row, the widths a compiled or graphed step pads to), rows of neighbouring multiples of 8 tokens (an
    eager step's padding) join until a group holds GROUP_BATCHES batches' worth; a bucket's widest rows too few for
    a group of their own join the group before them. Depends on the lengths alone, not on the step, so a packed
    trial draws its solo run's batches."""
    buckets = np.searchsorted(np.asarray(bucket_widths(max(1, int(lengths.max())))), lengths)  # as padded_width
    eights = (lengths + 7) // 8
    out = []
    for bucket in np.unique(buckets):
        inside = np.flatnonzero(buckets == bucket)
        groups, group = [], []
        for eight in np.unique(eights[inside]):
            group.extend(inside[eights[inside] == eight])
            if len(group) >= GROUP_BATCHES * batch_size:
                groups.append(group)
                group = []
        if group:
            groups[-1:] = [(groups[-1] if groups else []) + group]
        out.extend(np.asarray(g, dtype=np.int64) for g in groups)
    return out


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches: rows of similar length, but not the same rows together every epoch.

    Each of the `length_groups` is shuffled anew every epoch and cut into full batches; the groups' remainders are
    pooled narrowest first and cut with the one short batch at a random place; then the batches are shuffled. No
    batch crosses a padding bucket (except among remainders), so a compiled step pads as sorting by length would,
    and an eager one little more; and a row's batch-mates change every epoch, where sorting put the same rows
    together epoch after epoch and the shortest always in the short batch."""
    if not len(lengths):
        return []
    batches, remainders = [], []
    for group in length_groups(lengths, batch_size):
        rows = rng.permutation(group)
        full = len(rows) - len(rows) % batch_size
        batches.extend(rows[i:i + batch_size] for i in range(0, full, batch_size))
        remainders.append(rows[full:])
    pool = np.concatenate(remainders)
    short = len(pool) % batch_size
    at = batch_size * int(rng.integers(len(pool) // batch_size + 1)) if short else len(pool)
    batches.extend(pool[i:i + batch_size] for i in range(0, at, batch_size))
    if short:
        batches.append(pool[at:at + short])
    batches.extend(pool[i:i + batch_size] for i in range(at + short, len(pool), batch_size))
    rng.shuffle(batches)
    return batches


def bucket_widths(max_length: int) -> tuple[int, ...]:
    """Padded widths of a compiled step: 16, 32, 64, 128, then x1.5 / x4/3 (192, 256, 384, 512, ...), capped by
    max_length. Few shapes, so torch.compile builds one graph per width and reuses it for every later batch;
    the padding they add is free on short texts (a step there is bound by kernel launches, not arithmetic)."""
    widths, width = [], 16
    while width < max_length:
        widths.append(width)
        width = width * 2 if width < 128 else (width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3)
    return (*widths, max_length)


def padded_width(longest: int, widths: tuple[int, ...] | None = None, pad_multiple: int = 8) -> int:
    """Width a batch whose longest row has `longest` tokens is padded to: the next bucket, else a multiple of 8."""
    if widths:
        bucket = next((w for w in widths if w >= longest), None)
        if bucket is not None:
            return bucket
    return int(math.ceil(longest / pad_multiple) * pad_multiple)


def collate(split: TokenizedSplit, rows: np.ndarray, pad_id: int, pad_multiple: int = 8, *,
            widths: tuple[int, ...] | None = None, num_rows: int | None = None):
    """Rows -> padded input_ids / attention_mask / labels tensors, padded to the longest row in the batch
    (rounded up to `pad_multiple`, or to the next of `widths` when given). With `num_rows`, a short batch is filled
    up to that many rows with copies of its first row labelled IGNORE_INDEX (no loss, no gradient), so that a
    compiled step sees one batch shape."""
    import torch

    lengths = split.lengths[rows]
    width = padded_width(int(lengths.max()), widths, pad_multiple)
    n = max(len(rows), num_rows or 0)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    for j, (i, length) in enumerate(zip(rows, lengths)):
        ids[j, :length] = split.row(i)
        mask[j, :length] = 1
    labels[:len(rows)] = split.labels[rows]
    if n > len(rows):
        ids[len(rows):], mask[len(rows):] = ids[0], mask[0]
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)


def inference_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Rows longest first, in batches of at most the tokens of `batch_size` rows of the longest and at most
    4 x batch_size rows: the widest batch has `batch_size` rows, narrower ones more, so short rows take fewer
    forwards (fewer kernel launches on a GPU). The row cap bounds what grows with rows, not tokens (DeBERTa's
    relative-position tensors are per row)."""
    order = np.argsort(-lengths, kind="stable")
    if not len(order):
        return []
    budget = batch_size * padded_width(max(1, int(lengths[order[0]])))
    batches, start = [], 0
    while start < len(order):
        rows = min(4 * batch_size, max(1, budget // padded_width(max(1, int(lengths[order[start]])))))
        batches.append(order[start:start + rows])
        start += rows
    return batches


CPU_INFERENCE_ROWS = 8
"""Rows of the widest inference batch on a CPU: a CPU forward is bound by arithmetic, not by launches, so large
batches only add padding (300 tweets with MiniLM on one core: 8.1 s in batches of 8, 11.4 s in batches of 64)."""
