"""The trial's metrics (numpy, from the confusion matrix) equal scikit-learn's: binary F1 of class 1, macro averages
over every class, and the zero_division=0 cases (a class never predicted, never present, or neither)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from tune_app.train.metrics import classification_metrics


def sklearn_metrics(labels, preds, num_labels) -> dict[str, float]:
    if num_labels == 2:
        average, kwargs = "binary", {"pos_label": 1}
    else:
        average, kwargs = "macro", {"labels": list(range(num_labels))}
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, average=average, zero_division=0,
                                                               **kwargs)
    return {"f1": f1, "precision": precision, "recall": recall, "accuracy": accuracy_score(labels, preds)}


@pytest.mark.parametrize("num_labels", [2, 3, 5])
@pytest.mark.parametrize("seed", range(20))
def test_metrics_equal_scikit_learn(num_labels, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # Few classes drawn: some classes never occur in the labels, the predictions, or either.
    labels = rng.integers(0, num_labels, n) if seed % 3 else rng.integers(0, 2, n)
    preds = rng.integers(0, num_labels, n) if seed % 4 else np.zeros(n, dtype=np.int64)
    ours, theirs = classification_metrics(labels, preds, num_labels), sklearn_metrics(labels, preds, num_labels)
    assert ours == pytest.approx(theirs, abs=1e-12), (labels.tolist(), preds.tolist())


def test_edge_cases_equal_scikit_learn():
    cases = [([1, 1, 1], [0, 0, 0], 2),   # the positive class never predicted
             ([0, 0, 0], [0, 0, 0], 2),   # nor present
             ([0, 0, 0], [1, 1, 1], 2),   # predicted, never present
             ([0, 1, 2], [0, 1, 2], 4)]   # a class that appears nowhere
    for labels, preds, k in cases:
        labels, preds = np.array(labels), np.array(preds)
        assert classification_metrics(labels, preds, k) == pytest.approx(sklearn_metrics(labels, preds, k),
                                                                         abs=1e-12), (labels, preds)
