"""Data: sources (Hub name or local file), label mapping, the train/validation split, class weights, and
tokenization into compact ragged arrays that go to the Ray object store once per distinct tokenizer.

`check_source` (used by `validate`) reads local files with pandas only; nothing here imports torch or Ray
at module level.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tune_app.errors import ConfigError, DataError
from tune_app.spec.paths import LOCAL_FORMATS, is_hub_name, is_local_source, validation_is_file, written_as_file

if TYPE_CHECKING:
    import pandas as pd

    from tune_app.spec.config import DataConfig


def read_local(path: str | os.PathLike) -> pd.DataFrame:
    """A local csv/json/jsonl/parquet file as a DataFrame."""
    import pandas as pd

    p = Path(path).expanduser()
    fmt = LOCAL_FORMATS.get(p.suffix.lower())
    if fmt == "csv":
        return pd.read_csv(p, keep_default_na=True)
    if fmt == "parquet":
        return pd.read_parquet(p)
    if fmt == "json":
        return _read_json(p)
    raise DataError(f"{path}: unsupported file type {p.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")


def _read_json(p: Path) -> pd.DataFrame:
    """Rows from a .json/.jsonl file in any layout pandas writes: JSON lines, a list of records, or a table by
    columns (`DataFrame.to_json()`'s default: {"text": {"0": ...}}) or split ({"columns", "index", "data"})."""
    import io

    import pandas as pd

    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".jsonl":
        return pd.read_json(io.StringIO(text), lines=True)
    try:
        parsed = json.loads(text)
    except ValueError:  # several JSON values: JSON lines in a .json file
        return pd.read_json(io.StringIO(text), lines=True)
    if isinstance(parsed, dict) and {"columns", "data"} <= parsed.keys():
        return pd.read_json(io.StringIO(text), orient="split")
    if isinstance(parsed, dict) and parsed and all(isinstance(v, (dict, list)) for v in parsed.values()):
        return pd.read_json(io.StringIO(text), orient="columns")
    if isinstance(parsed, dict):  # one JSON line: one row
        return pd.read_json(io.StringIO(text), lines=True)
    if isinstance(parsed, list):
        return pd.read_json(io.StringIO(text))
    raise DataError(f"{p}: holds a single JSON {type(parsed).__name__}, not rows; write a list of records, JSON "
                    f"lines, or a table as pandas writes it (DataFrame.to_json)")


def _label_kind(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "number"
    return "string" if isinstance(value, str) else type(value).__name__


def mixed_label_types(labels: list[Any]) -> str | None:
    """Why labels of more than one kind (numbers beside strings, as a JSON file may hold 1 and "1") cannot be
    classes: the two would be two classes, or sort unpredictably. None when they are all of one kind."""
    examples: dict[str, Any] = {}
    for value in labels:
        examples.setdefault(_label_kind(value), value)
    if len(examples) < 2:
        return None
    found = " and ".join(f"{kind}s (e.g. {value!r})" for kind, value in sorted(examples.items()))
    return (f"mixes {found}; write every label alike, all as numbers or all as strings (quoted), so that 1 and "
            f"'1' are one class")


def limit_rows(df: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """The first `limit` rows of a seeded shuffle (all rows when limit is None)."""
    if limit is None:
        return df
    return df.iloc[np.random.default_rng(seed).permutation(len(df))[:limit]]


def _check_frame(df: pd.DataFrame, data: DataConfig, where: str, *, apply_limit: bool) -> list[str]:
    errors = []
    missing = [c for c in (data.text, data.label) if c not in df.columns]
    for column, key in ((data.text, "text"), (data.label, "label")):
        if column in missing:
            errors.append(f"data.{key}: column {column!r} is not in {where}; columns there: "
                          f"{', '.join(map(str, df.columns))}")
    if missing:
        return errors
    full_classes = df[data.label].dropna().nunique()
    if apply_limit:
        df = limit_rows(df, data.limit, data.split_seed)
    if len(df) == 0:
        return [f"data.limit: no rows left in {where} (limit={data.limit}, rows={len(df)})"
                if apply_limit and data.limit is not None else f"data.source: {where} has no rows"]
    n_missing = int(df[data.label].isna().sum())
    if n_missing:
        rows = df.index[df[data.label].isna()][:5].tolist()
        errors.append(f"data.label: column {data.label!r} in {where} has {n_missing} missing value(s) "
                      f"(first rows: {rows}); drop or fill them")
    if why := mixed_label_types(df[data.label].dropna().tolist()):
        return [*errors, f"data.label: column {data.label!r} in {where} {why}"]
    n_classes = df[data.label].dropna().nunique()
    if n_classes < 2 and full_classes >= 2:  # only the limit's sample is one class
        errors.append(f"data.limit: the {len(df)} row(s) of {where} that data.limit={data.limit} keeps are all one "
                      f"class ({df[data.label].dropna().unique().tolist()} of {full_classes}); raise data.limit")
    elif n_classes < 2:
        errors.append(f"data.label: column {data.label!r} in {where} has a single class "
                      f"({df[data.label].dropna().unique().tolist()}); classification needs at least two")
    texts = df[data.text]
    n_empty = int((texts.isna() | texts.map(lambda t: isinstance(t, str) and not t.strip())).sum())
    if n_empty:
        errors.append(f"data.text: column {data.text!r} in {where} has {n_empty} empty value(s) (missing or only "
                      f"spaces); drop or fill them")
    if apply_limit and data.validation is None and n_classes >= 2:
        errors.extend(_split_problems(df[data.label], data, where) if not n_missing else
                      _check_split_sizes(len(df), n_classes, data, where))
    return errors


def _split_problems(labels: pd.Series, data: DataConfig, where: str) -> list[str]:
    """Why the val_size split of these labels cannot be drawn: too few rows for its sizes, or (stratified) a
    class of one row, which cannot be in both splits. Found before Ray starts: by validate, and by load_splits."""
    counts = labels.value_counts(dropna=False, sort=False)
    errors = _check_split_sizes(len(labels), len(counts), data, where)
    single = label_mapping(counts.index[counts < 2].tolist())
    if data.stratify and single:
        kept = f" that data.limit={data.limit} keeps" if data.limit is not None else ""
        more = "raise data.limit or add rows" if data.limit is not None else "add rows"
        errors.append(f"data.label: class(es) {single} have 1 row each in the {len(labels)} row(s){kept} of {where}; "
                      f"the split (val_size={data.val_size}, stratified by label) puts every class in both splits, so "
                      f"each needs at least 2 rows: {more} of these classes, drop them, or name a validation file "
                      f"(data.validation), which leaves every row to training")
    return errors


def validation_rows(rows: int, data: DataConfig) -> int:
    """Rows the val_size split holds out, stratified or not: rounded up, as datasets' train_test_split rounds."""
    return math.ceil(data.val_size * rows)


def _check_split_sizes(rows: int, n_classes: int, data: DataConfig, where: str) -> list[str]:
    """The val_size split must leave at least one train row per class, and a validation row (one per class when
    stratified)."""
    n_val = validation_rows(rows, data)
    n_train = rows - n_val
    need_val = n_classes if data.stratify else 1
    if n_val >= need_val and n_train >= n_classes:
        return []
    key = "data.limit" if data.limit is not None else "data.source"
    fix = "use more rows, or a larger data.val_size" if n_train >= n_classes and rows >= 2 * n_classes else \
        "use more rows"
    return [f"{key}: {rows} row(s) of {where} split with val_size={data.val_size} leave {n_train} train / "
            f"{n_val} validation row(s); {n_classes} classes need at least {n_classes} train rows and {need_val} "
            f"validation row{'s (one per class: the split is stratified by label)' if data.stratify else ''} "
            f"({fix})"]


def check_source(data: DataConfig) -> list[str]:
    """Problems with the data a study names, found without Ray or torch. Hub names are checked for form only."""
    errors: list[str] = []
    if data.validation is not None and is_local_source(data.source) and not written_as_file(data.validation) \
            and not Path(data.validation).expanduser().is_file():
        return [f"data.validation: {data.validation!r} is neither an existing local file nor usable as a split name: "
                f"split names select a split of a Hub dataset, and data.source is a local file; pass a validation "
                f"file, or null to split off val_size"]
    frames = {}
    for key, value in (("source", data.source), ("validation", data.validation)):
        if value is None:
            continue
        if not (is_local_source(value) if key == "source" else validation_is_file(data.source, value)):
            # a Hub dataset or split: offline, only its form can be checked
            if key == "source" and not is_hub_name(value):
                errors.append(f"data.source: {value!r} is neither an existing local file nor a Hub dataset name "
                              f"like 'org/name'")
            continue
        p = Path(value).expanduser()
        if not p.is_file():
            if p.is_dir():
                what = "is a folder, not a data file; name a .csv/.json/.jsonl/.parquet file inside it"
            elif p.exists():
                what = "is not a regular file (a device, pipe or socket); name a .csv/.json/.jsonl/.parquet file"
            else:
                what = f"does not exist (relative paths are read from {os.getcwd()})"
            errors.append(f"data.{key}: local file {value!r} {what}")
            continue
        if p.suffix.lower() not in LOCAL_FORMATS:
            errors.append(f"data.{key}: unsupported file type {p.suffix!r} in {value!r}; use one of "
                          f"{', '.join(LOCAL_FORMATS)}")
            continue
        try:
            df = read_local(p)
        except Exception as e:  # noqa: BLE001 - any parse failure is a user-facing data problem
            errors.append(f"data.{key}: cannot read {value!r}: {e}")
            continue
        found = _check_frame(df, data, repr(value), apply_limit=key == "source")
        errors.extend(found)
        if not found:
            frames[key] = df
    if len(frames) == 2:
        source = frames["source"][data.label]
        kept = limit_rows(frames["source"], data.limit, data.split_seed)[data.label]
        errors.extend(_check_validation_labels(kept, frames["validation"][data.label], data, source))
    if frames and data.positive_label is not None and not errors:
        try:
            positive_last(label_mapping([v for f in frames.values() for v in f[data.label].dropna()]), data)
        except DataError as e:
            errors.append(str(e))
    return errors


def _check_validation_labels(train: pd.Series, val: pd.Series, data: DataConfig,
                             source: pd.Series) -> list[str]:
    """A validation split may only hold labels the training data has (each is a class the model learns).
    `train`: the training rows data.limit keeps; `source`: all of data.source's labels."""
    known = set(train.dropna().tolist())
    unseen = label_mapping(list(set(val.dropna().tolist()) - known))
    if not unseen:
        return []
    if data.limit is not None and set(unseen) <= set(source.dropna().tolist()):  # the limit left a class out
        return [f"data.limit: the {len(train)} training row(s) that data.limit={data.limit} keeps have no row of the "
                f"labels {unseen} that data.validation {data.validation!r} holds (labels kept: "
                f"{label_mapping(list(known))}); raise data.limit, or check the labels are written alike in both files"]
    return [f"data.validation: labels {unseen} of {data.validation!r} are not in data.source's training rows "
            f"(labels there: {label_mapping(list(known))}); write the labels alike in both files"]


@dataclass
class Splits:
    """Texts and 0..K-1 labels of both splits, with the label names and the train split's class weights."""

    train_texts: list[str]
    train_labels: np.ndarray
    val_texts: list[str]
    val_labels: np.ndarray
    label_names: list[str]
    class_weights: list[float]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _as_frame(source: str, split: str | None, data: DataConfig) -> pd.DataFrame:
    if is_local_source(source):
        return read_local(source)
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split or "train")
    except Exception as e:
        raise DataError(f"data.source: cannot load Hub dataset {source!r} (split {split or 'train'!r}): {e}. "
                        f"Offline? Pass a local file: data.source=path/to/train.csv") from e
    return ds.select_columns([c for c in (data.text, data.label) if c in ds.column_names]).to_pandas()


def label_mapping(values: list[Any]) -> list[Any]:
    """Sorted distinct labels: position in this list is the class id (0/2/4 -> 0/1/2, strings sorted)."""
    distinct = set(values)
    try:
        return sorted(distinct)
    except TypeError:
        return sorted(distinct, key=str)


def positive_last(order: list[Any], data: DataConfig) -> list[Any]:
    """The label order with data.positive_label as class id 1 (two classes); DataError when it cannot be."""
    positive = data.positive_label
    if positive is None:
        return order
    match = [v for v in order if str(v) == str(positive)]
    if not match:
        raise DataError(f"data.positive_label: {positive!r} is not a label of the data (labels: {order}); name one "
                        f"of them as written in column {data.label!r}")
    if len(order) != 2:
        raise DataError(f"data.positive_label: only for two classes, and the data has {len(order)} ({order}); with "
                        f"more, F1, precision and recall are macro averages over all classes: set it to null")
    return [v for v in order if v is not match[0]] + match


def class_weights(labels: np.ndarray, num_labels: int) -> list[float]:
    """n / (K x count_k), the blog's weights (pos 1.1622, neg 0.8775 on the disaster tweets split)."""
    counts = np.bincount(labels, minlength=num_labels)
    return [float(len(labels) / (num_labels * c)) if c else 0.0 for c in counts]


def _refuse_mixed_labels(frame: pd.DataFrame, data: DataConfig, where: str) -> None:
    """DataError when one file's label column mixes kinds (two files labelled alike but of different kinds are
    _check_validation_labels' to name)."""
    if data.label in frame.columns and (why := mixed_label_types(frame[data.label].dropna().tolist())):
        raise DataError(f"data.label: column {data.label!r} of {where!r} {why}")


def _refuse_empty_classes(order: list[Any], train: np.ndarray, val: np.ndarray, data: DataConfig) -> None:
    """Every class needs training rows (it is never learned otherwise: its class weight would be 0) and, in the
    split tune_app draws itself, validation rows (its F1 would be scored on nothing). A stratified split always
    has them (_split_problems refused it otherwise); an unstratified one may not."""
    for split, labels in (("training", train), ("validation", val)):
        if split == "validation" and data.validation is not None:
            continue  # the user's own validation file: what it holds is theirs to choose
        missing = np.flatnonzero(np.bincount(labels, minlength=len(order)) == 0)
        if len(missing):
            empty = [order[i] for i in missing]
            drawn = (f"data.source's {len(train)} row(s)" if data.validation is not None else
                     f"the split (val_size={data.val_size}, split_seed={data.split_seed}) of "
                     f"{len(train) + len(val)} row(s)")
            rows = np.bincount(np.concatenate([train, val]), minlength=len(order))
            stratify = (", data.stratify: true" if data.validation is None and not data.stratify
                        and (rows[missing] >= 2).all() else "")  # it puts a class of 2 rows or more in both splits
            raise DataError(f"data.label: class(es) {empty} have no {split} row in {drawn}; every class needs rows "
                            f"in both splits: use more rows (data.limit), another data.val_size{stratify}, or drop "
                            f"the class")


def _validation_quotas(counts: np.ndarray, n_val: int) -> np.ndarray:
    """Validation rows per class: its share of n_val (the largest remainders, then the first classes, take the
    rounding), but at least 1 and at most count - 1, so that every class is in both splits. _split_problems has
    checked that this is possible (every count >= 2, and n_val between the number of classes and rows - classes)."""
    total = int(counts.sum())
    quotas = np.clip(counts * n_val // total, 1, counts - 1)
    while (gap := n_val - int(quotas.sum())) != 0:  # fewer steps than classes
        behind = counts * n_val - quotas * total  # how far each class is below its exact share (x total)
        if gap > 0:
            quotas[np.argmax(np.where(quotas < counts - 1, behind, np.iinfo(np.int64).min))] += 1
        else:
            quotas[np.argmin(np.where(quotas > 1, behind, np.iinfo(np.int64).max))] -= 1
    return quotas


def _stratified_rows(labels: pd.Series, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and validation rows of a split stratified by label: one seeded shuffle (split_seed),
    and each class's first quota rows in it go to validation. The split sizes are the unstratified split's."""
    import pandas as pd

    codes, _ = pd.factorize(labels, use_na_sentinel=False)
    counts = np.bincount(codes)
    quotas = _validation_quotas(counts, validation_rows(len(codes), data))
    order = np.random.default_rng(data.split_seed).permutation(len(codes))
    classes = codes[order]
    by_class = np.argsort(classes, kind="stable")  # positions in `order`, class by class, each in shuffled order
    rank = np.empty_like(by_class)  # of each row among its class's rows in `order`
    rank[by_class] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    held_out = rank < quotas[classes]
    return order[~held_out], order[held_out]


def load_splits(data: DataConfig, label_order: list[Any] | None = None) -> Splits:
    """Load, limit, split and map labels exactly as the study YAML says."""
    import datasets

    source = _as_frame(data.source, None, data)
    df = limit_rows(source[[data.text, data.label]], data.limit, data.split_seed)
    _refuse_mixed_labels(df, data, data.source)
    full = datasets.Dataset.from_pandas(df, preserve_index=False)
    if data.validation is not None:  # a local file, else a split of the Hub source
        train = full
        val_frame = (read_local(data.validation) if validation_is_file(data.source, data.validation)
                     else _as_frame(data.source, data.validation, data))
        _refuse_mixed_labels(val_frame, data, data.validation)
        if not label_order and (errors := _check_validation_labels(df[data.label], val_frame[data.label], data,
                                                                   source[data.label])):
            raise DataError(errors[0])
        val = datasets.Dataset.from_pandas(val_frame[[data.text, data.label]], preserve_index=False)
    elif errors := _split_problems(df[data.label], data, repr(data.source)):
        raise ConfigError(errors)
    elif data.stratify:
        train_rows, val_rows = _stratified_rows(df[data.label], data)
        train, val = full.select(train_rows), full.select(val_rows)
    else:  # the reference experiment's split: datasets' seeded shuffle
        parts = full.train_test_split(test_size=data.val_size, seed=data.split_seed)
        train, val = parts["train"], parts["test"]
    order = label_order or positive_last(label_mapping(list(train[data.label]) + list(val[data.label])), data)
    index = {v: i for i, v in enumerate(order)}
    unseen = sorted({v for v in list(train[data.label]) + list(val[data.label]) if v not in index}, key=str)
    if unseen:
        raise DataError(f"data.label: labels {unseen} are not among the known labels {order}")
    train_labels = np.array([index[v] for v in train[data.label]], dtype=np.int64)
    val_labels = np.array([index[v] for v in val[data.label]], dtype=np.int64)
    if not label_order:
        _refuse_empty_classes(order, train_labels, val_labels, data)
    return Splits(
        train_texts=[str(t) for t in train[data.text]], train_labels=train_labels,
        val_texts=[str(t) for t in val[data.text]], val_labels=val_labels,
        label_names=[str(v) for v in order], class_weights=class_weights(train_labels, len(order)),
    )


