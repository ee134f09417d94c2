"""Use an exported bundle: load it, classify texts, score labelled data.

Inference goes through the very code the trials evaluated with: `train.tokens.encode` (truncated, unpadded token
ids), `train.evaluation.predict_logits` / `train.batching.collate` (longest rows first, right padding to a multiple
of 8, the trial's autocast), and a model built by `train.model.build_model` with the bundle's adapter loaded into
it. So a bundle scored on its own validation split reproduces the F1 its trial reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tune_app.bundle.format import ADAPTER_FILES, AGAIN, BUNDLE_FILE, Bundle, base_checkpoint, open_bundle
from tune_app.errors import UsageError, first_line
from tune_app.spec.metrics import SCORES
from tune_app.spec.paths import LOCAL_FORMATS, cannot_make_file, is_local_path, resolve_checkpoint

if TYPE_CHECKING:
    import pandas as pd


# --------------------------------------------------------------------------------------------- inference


@dataclass
class Classifier:
    """A bundle loaded for inference: model on its device, tokenizer, and the trial's batching settings."""

    bundle: Bundle
    model: Any
    tokenizer: Any
    pad_id: int
    device: Any
    autocast: Any
    batch_size: int
    max_length: int


def base_spec(bundle: Bundle):
    """The trial's ModelSpec of the bundle's base model (checkpoint resolved on this machine)."""
    from tune_app.train.model import ModelSpec

    base = bundle.manifest["base"]
    return ModelSpec(checkpoint=base_checkpoint(bundle), data_key="", dtype=base.get("dtype", "auto"),
                     trust_remote_code=bool(base.get("trust_remote_code")), revision=base.get("revision"),
                     target_modules=tuple(base["target_modules"]) if base.get("target_modules") else None)


def _device(device: str | None):
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_classifier(bundle: Bundle, *, device: str | None = None) -> Classifier:
    """Base model + LoRA + head exactly as the trial built them, with the bundle's adapter weights loaded."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tune_app.train.model import build_model, quiet_libraries
    from tune_app.train.precision import autocast_factory, train_in_fp32

    quiet_libraries()
    dev = _device(device)
    spec = base_spec(bundle)
    # The trial's autocast, and its base in the dtype that autocast gave it (`dtype: auto` is fp32 without one).
    autocast, precision = autocast_factory(dev, bundle.manifest["inference"]["precision"])
    torch.manual_seed(0)  # fresh LoRA init is overwritten below; seeded anyway so nothing varies run to run
    with warnings.catch_warnings():  # transformers' deprecation notes from inside peft: not for users
        warnings.simplefilter("ignore", FutureWarning)
        model, family, pad_id = build_model(spec, bundle.manifest["hyperparameters"], bundle.label_names,
                                            on_gpu=dev.type == "cuda", precision=precision)
    train_in_fp32(model, family)  # adapter and head in fp32, computing as the trial's did (precision.py)
    try:  # open_bundle checked the file and its head; this is for what a header cannot show
        result = set_peft_model_state_dict(model, load_file(str(bundle.path / ADAPTER_FILES[1])))
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:  # safetensors' errors, a tensor of the wrong size
        raise UsageError(f"{bundle.path / ADAPTER_FILES[1]}: its weights do not load into the model built from "
                         f"{BUNDLE_FILE} ({first_line(e)}); the bundle is damaged: {AGAIN}") from None
    if result.unexpected_keys:
        raise UsageError(f"{bundle.path}: adapter weights do not fit the model built from {BUNDLE_FILE} "
                         f"(unexpected: {result.unexpected_keys[:3]} ...); export the bundle again")
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(bundle.path))
    return Classifier(bundle, model, tokenizer, pad_id, dev, autocast,
                      int(bundle.manifest["inference"]["batch_size"]), int(bundle.manifest["data"]["max_length"]))


def text_logits(model, tokenizer, texts: list[str], *, pad_id: int, max_length: int, batch_size: int, device,
                autocast) -> np.ndarray:
    """Logits of texts, tokenized, batched and padded exactly as a trial's validation pass."""
    from tune_app.train.evaluation import predict_logits
    from tune_app.train.tokens import TokenizedSplit, encode

    split = TokenizedSplit.from_lists(encode(tokenizer, texts, max_length), np.zeros(len(texts), dtype=np.int64))
    return predict_logits(model, split, pad_id, batch_size, device, autocast)[0]


def classify(clf: Classifier, texts: list[str]) -> np.ndarray:
    """Logits of texts under a loaded bundle."""
    return text_logits(clf.model, clf.tokenizer, texts, pad_id=clf.pad_id, max_length=clf.max_length,
                       batch_size=clf.batch_size, device=clf.device, autocast=clf.autocast)


def probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class ids: P(class 1) >= threshold for binary tasks with a threshold, else the most probable class."""
    if threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def best_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The P(class 1) cut that maximises F1 on these rows (midway to the next lower score; ties: nearest 0.5)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, cuts = precision_recall_curve(labels, probs[:, 1])
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)[:-1]
    best = np.flatnonzero(np.isclose(f1, f1.max()))
    cut = float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])
    lower = np.unique(probs[:, 1])
    lower = lower[lower < cut]
    return (cut + float(lower[-1])) / 2 if len(lower) else cut


def score(labels: np.ndarray, probs: np.ndarray, label_names: list[str], threshold: float | None) -> dict[str, Any]:
    """Metrics (metrics.classification_metrics), per-class report and confusion matrix of one decision rule."""
    from sklearn.metrics import classification_report, confusion_matrix

    from tune_app.train.metrics import classification_metrics

    preds = decide(probs, threshold)
    k = len(label_names)
    report = classification_report(labels, preds, labels=list(range(k)), target_names=label_names,
                                   output_dict=True, zero_division=0)
    return {
        "rule": f"P({label_names[1]}) >= {threshold:.4f}" if threshold is not None and k == 2 else "argmax",
        **classification_metrics(labels, preds, k),
        "per_class": {name: {m: float(report[name][m]) for m in ("precision", "recall", "f1-score", "support")}
                      for name in label_names},
        "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(k))).tolist(),
    }


# --------------------------------------------------------------------------------------------- tables and files


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    """A csv/json/jsonl/parquet file via data.read_local; UsageError when missing or unreadable."""
    from tune_app.spec.data import read_local

    p = Path(path).expanduser()
    kinds = ", ".join(LOCAL_FORMATS)
    if p.is_dir():
        raise UsageError(f"{what} {path}: is a folder, not a file; pass a {kinds} file")
    if not p.exists():
        raise UsageError(f"{what} {path}: no such file")
    if not p.is_file():
        raise UsageError(f"{what} {path}: not a regular file (a device or pipe); pass a {kinds} file")
    if p.suffix.lower() not in LOCAL_FORMATS:
        raise UsageError(f"{what} {path}: unsupported file type {p.suffix!r}; use one of {kinds}")
    if p.stat().st_size == 0:
        raise UsageError(f"{what} {path}: the file is empty (0 bytes); it needs a header row and at least one row")
    try:
        frame = read_local(p)
    except Exception as e:  # noqa: BLE001 - any parse failure is a user-facing input problem
        raise UsageError(f"{what} {path}: cannot read it ({first_line(e)}); pass a {kinds} file") from None
    if len(frame) == 0:
        columns = f" (only the columns {', '.join(map(str, frame.columns))})" if len(frame.columns) else ""
        raise UsageError(f"{what} {path}: has no rows{columns}; nothing to do: pass a file with at least one row")
    return frame


def require_column(df: pd.DataFrame, column: str, path: str, option: str) -> None:
    if column not in df.columns:
        raise UsageError(f"{path}: no column {column!r} (columns: {', '.join(map(str, df.columns))}); "
                         f"name the right one with {option}")


def texts_of(df: pd.DataFrame, column: str, path: str) -> list[str]:
    """The text column as strings; UsageError naming the rows whose text is missing or blank."""
    values = df[column].tolist()
    empty = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and np.isnan(v))
             or not str(v).strip()]
    if empty:
        shown = ", ".join(map(str, empty[:20])) + (" ..." if len(empty) > 20 else "")
        where = f"in column {column!r} (data rows" if path != "--text" else "(texts"
        raise UsageError(f"{path}: {len(empty)} row(s) with empty text {where}, counted from 0: {shown}); drop or "
                         f"fill them")
    return [str(v) for v in values]


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write predictions in the format the file name says (csv/json/jsonl/parquet)."""
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    p.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        df.to_csv(p, index=False)
    elif suffix == ".parquet":
        df.to_parquet(p, index=False)
    elif suffix == ".jsonl":
        df.to_json(p, orient="records", lines=True, force_ascii=False)
    else:
        df.to_json(p, orient="records", indent=2, force_ascii=False)


