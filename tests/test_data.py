"""Data: the blog's split and class weights, `limit`, label mapping, tokenization into ragged arrays, and the
tokenizer key that decides how many times the data is tokenized."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO
from tune_app.errors import ConfigError
from tune_app.spec import config, data
from tune_app.spec.config import DataConfig
from tune_app.spec.paths import absolute_paths
from tune_app.train import tokens


def test_blog_split_and_class_weights(tweets_csv):
    """The reference blog: 80/20 split with seed 42 -> 6,090 / 1,523 rows, weights pos 1.1622, neg 0.8775 (its
    split is not stratified: data.stratify: false)."""
    splits = data.load_splits(DataConfig(source=str(tweets_csv), text="text", label="target", stratify=False))
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


def test_stratify_false_is_the_split_of_before(tweets_csv):
    """data.stratify: false draws exactly the split tune_app drew before the option existed (datasets' seeded
    train_test_split), row for row and in order, with data.limit too."""
    import datasets

    for limit, seed in ((None, 42), (300, 7)):
        cfg = DataConfig(source=str(tweets_csv), text="text", label="target", limit=limit, split_seed=seed,
                         stratify=False)
        frame = data.limit_rows(pd.read_csv(tweets_csv)[["text", "target"]], limit, seed)
        before = datasets.Dataset.from_pandas(frame, preserve_index=False).train_test_split(test_size=0.2, seed=seed)
        splits = data.load_splits(cfg)
        assert splits.train_texts == list(before["train"]["text"])
        assert splits.val_texts == list(before["test"]["text"])


def test_stratified_split_keeps_each_class_share_in_both_splits(tweets_csv, tmp_path):
    """The default split is stratified by label: each class's share of each split is its share of the data (to a
    row), the split sizes are the plain split's, and a rare class gets rows in both splits whatever the seed,
    where a plain shuffle leaves it out of one for some seeds."""
    splits = data.load_splits(DataConfig(source=str(tweets_csv), text="text", label="target"))
    assert (len(splits.train_texts), len(splits.val_texts)) == (6090, 1523)
    everything = np.bincount(np.concatenate([splits.train_labels, splits.val_labels]))
    for labels in (splits.train_labels, splits.val_labels):
        assert np.abs(np.bincount(labels) - everything * len(labels) / everything.sum()).max() < 1
    assert splits.class_weights != data.load_splits(DataConfig(source=str(tweets_csv), text="text", label="target",
                                                               stratify=False)).class_weights

    raw = [0] * 150 + [1] * 45 + [2] * 5  # class 2: 2.5% of the rows
    source = _write(tmp_path, raw)
    by_text = dict(zip([f"text number {i}" for i in range(len(raw))], raw))
    plain_misses = 0
    for seed in range(12):
        splits = data.load_splits(DataConfig(source=source, split_seed=seed))
        train, val = np.bincount(splits.train_labels), np.bincount(splits.val_labels)
        assert (len(splits.train_texts), len(splits.val_texts)) == (160, 40)
        assert list(val) == [30, 9, 1] and list(train) == [120, 36, 4]  # 20% of each class, rounded
        for text, label in zip(splits.train_texts + splits.val_texts,
                               np.concatenate([splits.train_labels, splits.val_labels])):
            assert splits.label_names[label] == str(by_text[text])  # each text keeps its own label
        assert set(splits.train_texts).isdisjoint(splits.val_texts)
        try:
            data.load_splits(DataConfig(source=source, split_seed=seed, stratify=False))
        except data.DataError as e:
            assert "have no" in str(e) and "data.stratify: true" in str(e)
            plain_misses += 1
    assert plain_misses == 6  # class 2 has no validation row in the plain split for 6 of these 12 seeds
    # Seeded: the same seed draws the same rows, another seed others.
    first, again = (data.load_splits(DataConfig(source=source, split_seed=3)) for _ in range(2))
    assert first.train_texts == again.train_texts and first.val_texts == again.val_texts
    assert first.val_texts != data.load_splits(DataConfig(source=source, split_seed=4)).val_texts


def test_validation_quotas_give_every_class_both_splits():
    """The rounding goes to the largest remainders, but never leaves a class out of a split: 2 rows of 100 would
    round to no validation row (0.4), and get one."""
    assert data._validation_quotas(np.array([98, 2]), 20).tolist() == [19, 1]
    assert data._validation_quotas(np.array([50, 30, 20]), 20).tolist() == [10, 6, 4]
    assert data._validation_quotas(np.array([5, 5, 5]), 4).tolist() == [2, 1, 1]  # ties: the first class
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(2, 30, size=rng.integers(2, 8))
        n_val = int(rng.integers(len(counts), counts.sum() - len(counts) + 1))
        quotas = data._validation_quotas(counts, n_val)
        assert quotas.sum() == n_val and (quotas >= 1).all() and (quotas <= counts - 1).all()


def test_a_class_too_small_to_stratify_is_refused_before_ray(tmp_path):
    """A class of one row cannot be in both splits of a stratified split: validate (check_source) and the load
    on the driver (load_splits, before Ray starts) both refuse it with one ConfigError line that names the class,
    its rows and the fixes. With too few validation rows for one of each class, the sizes are named instead."""
    source = _write(tmp_path, ["a"] * 20 + ["b"] * 20 + ["c", "d"], "rare.csv")
    cfg = DataConfig(source=source)
    (error,) = data.check_source(cfg)
    assert error.startswith(f"data.label: class(es) ['c', 'd'] have 1 row each in the 42 row(s) of {source!r}; ")
    assert "stratified by label) puts every class in both splits, so each needs at least 2 rows" in error
    assert "add rows of these classes, drop them, or name a validation file (data.validation)" in error
    with pytest.raises(ConfigError) as raised:
        data.load_splits(cfg)
    assert raised.value.errors == [error]
    # A validation file: nothing is split, so nothing is stratified.
    cfg.validation = _write(tmp_path, ["a", "b"], "v.csv")
    assert data.check_source(cfg) == [] and data.load_splits(cfg).num_labels == 4

    limited = DataConfig(source=_write(tmp_path, ["a"] * 40 + ["b"] * 40 + ["c"] * 2, "limited.csv"), limit=30,
                         split_seed=0)
    kept = data.limit_rows(pd.read_csv(limited.source), 30, 0)["label"].value_counts()
    assert kept["c"] == 1
    (error,) = data.check_source(limited)
    assert error.startswith("data.label: class(es) ['c'] have 1 row each in the 30 row(s) that data.limit=30 keeps")
    assert "raise data.limit or add rows of these classes" in error

    few = DataConfig(source=_write(tmp_path, ["a", "b", "c", "d"] * 3, "few.csv"), val_size=0.2)
    (error,) = data.check_source(few)
    assert error == (f"data.source: 12 row(s) of {few.source!r} split with val_size=0.2 leave 9 train / 3 validation "
                     f"row(s); 4 classes need at least 4 train rows and 4 validation rows (one per class: the split "
                     f"is stratified by label) (use more rows, or a larger data.val_size)")
    with pytest.raises(ConfigError, match="4 classes need at least 4 train rows and 4 validation rows"):
        data.load_splits(few)
    few.val_size = 0.34
    assert data.check_source(few) == [] and len(data.load_splits(few).val_texts) == 5
    # Both at once: every problem is named, not the first only.
    sizes, single = data.check_source(DataConfig(source=_write(tmp_path, ["a"] * 4 + ["b"], "both.csv")))
    assert sizes.startswith("data.source: 5 row(s) of") and "2 classes need at least 2 train rows and 2" in sizes
    assert single.startswith("data.label: class(es) ['b'] have 1 row each in the 5 row(s) of")


def test_stratify_must_be_a_boolean(tmp_path):
    errors: list[str] = []
    config.from_dict({"name": "s", "data": {"source": "org/name", "stratify": "maybe"}, "models": {"m": "org/m"}},
                     errors)
    assert errors == ["data.stratify: must be a boolean, got 'maybe'"]
    cfg = config.from_dict({"name": "s", "data": {"source": "org/name"}, "models": {"m": "org/m"}}, errors)
    assert cfg.data.stratify is True


def test_the_blog_study_keeps_the_blog_split():
    """search_spaces/disaster_tweets.yaml reproduces the blog's published (plain) split."""
    cfg = config.load(REPO / "search_spaces" / "disaster_tweets.yaml", check_data=False)
    assert cfg.data.stratify is False and (cfg.data.val_size, cfg.data.split_seed) == (0.2, 42)


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


def test_a_run_made_before_stratify_keeps_its_plain_split(tmp_path):
    """A run's study.yaml written before data.stratify existed was split unstratified: resume, export and report
    read it so (config.RUN_DEFAULTS), and a study YAML of the user's gets today's default."""
    from tune_app.spec.config import load

    path = tmp_path / "study.yaml"
    path.write_text("name: s\ndata: {source: x.csv}\nmodels: {m: {checkpoint: x}}\n")
    assert load(path, check_data=False).data.stratify is True
    assert load(path, check_data=False, of_run=True).data.stratify is False
    path.write_text("name: s\ndata: {source: x.csv, stratify: true}\nmodels: {m: {checkpoint: x}}\n")
    assert load(path, check_data=False, of_run=True).data.stratify is True
