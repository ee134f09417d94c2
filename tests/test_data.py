"""Data: the blog's split and class weights, `limit`, label mapping, tokenization into ragged arrays, and the
tokenizer key that decides how many times the data is tokenized."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tune_app.spec import data
from tune_app.spec.config import DataConfig
from tune_app.spec.paths import absolute_paths
from tune_app.train import tokens


def test_blog_split_and_class_weights(tweets_csv):
    """The reference blog: 80/20 split with seed 42 -> 6,090 / 1,523 rows, weights pos 1.1622, neg 0.8775."""
    splits = data.load_splits(DataConfig(source=str(tweets_csv), text="text", label="target"))
    assert (len(splits.train_texts), len(splits.val_texts)) == (6090, 1523)
    assert splits.label_names == ["0", "1"]
    neg, pos = splits.class_weights
    assert pos == pytest.approx(1.1622137404580153, abs=1e-12)
    assert neg == pytest.approx(0.877521613832853, abs=1e-12)
    # The weights are n / (K x count) of the train split, as the blog computes them.
    counts = np.bincount(splits.train_labels)
    assert list(counts) == [3470, 2620]
    assert splits.train_labels.dtype == np.int64 and set(splits.val_labels) == {0, 1}


def test_limit_is_a_seeded_shuffle(tweets_csv):
    df = pd.read_csv(tweets_csv)
    a = data.limit_rows(df, 100, seed=42)
    assert len(a) == 100
    assert a.index.tolist() == data.limit_rows(df, 100, seed=42).index.tolist()  # same seed, same rows
    assert a.index.tolist() != data.limit_rows(df, 100, seed=7).index.tolist()
    assert a.index.tolist() != list(range(100))  # not the head of the file
    assert data.limit_rows(df, None, seed=42) is df


def test_limit_then_split(tweets_csv):
    cfg = DataConfig(source=str(tweets_csv), text="text", label="target", limit=300)
    first, again = data.load_splits(cfg), data.load_splits(cfg)
    assert (len(first.train_texts), len(first.val_texts)) == (240, 60)
    assert first.train_texts == again.train_texts and first.val_texts == again.val_texts
    full = set(pd.read_csv(tweets_csv)["text"])
    assert set(first.train_texts) <= full


def _write(tmp_path, labels: list, name="d.csv") -> str:
    path = tmp_path / name
    pd.DataFrame({"text": [f"text number {i}" for i in range(len(labels))], "label": labels}).to_csv(path,
                                                                                                   index=False)
    return str(path)


@pytest.mark.parametrize("raw, names", [
    ([0, 2, 4] * 10, ["0", "2", "4"]),
    (["pos", "neg", "mid"] * 10, ["mid", "neg", "pos"]),
    ([1, 0] * 15, ["0", "1"]),
], ids=["0-2-4", "strings", "binary"])
def test_labels_map_to_0_K_minus_1(tmp_path, raw, names):
    splits = data.load_splits(DataConfig(source=_write(tmp_path, raw), val_size=0.2, split_seed=0))
    assert splits.label_names == names
    labels = np.concatenate([splits.train_labels, splits.val_labels])
    assert sorted(set(labels.tolist())) == list(range(len(names)))
    # Each text keeps its own label: row i of the csv has label raw[i].
    by_text = dict(zip([f"text number {i}" for i in range(len(raw))], raw))
    for text, label in zip(splits.train_texts + splits.val_texts, labels):
        assert names[label] == str(by_text[text])


def test_a_validation_file_must_hold_the_training_labels(tmp_path):
    """A validation file labelled otherwise than the source ('no'/'yes' against 0/1) is refused by validation
    and by the load, instead of training a model with classes nothing trains."""
    cfg = DataConfig(source=_write(tmp_path, [0, 1] * 10), validation=_write(tmp_path, ["no", "yes"] * 3, "v.csv"))
    errors = data.check_source(cfg)
    assert len(errors) == 1 and errors[0].startswith("data.validation: labels ['no', 'yes']"), errors
    assert "labels there: [0, 1]" in errors[0]
    with pytest.raises(data.DataError, match="write the labels alike"):
        data.load_splits(cfg)
    same = DataConfig(source=cfg.source, validation=_write(tmp_path, [1, 0, 1], "w.csv"))
    assert data.check_source(same) == [] and data.load_splits(same).label_names == ["0", "1"]


def test_a_limit_that_drops_a_rare_class_is_named_as_the_cause(tmp_path):
    """One row of class 2 among 41: data.limit=3 keeps none of it, while the validation file has it; the message
    names data.limit (the user's fix), not the files' labels. A limit that keeps a single class says so too."""
    source = _write(tmp_path, [0] * 20 + [1] * 20 + [2])
    cfg = DataConfig(source=source, validation=_write(tmp_path, [0, 1, 2], "v.csv"), limit=3, split_seed=0)
    assert sorted(data.limit_rows(pd.read_csv(source), 3, 0)["label"]) == [0, 1, 1]
    (error,) = data.check_source(cfg)
    assert error.startswith("data.limit: the 3 training row(s) that data.limit=3 keeps have no row of the labels [2]")
    assert "raise data.limit" in error
    cfg.limit = None
    assert data.check_source(cfg) == []
    # A label the whole source lacks is the files' problem, limit or not.
    cfg.limit, cfg.validation = 3, _write(tmp_path, [0, 1, 2, 7], "w.csv")
    (error,) = data.check_source(cfg)
    assert error.startswith("data.validation: labels [2, 7] of"), error

    one_class = DataConfig(source=_write(tmp_path, [0] * 40 + [1], "one.csv"), limit=3, split_seed=0)
    (error,) = data.check_source(one_class)
    assert error.startswith("data.limit: the 3 row(s) of ")
    assert "are all one class ([0] of 2); raise data.limit" in error


def test_positive_label_makes_its_class_id_1(tmp_path):
    """Sorted, 'disaster' < 'ordinary' would make 'ordinary' the class F1 scores; data.positive_label picks the
    other. It must be a label of the data, and there must be two classes."""
    source = _write(tmp_path, ["ordinary", "disaster", "ordinary"] * 10)
    assert data.load_splits(DataConfig(source=source, split_seed=0)).label_names == ["disaster", "ordinary"]
    cfg = DataConfig(source=source, split_seed=0, positive_label="disaster")
    assert data.check_source(cfg) == []
    splits = data.load_splits(cfg)
    assert splits.label_names == ["ordinary", "disaster"]
    for text, label in zip(splits.train_texts, splits.train_labels):  # text number i: raw label of row i
        assert splits.label_names[label] == ["ordinary", "disaster", "ordinary"][int(text.split()[-1]) % 3]
    assert splits.class_weights[1] > splits.class_weights[0]  # the rarer class, now id 1, weighs more
    numbers = DataConfig(source=_write(tmp_path, [0, 1] * 10, "n.csv"), positive_label=0)
    assert data.load_splits(numbers).label_names == ["1", "0"]

    (error,) = data.check_source(DataConfig(source=source, positive_label="fire"))
    assert error.startswith("data.positive_label: 'fire' is not a label of the data (labels: ['disaster', 'ordinary'])")
    (error,) = data.check_source(DataConfig(source=_write(tmp_path, [0, 1, 2] * 10, "k.csv"), positive_label=2))
    assert "only for two classes, and the data has 3" in error


def test_a_validation_split_name_is_a_split_of_the_hub_source(tmp_path, monkeypatch):
    """data.validation: test with a Hub source loads that dataset's 'test' split (the Hub is mocked: offline here);
    with a local source a split name cannot work, and validation says so."""
    import datasets

    frames = {"train": pd.DataFrame({"text": list("abcdef"), "label": [0, 1] * 3}),
              "test": pd.DataFrame({"text": ["x", "y"], "label": [1, 0]})}
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_pandas(frames[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (tmp_path / "test").mkdir()  # a folder named like the split, where the study runs: the split is still meant
    monkeypatch.chdir(tmp_path)
    cfg = DataConfig(source="org/tweets", validation="test")
    splits = data.load_splits(cfg)
    assert calls == [("org/tweets", "train"), ("org/tweets", "test")]
    assert splits.val_texts == ["x", "y"] and len(splits.train_texts) == 6
    assert data.check_source(cfg) == []
    raw = {"data": {"source": "org/tweets", "validation": "test"}}
    assert absolute_paths(raw) == raw  # study.yaml keeps the split name, not a path to the folder
    errors = data.check_source(DataConfig(source=_write(tmp_path, [0, 1] * 5), validation="test"))
    assert len(errors) == 1 and "split names select a split of a Hub dataset" in errors[0], errors


def test_label_mapping_orders_numbers_and_strings():
    assert data.label_mapping([4, 0, 2, 0]) == [0, 2, 4]
    assert data.label_mapping(["b", "a"]) == ["a", "b"]
    assert data.label_mapping([1, "a"]) == [1, "a"]  # mixed types: sorted by their text


def test_local_formats(tmp_path):
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]})
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    df.to_json(tmp_path / "d.json", orient="records")
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        assert data.read_local(tmp_path / name).to_dict("list") == df.to_dict("list"), name


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def test_tokenization_is_ragged_and_equals_the_tokenizer(tweets_csv, minilm_tokenizer):
    splits = data.load_splits(DataConfig(source=str(tweets_csv), text="text", label="target", limit=200))
    tokenized = tokens.tokenize(minilm_tokenizer, splits, max_length=24)
    for split, texts, labels in ((tokenized.train, splits.train_texts, splits.train_labels),
                                 (tokenized.val, splits.val_texts, splits.val_labels)):
        expected = minilm_tokenizer(texts, truncation=True, max_length=24)["input_ids"]
        assert len(split) == len(texts)
        assert [split.row(i).tolist() for i in range(len(split))] == expected
        assert split.lengths.tolist() == [len(x) for x in expected]
        assert split.ids.dtype == np.int32 and split.ids.size == sum(len(x) for x in expected)  # no padding
        assert np.array_equal(split.labels, labels)
    lengths = tokenized.train.lengths
    assert lengths.max() == 24 and lengths.min() < 24  # truncated, yet ragged


def test_tokenizer_key(minilm_path, minilm_tokenizer, tiny_models):
    from transformers import AutoTokenizer

    same = AutoTokenizer.from_pretrained(minilm_path)
    saved_copy = AutoTokenizer.from_pretrained(tiny_models("bert"))  # the tiny model ships the MiniLM vocab
    key = tokens.tokenizer_key(minilm_tokenizer, 128)
    assert tokens.tokenizer_key(same, 128) == key
    assert tokens.tokenizer_key(saved_copy, 128) == key
    assert tokens.tokenizer_key(minilm_tokenizer, 64) != key


def test_tokenizer_key_differs_for_a_different_vocabulary(minilm_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    minilm_tokenizer.save_pretrained(tmp_path)
    changed = AutoTokenizer.from_pretrained(tmp_path, do_lower_case=False)
    assert tokens.tokenizer_key(changed, 128) != tokens.tokenizer_key(minilm_tokenizer, 128)
    assert changed("Fire")["input_ids"] != minilm_tokenizer("Fire")["input_ids"]  # and it does tokenize apart


def test_class_weights_skip_absent_classes():
    assert data.class_weights(np.array([0, 0, 0, 1]), 3) == [4 / 9, 4 / 3, 0.0]


def test_tokenizer_key_ignores_what_the_tokenizer_encoded_before(minilm_path):
    """A fast tokenizer keeps its last call's truncation in its backend; the key must not change with it."""
    from transformers import AutoTokenizer

    used, fresh = AutoTokenizer.from_pretrained(minilm_path), AutoTokenizer.from_pretrained(minilm_path)
    used(["a tweet about a fire"], truncation=True, max_length=8, padding="max_length")
    assert tokens.tokenizer_key(used, 128) == tokens.tokenizer_key(fresh, 128)
