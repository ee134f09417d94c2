"""The training step: one optimizer step on one effective batch.

    TrainStep(...)(rows) -> the step's loss, on the device (no host sync)

A step splits its batch into micro-batches (gradient accumulation), replays each padding bucket's forward and
backward as a CUDA graph where it can, scales the loss under fp16, clips, and steps the optimizer and the schedule.
Out of memory, it halves the micro-batch and redoes the step (at micro-batch 1 it turns on gradient checkpointing),
so the effective batch size, the tuned value, never changes. Its changing state (micro-batch size, graphs, loss
scale, retries) lives here, not in the trainable.
"""

from __future__ import annotations

from tune_app.train.batching import IGNORE_INDEX


def batch_loss(model, ids, mask, labels, loss_weight, total_weight: float, autocast):
    """A micro-batch's share of its effective batch's class-weighted mean cross-entropy: the weighted sum of its
    rows' losses over `total_weight`, the summed class weights of the WHOLE effective batch. Micro-batch losses
    therefore add up to the full batch's loss (and gradients), however the batch is split; filler rows
    (IGNORE_INDEX) add nothing."""
    import torch

    with autocast():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits.float(), labels, weight=loss_weight, reduction="sum",
                                             ignore_index=IGNORE_INDEX) / total_weight
