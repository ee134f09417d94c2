"""Classification metrics of a trial's validation pass (no `evaluate.load`: it fetches scripts from the Hub at
run time)."""

from __future__ import annotations

import numpy as np


def weighted_cross_entropy(logits: np.ndarray, labels: np.ndarray, weights=None) -> float:
    """Mean cross-entropy, class-weighted when `weights` are given: the validation loss of trials and exports."""
    import torch

    weight = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), weight=weight))


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """precision / recall / F1 of the positive class (id 1) for binary tasks, macro averages over every class
    otherwise; accuracy. A ratio with nothing to count is 0 (scikit-learn's zero_division=0, which it equals:
    tests/test_metrics.py). From the confusion matrix in numpy: importing sklearn.metrics would cost each trial
    worker 1.5 s."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    cm = np.bincount(num_labels * labels + preds, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
    hits, predicted, actual = np.diag(cm).astype(np.float64), cm.sum(axis=0), cm.sum(axis=1)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(num_labels), where=den > 0)

    precision, recall, f1 = ratio(hits, predicted), ratio(hits, actual), ratio(2 * hits, predicted + actual)
    pick = (lambda per_class: per_class[1]) if num_labels == 2 else (lambda per_class: per_class.mean())
    return {"f1": float(pick(f1)), "precision": float(pick(precision)), "recall": float(pick(recall)),
            "accuracy": float(hits.sum() / max(1, len(labels)))}
