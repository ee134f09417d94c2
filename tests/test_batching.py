"""Training batches (tune_app.train.batching.length_grouped_batches): every row once an epoch, rows grouped by
length within the padding bucket they fall in, and batches whose rows change from epoch to epoch. Measured on the
real token lengths of the disaster tweets against the sorted-by-length batching it replaced and against random
batches (`pytest -s` prints the figures)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tune_app.spec.data import limit_rows
from tune_app.train.batching import GROUP_BATCHES, bucket_widths, length_grouped_batches, length_groups, padded_width

SIZES = ((240, 16), (800, 16), (6090, 32))
"""(rows, batch size): a smoke run's data, a small study's, and the blog's training split."""
EPOCHS = 4


def sorted_in_chunks(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The batching length_grouped_batches replaced (the baseline here only): a seeded shuffle, sorted by length
    within chunks of 50 batches, then the batches shuffled."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def random_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(len(lengths))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


METHODS = {"sorted (before)": sorted_in_chunks, "grouped (now)": length_grouped_batches, "random": random_batches}


def epoch(method, lengths: np.ndarray, batch_size: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """Epoch n's batches, drawn as a trial draws them (tune_app.train.trainable: a generator of [seed, epoch])."""
    return method(lengths, batch_size, np.random.default_rng([seed, n]))


def co_batched(batches: list[np.ndarray], rows: int) -> np.ndarray:
    """Every pair of rows that share a batch, as one sorted array of i * rows + j (i < j)."""
    pairs = []
    for batch in batches:
        batch = np.sort(batch)
        i, j = np.triu_indices(len(batch), k=1)
        pairs.append(batch[i] * rows + batch[j])
    return np.unique(np.concatenate(pairs))


def repeat_rate(method, lengths: np.ndarray, batch_size: int) -> float:
    """Of the pairs of rows that share a batch in one epoch, the fraction that share one again in the next
    (the mean over EPOCHS - 1 consecutive epochs)."""
    pairs = [co_batched(epoch(method, lengths, batch_size, n), len(lengths)) for n in range(EPOCHS)]
    return float(np.mean([len(np.intersect1d(a, b, assume_unique=True)) / len(a) for a, b in zip(pairs, pairs[1:])]))


def padding_overhead(method, lengths: np.ndarray, batch_size: int, widths: tuple[int, ...] | None) -> float:
    """Padded tokens / real tokens of one epoch, each batch padded as collate pads it: to the next of `widths`
    (a compiled or CUDA-graph step), or with None to a multiple of 8 of its longest row (an eager step)."""
    batches = epoch(method, lengths, batch_size, 0)
    return sum(len(b) * padded_width(int(lengths[b].max()), widths) for b in batches) / float(lengths.sum())


@pytest.fixture(scope="module")
def tweet_lengths(tweets_csv, wordpiece_tokenizer) -> np.ndarray:
    """Token lengths of the shared tweets (MiniLM's WordPiece, special tokens included, as the trainer counts
    them), in the order of data.limit's seeded shuffle (split_seed 42): the first n are a study's n rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer)
    tweets = pd.read_csv(tweets_csv)
    texts = limit_rows(tweets, len(tweets), 42)["text"].astype(str).tolist()
    return np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"]])


def test_every_row_once_in_full_batches_and_one_short_batch():
    lengths = np.random.default_rng(3).integers(1, 200, size=1003)
    for n in range(3):
        batches = epoch(length_grouped_batches, lengths, 16, n)
        assert sorted(np.concatenate(batches).tolist()) == list(range(1003))
        assert [len(b) for b in batches].count(16) == 62 and len(batches) == 63  # 1003 = 62 x 16 + 11
        assert all(b.dtype.kind == "i" for b in batches)
    # Exact multiples of the batch size: no short batch; no rows: no batch.
    assert [len(b) for b in length_grouped_batches(np.full(64, 20), 16, np.random.default_rng(0))] == [16] * 4
    assert length_grouped_batches(np.array([], dtype=np.int64), 16, np.random.default_rng(0)) == []
    # Seeded: the same generator state draws the same batches, in the same order.
    first, again = (epoch(length_grouped_batches, lengths, 16, 0) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_a_batch_holds_one_padding_width_but_where_remainders_meet():
    """Rows that pad to one width (bucket_widths, for any max_length at least the longest row) share batches;
    only the remainders of the widths (fewer than a batch each) mix, narrowest first, in a few batches."""
    lengths = np.random.default_rng(5).integers(1, 300, size=2000)
    for max_length in (300, 512, 4096):
        widths = bucket_widths(max_length)
        groups = {padded_width(int(n), widths) for n in lengths}
        batches = length_grouped_batches(lengths, 32, np.random.default_rng(0))
        mixed = [b for b in batches if len({padded_width(int(n), widths) for n in lengths[b]}) > 1]
        assert len(mixed) <= len(groups) - 1, (max_length, len(mixed))


def test_the_short_batch_is_not_always_the_shortest_rows(tweet_lengths):
    """The sorted batching always put the shortest rows of a chunk in its short batch; here the short batch is
    drawn from the remainders of every width, other rows every epoch."""
    lengths = tweet_lengths[:250]  # 15 batches of 16 and one of 10
    shorts = [next(b for b in epoch(length_grouped_batches, lengths, 16, n) if len(b) < 16) for n in range(12)]
    assert len({tuple(sorted(b.tolist())) for b in shorts}) == len(shorts)
    assert len({int(lengths[b].max()) for b in shorts}) > 1
    before = [next(b for b in epoch(sorted_in_chunks, lengths, 16, n) if len(b) < 16) for n in range(12)]
    assert all(sorted(lengths[b]) == sorted(lengths)[:len(b)] for b in before)  # 250 rows: one chunk


def test_groups_hold_rows_of_one_bucket_and_enough_of_them():
    lengths = np.random.default_rng(7).integers(1, 300, size=3000)
    groups = length_groups(lengths, 16)
    assert sorted(np.concatenate(groups).tolist()) == list(range(3000))
    widths = bucket_widths(300)
    for group in groups:
        assert len({padded_width(int(n), widths) for n in lengths[group]}) == 1
        bucket_rows = sum(padded_width(int(n), widths) == padded_width(int(lengths[group[0]]), widths)
                          for n in lengths)
        assert len(group) >= min(GROUP_BATCHES * 16, bucket_rows)


def test_rows_meet_other_rows_every_epoch_with_little_more_padding(tweet_lengths):
    """Of the pairs of tweets that share a batch in one epoch, the share that meet again in the next: with the
    sorted batching most (it sorts every epoch's rows into nearly the same batches); with random batches
    (B - 1) / (N - 1). Here rows are random within their group: a pair in a group of G rows meets again with
    chance (B - 1) / (G - 1), and as each group holds pairs in proportion to its rows, the rate is about K times
    random batches', K the groups (remainders, fewer than a batch per group, meet again more often: the bound
    allows a quarter more).
    Padding stays at the sorted batching's for a compiled step (a batch pads to its bucket either way), and within
    20% of it for an eager step (multiples of 8: the sorted batches padded to their own longest row)."""
    widths = bucket_widths(512)
    print()
    for rows, batch_size in SIZES:
        lengths = tweet_lengths[:rows]
        rate = {name: repeat_rate(method, lengths, batch_size) for name, method in METHODS.items()}
        compiled = {name: padding_overhead(method, lengths, batch_size, widths) for name, method in METHODS.items()}
        eager = {name: padding_overhead(method, lengths, batch_size, None) for name, method in METHODS.items()}
        k = len(length_groups(lengths, batch_size))
        print(f"{rows} rows, batch {batch_size}, {k} groups: met again in the next epoch "
              + ", ".join(f"{name} {value:.1%}" for name, value in rate.items())
              + "; padded / real tokens, compiled: " + ", ".join(f"{n} {v:.3f}" for n, v in compiled.items())
              + "; eager: " + ", ".join(f"{n} {v:.3f}" for n, v in eager.items()))
        now, before, random = rate["grouped (now)"], rate["sorted (before)"], rate["random"]
        assert random == pytest.approx((batch_size - 1) / (rows - 1), rel=0.3)
        assert now <= 1.25 * k * random, (rows, now, random, k)
        assert now < before / 3, (rows, now, before)
        assert compiled["grouped (now)"] <= 1.02 * compiled["sorted (before)"], (rows, compiled)
        assert eager["grouped (now)"] <= 1.2 * eager["sorted (before)"], (rows, eager)
        assert eager["grouped (now)"] < eager["random"] and compiled["grouped (now)"] < compiled["random"]
