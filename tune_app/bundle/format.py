"""The bundle format: what `tune-app export` writes and predict/evaluate read, in one place.

    adapter_config.json, adapter_model.safetensors   the LoRA adapter with its trained classification head
    tokenizer files                                 the base tokenizer with the pad token training used
    bundle.json      manifest: model, trial, base checkpoint, hyperparameters, columns, decision rule
    labels.json      label names, id2label / label2id, class weights
    metrics.json     validation metrics, as the trial reported them and as the bundle reproduces them
    best_config.yaml the study YAML that retrains it;  README.md  the model card;  merged/  (--merge)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_app.errors import UsageError
from tune_app.spec.paths import is_local_checkpoint, resolve_checkpoint

BUNDLE_FILE = "bundle.json"
"""The bundle's manifest: model, trial, base checkpoint, hyperparameters, columns, decision rule."""
LABELS_FILE = "labels.json"
"""Label names (class id order), id2label / label2id, and the class weights training used."""
METRICS_FILE = "metrics.json"
"""Metrics on the validation split: as the trial reported them and as the exported bundle reproduces them."""
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_DIR = "merged"
"""`export --merge`: a plain transformers model with the adapter merged in."""
CARD = "README.md"


@dataclass
class Bundle:
    """An exported bundle on disk: its folder, manifest and labels."""

    path: Path
    manifest: dict[str, Any]
    labels: dict[str, Any]

    @property
    def label_names(self) -> list[str]:
        return list(self.labels["label_names"])

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def threshold(self) -> float | None:
        """P(class 1) >= threshold means class 1 (binary tasks); None: the most probable class."""
        return self.manifest.get("decision", {}).get("threshold")

    def decision_threshold(self, override: float | None) -> float | None:
        """The threshold a prediction uses: --threshold when given, else the bundle's own."""
        if override is not None and not 0.0 <= override <= 1.0:
            raise UsageError(f"threshold {override}: give P(class 1) between 0 and 1")
        return self.threshold if override is None else override

    @property
    def text_column(self) -> str:
        return self.manifest["data"]["text_column"]

    @property
    def label_column(self) -> str:
        return self.manifest["data"]["label_column"]


