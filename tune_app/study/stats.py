"""How sure a study's numbers are: a t interval on the mean of a configuration's seeds (confirmation), and
bootstrap intervals over the validation rows for each model's best score (the report's model comparison).

A validation split of 1,523 rows puts about +/-0.02 on an F1 near 0.8: two models 0.01 apart are often the same
model as far as these rows can tell, and the comparison says so.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tune_app.spec.metrics import SCORES

CONFIDENCE = 0.95
RESAMPLES = 2000
"""Bootstrap resamples: the 2.5% and 97.5% quantiles of 2,000 move by about 0.002 in F1 from seed to seed."""


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95% Student t interval of the mean of `values` (the last two None
    for a single value)."""
    from scipy import stats

    n, mean = len(values), float(np.mean(values))
    if n < 2:  # one seed finished (the others failed): a mean, but no spread to speak of
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def resampled_scores(labels: np.ndarray, predictions: np.ndarray, metric: str, num_labels: int,
                     rows: np.ndarray) -> np.ndarray:
    """`metric` (a score of spec.metrics, computed as a trial computes it) on each resample: `rows` is (resamples,
    rows) indices into the validation split."""
    y, p = labels[rows], predictions[rows]
    if metric == "accuracy":
        return (y == p).mean(axis=1)
    classes = [1] if num_labels == 2 else range(num_labels)  # binary: the positive class; else the macro average
    per_class = []
    for c in classes:
        hits = ((y == c) & (p == c)).sum(axis=1).astype(np.float64)
        predicted, actual = (p == c).sum(axis=1), (y == c).sum(axis=1)
        den = {"f1": predicted + actual, "precision": predicted, "recall": actual}[metric]
        num = 2 * hits if metric == "f1" else hits
        per_class.append(np.divide(num, den, out=np.zeros_like(num), where=den > 0))
    return np.mean(per_class, axis=0)


def bootstrap_comparison(labels: np.ndarray, predictions: dict[str, np.ndarray], metric: str, mode: str,
                         num_labels: int, *, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per model (its best trial's predictions on the validation rows): the score, its 95% percentile bootstrap
    interval, and whether it is clearly worse than the best model: the 95% interval of the paired difference
    (every model scored on the same resampled rows) lies wholly on the worse side of 0. Empty for a metric that is
    not a score of predictions (eval_loss)."""
    if metric not in SCORES or not predictions:
        return {}
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // max(1, n))  # resamples per batch: bounded memory on large validation splits
    scores: dict[str, list[np.ndarray]] = {m: [] for m in predictions}
    for start in range(0, resamples, chunk):
        rows = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        for model, predicted in predictions.items():
            scores[model].append(resampled_scores(labels, np.asarray(predicted, dtype=np.int64), metric,
                                                  num_labels, rows))
    full = np.arange(n)[None, :]
    point = {m: float(resampled_scores(labels, np.asarray(p, dtype=np.int64), metric, num_labels, full)[0])
             for m, p in predictions.items()}
    drawn = {m: np.concatenate(s) for m, s in scores.items()}
    best = (max if mode == "max" else min)(point, key=point.get)
    low, high = (1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2
    out = {}
    for model, values in drawn.items():
        gap = drawn[best] - values if mode == "max" else values - drawn[best]  # > 0: the best model is better
        out[model] = {
            metric: point[model],
            "ci95": [float(np.quantile(values, low)), float(np.quantile(values, high))],
            "gap_to_best_ci95": [float(np.quantile(gap, low)), float(np.quantile(gap, high))],
            "clearly_worse": model != best and float(np.quantile(gap, low)) > 0,
        }
    return out