def check_output(path: str | Path) -> None:
    p = Path(path).expanduser()
    if p.suffix.lower() not in LOCAL_FORMATS:
        raise UsageError(f"--output {path}: unsupported file type {p.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
    if p.exists():
        raise UsageError(f"--output {path}: already exists; choose another file (nothing is overwritten)")
    if why := cannot_make_file(p):
        raise UsageError(f"--output {why}")


# --------------------------------------------------------------------------------------------- predict


def decision_note(bundle: Bundle, threshold: float | None) -> str:
    names = bundle.label_names
    if threshold is None or len(names) != 2:
        return "decision: the most probable class"
    origin = ("chosen on the validation split to maximise F1" if threshold == bundle.threshold
              else "given with --threshold")
    return f"decision: label {names[1]!r} when P({names[1]}) >= {threshold:.4f} ({origin}); otherwise {names[0]!r}"


def prediction_frame(bundle: Bundle, probs: np.ndarray, threshold: float | None) -> pd.DataFrame:
    """label_id, label and one prob_<label> column per class."""
    import pandas as pd

    ids = decide(probs, threshold)
    frame = pd.DataFrame({"label_id": ids, "label": [bundle.label_names[i] for i in ids]})
    for k, name in enumerate(bundle.label_names):
        frame[f"prob_{name}"] = probs[:, k]
    return frame


def predict(bundle_path: str, *, texts: list[str] | None = None, input_path: str | None = None,
            output_path: str | None = None, text_column: str | None = None, threshold: float | None = None,
            device: str | None = None) -> pd.DataFrame:
    """Classify --text strings or a file's text column; writes --output when given and returns the predictions."""
    import pandas as pd

    bundle = open_bundle(bundle_path)
    column = text_column or bundle.text_column
    if input_path is not None and texts:
        raise UsageError("pass either --text (texts on the command line) or --input FILE, not both")
    if input_path is not None:
        if output_path is None:
            raise UsageError("--input needs --output FILE (csv/json/jsonl/parquet) for the predictions")
        check_output(output_path)
        frame = read_table(input_path, "--input")
        require_column(frame, column, input_path, "--text-column")
        rows = texts_of(frame, column, input_path)
    else:
        if not texts:
            raise UsageError("nothing to predict: pass --text \"...\" (repeatable) or --input FILE --output FILE")
        if output_path is not None:
            check_output(output_path)
        frame = pd.DataFrame({column: texts})
        rows = texts_of(frame, column, "--text")
    cut = bundle.decision_threshold(threshold)
    clf = load_classifier(bundle, device=device)
    probs = probabilities(classify(clf, rows))
    out = pd.concat([frame.reset_index(drop=True), prediction_frame(bundle, probs, cut)], axis=1)
    if output_path is not None:
        write_table(out, output_path)
    return out


# --------------------------------------------------------------------------------------------- evaluate


def label_ids(values: list[Any], bundle: Bundle, path: str, column: str) -> np.ndarray:
    """Data labels -> the bundle's class ids (matched by their text, as training named them)."""
    index = {name: i for i, name in enumerate(bundle.label_names)}
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and np.isnan(v))]
    if missing:
        raise UsageError(f"{path}: column {column!r} has {len(missing)} missing label(s) (rows {missing[:20]}); "
                         f"drop or fill them")
    # 1.0 read back from a float column is the label 1 that training saw as the text "1"
    text = [str(int(v)) if isinstance(v, float) and float(v).is_integer() else str(v) for v in values]
    unseen = sorted({t for t in text if t not in index})
    if unseen:
        raise UsageError(f"{path}: column {column!r} holds labels the bundle never saw: {unseen}; it knows "
                         f"{bundle.label_names}")
    return np.array([index[t] for t in text], dtype=np.int64)


def baseline_spec(checkpoint: str):
    """--baseline CHECKPOINT as a ModelSpec, once its config loads (UsageError otherwise): checked before any model
    is loaded or scored."""
    from transformers import AutoConfig

    from tune_app.train.model import ModelSpec

    if is_local_path(checkpoint) and not (folder := Path(checkpoint).expanduser()).is_dir():
        what = "is a file, not a model folder" if folder.exists() else \
            "is written as a local path, and no such folder exists"
        raise UsageError(f"--baseline: {checkpoint!r} {what}; pass a local model folder, or a Hub name this machine "
                         f"has downloaded")
    try:
        path = resolve_checkpoint(checkpoint)
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:  # no such folder, no config.json, a Hub name not downloaded (offline)
        raise UsageError(f"--baseline: cannot load {checkpoint!r}: {first_line(e)} Pass a local model folder, or a Hub "
                         f"name this machine has downloaded") from None
    return ModelSpec(checkpoint=path, data_key="")


