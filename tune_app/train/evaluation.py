"""Evaluation: logits for every row of a split (the same code an exported bundle predicts with), and the
validation metrics a trial reports after each epoch.
"""

from __future__ import annotations

import numpy as np

from tune_app.train.batching import CPU_INFERENCE_ROWS, collate, inference_batches
from tune_app.train.memory import is_oom, oom_test_limit
from tune_app.train.metrics import classification_metrics, weighted_cross_entropy
from tune_app.train.tokens import TokenizedSplit


def eval_batch_size(configured: int, train_batch_size: int) -> int:
    """A trial's evaluation batch size: the study's eval_batch_size, or four of its training batches where that is
    more (evaluation keeps no activations, so larger batches fit)."""
    return max(configured, 4 * train_batch_size)


def predict_logits(model, split: TokenizedSplit, pad_id: int, batch_size: int, device,
                   autocast, *, modes_kept: bool = False) -> tuple[np.ndarray, int]:
    """Logits for every row of a split (in row order), in `inference_batches` (of at most CPU_INFERENCE_ROWS rows
    on a CPU), and the batch size that fit: out of memory, the batches halve (a trial whose training fit only after
    its micro-batch halved must not fail in evaluation), and the caller keeps the size that fit for its next
    evaluation. The model is put in eval mode, unless `modes_kept` (a pack's model, whose forwards' layout turns
    dropout off for the evaluated rows while its other trials train)."""
    import torch

    if device.type == "cpu":
        batch_size = min(batch_size, CPU_INFERENCE_ROWS)
    out = np.zeros((len(split), model.config.num_labels), dtype=np.float32)
    test_limit = oom_test_limit()
    if not modes_kept:
        model.eval()
    while True:
        try:
            with torch.inference_mode(), autocast():
                for rows in inference_batches(split.lengths, batch_size):
                    if test_limit and batch_size > test_limit:  # rows of the widest batch, as tokens go
                        raise torch.OutOfMemoryError(f"CUDA out of memory (test: batch {batch_size} > "
                                                     f"{test_limit})")
                    ids, mask, _ = collate(split, rows, pad_id)
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                    out[rows] = logits.float().cpu().numpy()
            return out, batch_size
        except Exception as error:
            if not is_oom(error) or batch_size == 1:
                raise
        # Out of the except block: the failed forward's tensors are released before the cache is emptied.
        batch_size //= 2
        print(f"[tune_app] out of memory in evaluation: batches of {batch_size} rows of the longest", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def evaluate(model, split: TokenizedSplit, pad_id: int, batch_size: int, device, autocast,
             loss_weights: np.ndarray | None, *, modes_kept: bool = False) -> tuple[dict[str, float], np.ndarray]:
    """Validation metrics, the (class-weighted) cross-entropy and eval_batch_size (the batch size that fit); and
    the predicted class of every row (`modes_kept`: as predict_logits says)."""
    logits, fitted = predict_logits(model, split, pad_id, batch_size, device, autocast, modes_kept=modes_kept)
    predictions = logits.argmax(-1)
    metrics = classification_metrics(split.labels, predictions, model.config.num_labels)
    return {**metrics, "eval_loss": weighted_cross_entropy(logits, split.labels.copy(), loss_weights),
            "eval_batch_size": fitted}, predictions


def eager():
    """Evaluation runs eagerly: large batches amortise launches, and no eval-shape graphs need compiling."""
    import contextlib

    import torch

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()
