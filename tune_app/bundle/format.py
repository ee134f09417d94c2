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


def open_bundle(path: str | Path) -> Bundle:
    """Read a bundle's manifest and labels; UsageError when `path` is not an exported bundle."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{path}: no such bundle directory (make one with: tune-app export RUN_DIR)")
    missing = [name for name in (BUNDLE_FILE, LABELS_FILE, *ADAPTER_FILES) if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"{path}: not a tune-app bundle (missing {', '.join(missing)}); pass the folder "
                         f"`tune-app export` wrote (by default RUN_DIR/best)")
    try:
        manifest = json.loads((folder / BUNDLE_FILE).read_text())
        labels = json.loads((folder / LABELS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable bundle manifest ({e}); export it again") from None
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