def baseline_probs(spec, bundle: Bundle, texts: list[str], device: str | None) -> tuple[np.ndarray, str]:
    """A checkpoint alone (no adapter), loaded as a trial loads its base (`train.model.load_base`: labels, head rows
    matched by label name, pad token): `spec` is the bundle's own base (`base_spec`) or --baseline CHECKPOINT
    (`baseline_spec`). Probabilities, and a note on where its classification head came from."""
    import torch

    from tune_app.spec.families import fresh_weights
    from tune_app.train.model import load_base, quiet_libraries
    from tune_app.train.precision import autocast_factory

    quiet_libraries()
    dev = _device(device)
    autocast, precision = autocast_factory(dev, bundle.manifest["inference"]["precision"])
    torch.manual_seed(0)  # an untrained head is random: the same random head on every run
    base = load_base(spec, bundle.label_names, on_gpu=dev.type == "cuda", precision=precision)
    model, tokenizer, pad_id = base.model, base.tokenizer, base.pad_id
    fresh = sorted({k.split(".")[0] for k in fresh_weights(base.loading)})
    if fresh:
        note = f"its classification head is untrained (random: {', '.join(fresh)}), so it scores near chance"
    else:  # the checkpoint has a classification head: kept (rows matched by label name) or replaced
        note = base.head_note or "its own trained classification head"
    model.to(dev)
    logits = text_logits(model, tokenizer, texts, pad_id=pad_id, max_length=int(bundle.manifest["data"]["max_length"]),
                         batch_size=int(bundle.manifest["inference"]["batch_size"]), device=dev, autocast=autocast)
    return probabilities(logits), note


def evaluate(bundle_path: str, data_path: str, *, label_column: str | None = None, text_column: str | None = None,
             baseline: str | None = None, threshold: float | None = None, device: str | None = None) -> dict:
    """Score a bundle on a labelled file: its decision rule, argmax, and optionally the base checkpoint alone."""
    bundle = open_bundle(bundle_path)
    frame = read_table(data_path, "--data")
    text_col, label_col = text_column or bundle.text_column, label_column or bundle.label_column
    require_column(frame, text_col, data_path, "--text-column")
    require_column(frame, label_col, data_path, "--label")
    texts = texts_of(frame, text_col, data_path)
    labels = label_ids(frame[label_col].tolist(), bundle, data_path, label_col)
    cut = bundle.decision_threshold(threshold)
    # A baseline checkpoint that cannot load fails now, not after the bundle is scored.
    own_base = baseline == "base"
    spec = None if baseline is None else base_spec(bundle) if own_base else baseline_spec(baseline)

    clf = load_classifier(bundle, device=device)
    probs = probabilities(classify(clf, texts))
    report: dict[str, Any] = {
        "bundle": str(bundle.path), "data": str(data_path), "rows": len(texts), "labels": bundle.label_names,
        "tuned": score(labels, probs, bundle.label_names, cut),
    }
    if cut is not None and bundle.num_labels == 2:
        report["tuned_argmax"] = score(labels, probs, bundle.label_names, None)
    if spec is not None:
        base = bundle.manifest["base"]["checkpoint"] if own_base else baseline
        del clf  # free the tuned model before loading the baseline
        base_probs, note = baseline_probs(spec, bundle, texts, device)
        report["baseline"] = {"checkpoint": base, "note": note,
                              **score(labels, base_probs, bundle.label_names, None)}
    return report


def format_report(report: dict) -> str:
    """The evaluation as readable tables: metrics side by side, then per class and confusion matrix."""
    columns = [key for key in ("tuned", "tuned_argmax", "baseline") if key in report]
    titles = {"tuned": "tuned", "tuned_argmax": "tuned (argmax)", "baseline": "baseline (no adapter)"}
    lines = [f"{report['rows']} rows of {report['data']}"]
    for key in columns:
        lines.append(f"  {titles[key]}: {report[key]['rule']}"
                     + (f" ({report[key]['checkpoint']}: {report[key]['note']})" if key == "baseline" else ""))
    rows = [["metric", *(titles[k] for k in columns)]]
    for metric in SCORES:
        rows.append([metric, *(f"{report[k][metric]:.4f}" for k in columns)])
    lines += ["", *_table(rows)]
    tuned = report["tuned"]
    per = [["class", "precision", "recall", "f1", "support"]]
    for name, m in tuned["per_class"].items():
        per.append([name, *(f"{m[k]:.4f}" for k in ("precision", "recall", "f1-score")), str(int(m["support"]))])
    lines += ["", "tuned, per class:", *_table(per)]
    names = report["labels"]
    cm = [["true \\ predicted", *names]]
    cm += [[name, *map(str, row)] for name, row in zip(names, tuned["confusion_matrix"])]
    lines += ["", "tuned, confusion matrix:", *_table(cm)]
    return "\n".join(lines)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out
