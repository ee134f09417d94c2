"""The metrics every trial reports on the validation split after each epoch, and which of two values is better.

One place for their names: the schema's `tune.metric`, the trial's evaluation, trials.csv's columns, the summary,
the bundle's metrics.json and the report all read them from here.
"""

from __future__ import annotations

METRICS = ("f1", "precision", "recall", "accuracy", "eval_loss")
"""Reported by every trial after each epoch; any of them can be the study's tune.metric."""
SCORES = METRICS[:4]
"""The classification scores (higher is better), without the loss."""


def better(a: float, b: float, mode: str) -> bool:
    """Whether metric value `a` beats `b` under tune.mode (`max` or `min`)."""
    return a > b if mode == "max" else a < b