AGAIN = "export it again with: tune-app export RUN_DIR (--trial ID --out DIR for another trial than the best)"
"""The fix for a damaged bundle: export writes every file of it again, from the run directory."""


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a .safetensors file (name -> dtype, shape, offsets), checked to cover the whole file
    without reading the tensors; ValueError saying what is wrong (empty, cut short, not safetensors)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError("is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > size - 8:
            raise ValueError("is not a safetensors file (its header is missing or cut short)")
        try:
            table = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("is not a safetensors file (its header is not JSON)") from None
    if not isinstance(table, dict):
        raise ValueError("is not a safetensors file (its header is not a table of tensors)")
    tensors = {k: v for k, v in table.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError("is not a safetensors file (its header has no tensor offsets)") from None
    if end != size - 8 - n:
        raise ValueError(f"is cut short or padded: its header describes {8 + n + end} bytes, the file has {size}")
    return tensors


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{path}: not valid JSON ({e}); the bundle is damaged: {AGAIN}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: holds a JSON {type(value).__name__}, not an object; the bundle is damaged: {AGAIN}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with bundle.json for predict/evaluate, or None."""
    sections = {key: manifest.get(key) for key in ("base", "hyperparameters", "data", "inference")}
    if missing := [key for key, value in sections.items() if not isinstance(value, dict)]:
        return f"lacks the object(s) {', '.join(missing)}"
    base, data, inference = sections["base"], sections["data"], sections["inference"]
    if not isinstance(base.get("checkpoint"), str) or not base["checkpoint"]:
        return "base.checkpoint is not the base model's name"
    if base.get("target_modules") is not None and not isinstance(base["target_modules"], list):
        return "base.target_modules is neither null nor a list"
    for key in ("text_column", "label_column"):
        if not isinstance(data.get(key), str) or not data[key]:
            return f"data.{key} is not a column name"
    for where, key in ((data, "max_length"), (inference, "batch_size")):
        if not _is_int(where.get(key)) or where[key] < 1:
            return f"{'data' if where is data else 'inference'}.{key} is {where.get(key)!r}, not a positive integer"
    if not isinstance(inference.get("precision"), str):
        return "inference.precision is not a precision name"
    decision = manifest.get("decision", {})
    if not isinstance(decision, dict):
        return "decision is not an object"
    threshold = decision.get("threshold")
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                  or not 0.0 <= threshold <= 1.0):
        return f"decision.threshold is {threshold!r}: give null (most probable class) or P(class 1) between 0 and 1"
    return None


def labels_problem(labels: dict[str, Any]) -> str | None:
    """What is wrong with labels.json, or None."""
    names = labels.get("label_names")
    if not isinstance(names, list):
        return "label_names is missing or not a list of class names"
    if len(names) < 2 or not all(isinstance(n, str) or _is_int(n) for n in names):
        return f"label_names is {names!r}: give two or more class names (strings)"
    if len({str(n) for n in names}) != len(names):
        return f"label_names {names!r} repeats a class"
    return None


def head_outputs(tensors: dict[str, Any], adapter_config: dict[str, Any]) -> int | None:
    """How many classes the adapter's trained classification head (`modules_to_save`) scores, or None when the
    file names no such head: the fewest rows among its tensors (the output layer; a dense layer before it, as in
    RoBERTa's head, is hidden-size wide)."""
    heads = adapter_config.get("modules_to_save") or []
    if not isinstance(heads, list):
        return None
    rows = [shape[0] for key, info in tensors.items() if "lora_" not in key
            and any(f".{h}." in f".{key}" for h in heads if isinstance(h, str))
            and isinstance(info, dict) and isinstance(shape := info.get("shape"), list) and shape]
    return min(rows) if rows else None


def open_bundle(path: str | Path) -> Bundle:
    """Read a bundle's manifest and labels, every file checked (JSON, keys, types, the adapter's safetensors
    header, its head against the labels); UsageError naming the file when `path` is not a usable bundle."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        what = "no such bundle directory" + (" (it is a file; a bundle is a folder)" if folder.exists() else "")
        raise UsageError(f"{path}: {what}; pass the folder `tune-app export` wrote, or make one with: "
                         f"tune-app export RUN_DIR")
    missing = [name for name in (BUNDLE_FILE, LABELS_FILE, *ADAPTER_FILES) if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"{path}: not a tune-app bundle (missing {', '.join(missing)}); pass the folder "
                         f"`tune-app export` wrote (by default RUN_DIR/best), or {AGAIN}")
    manifest = _json_object(folder / BUNDLE_FILE)
    if why := manifest_problem(manifest):
        raise UsageError(f"{folder / BUNDLE_FILE}: {why}; the bundle is damaged: {AGAIN}")
    labels = _json_object(folder / LABELS_FILE)
    if why := labels_problem(labels):
        raise UsageError(f"{folder / LABELS_FILE}: {why}; the bundle is damaged: {AGAIN}")
    adapter_config = _json_object(folder / ADAPTER_FILES[0])
    weights = folder / ADAPTER_FILES[1]
    try:
        tensors = safetensors_header(weights)
    except (OSError, ValueError) as e:
        raise UsageError(f"{weights}: {e}; the bundle is damaged: {AGAIN}") from None
    names = labels["label_names"]
    if (rows := head_outputs(tensors, adapter_config)) is not None and rows != len(names):
        raise UsageError(f"{folder / LABELS_FILE}: names {len(names)} classes {names}, but the classification head in "
                         f"{weights.name} scores {rows}; the two files come from different exports: {AGAIN}")
    return Bundle(folder, manifest, labels)


def base_checkpoint(bundle: Bundle) -> str:
    """The base model on this machine: a Hub name as is, `package:` resolved here, a local folder if it exists."""
    spelled = bundle.manifest["base"]["checkpoint"]
    try:
        resolved = resolve_checkpoint(spelled)
    except FileNotFoundError as e:
        raise UsageError(f"{bundle.path}: base model {spelled!r} is not available here: {e}") from None
    if is_local_checkpoint(spelled) and not Path(resolved, "config.json").is_file():
        raise UsageError(f"{bundle.path}: base model folder {spelled!r} does not exist on this machine; copy the "
                         f"base model there, or edit base.checkpoint in {BUNDLE_FILE} to where it is")
    return resolved
