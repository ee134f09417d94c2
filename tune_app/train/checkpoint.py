"""What a trial's checkpoint holds beside its adapter files: the training state a resume restores (STATE_FILE) and
the epoch's metrics with the trial's hyperparameters and model (CHECKPOINT_METRICS, what export reads). Written and
read here for solo and packed trials alike, so both checkpoints are one format. Beside them, the epoch's
validation predictions (VAL_PREDICTIONS)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tune_app.spec.rundir import CHECKPOINT_METRICS, STATE_FILE, VAL_PREDICTIONS


def write(folder: str | Path, *, state: dict[str, Any], epoch: int, train_seconds: float, metrics: dict[str, Any],
          identity: dict[str, Any], predictions: np.ndarray) -> None:
    """The training state (`state`: optimizer, schedule, loss scaler, micro-batch; plus epoch and clock), the
    metrics (with `identity`: the trial's config, model and seed) and the validation predictions into a folder that
    already holds the adapter."""
    import torch

    torch.save({**state, "epoch": epoch, "train_seconds": train_seconds}, str(Path(folder) / STATE_FILE))
    Path(folder, CHECKPOINT_METRICS).write_text(json.dumps({**metrics, **identity}, indent=2, default=str))
    np.save(Path(folder, VAL_PREDICTIONS), np.asarray(predictions, dtype=np.int32))


def read_state(folder: str | Path, device) -> dict[str, Any]:
    """The training state a checkpoint saved, its tensors on `device`."""
    import torch

    return torch.load(str(Path(folder) / STATE_FILE), map_location=device, weights_only=False)
