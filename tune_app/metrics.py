"""Classification metrics with scikit-learn (no `evaluate.load`: it fetches scripts from the Hub at run time)."""

from __future__ import annotations

import numpy as np


def weighted_cross_entropy(logits: np.ndarray, labels: np.ndarray, weights=None) -> float:
    """Mean cross-entropy, class-weighted when `weights` are given: the validation loss of trials and exports."""
    import torch

    weight = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), weight=weight))


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """precision / recall / F1 of the positive class (id 1) for binary tasks, macro averages otherwise; accuracy."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if num_labels == 2:
        average, kwargs = "binary", {"pos_label": 1}
    else:
        average, kwargs = "macro", {"labels": list(range(num_labels))}
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, average=average, zero_division=0, **kwargs)
    return {"f1": float(f1), "precision": float(precision), "recall": float(recall),
            "accuracy": float(accuracy_score(labels, preds))}
