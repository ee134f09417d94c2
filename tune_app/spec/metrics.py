"""The metrics every trial reports on the validation split after each epoch, and which of two values is better.

One place for their names: the schema's `tune.metric`, the trial's evaluation, trials.csv's columns, the summary,
the bundle's metrics.json and the report all read them from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

METRICS = ("f1", "precision", "recall", "accuracy", "eval_loss")
"""Reported by every trial after each epoch; any of them can be the study's tune.metric."""
SCORES = METRICS[:4]
"""The classification scores (higher is better), without the loss."""


def better(a: float, b: float, mode: str) -> bool:
    """Whether metric value `a` beats `b` under tune.mode (`max` or `min`)."""
    return a > b if mode == "max" else a < b


def best_of(items: Iterable[T], value: Callable[[T], float | None], mode: str) -> T | None:
    """The first item whose value is best under tune.mode, items without one (None) passed over; None when no item
    has one. How epochs, trials, seeds and models are ranked: on a tie the first wins."""
    best, best_value = None, None
    for item in items:
        v = value(item)
        if v is not None and (best_value is None or better(v, best_value, mode)):
            best, best_value = item, v
    return best
