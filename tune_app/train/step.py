"""The training step: one optimizer step on one effective batch.

    step = TrainStep(model, params, data.train, ...)
    step.warm_up(batches)   # capture (or compile) every padding bucket before the clock starts
    loss = step(rows)       # one optimizer step; the loss stays on the device (no host sync)

A step splits its batch into micro-batches (gradient accumulation), replays each padding bucket's forward and
backward as a CUDA graph where it can, scales the loss under fp16, clips, and steps the optimizer and the schedule.
Out of memory, it halves the micro-batch and redoes the step (at micro-batch 1 it turns on gradient checkpointing),
so the effective batch size, the tuned value, never changes. What changes while a trial trains (the micro-batch
size, the graphs, the loss scale, the retries) lives here, not in the trainable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tune_app.train.batching import IGNORE_INDEX, collate, padded_width
from tune_app.train.cuda_graphs import CaptureFailed, StepGraphs
from tune_app.train.memory import is_oom, oom_test_limit
from tune_app.train.model import activation_checkpointing, mask_preparer
from tune_app.train.tokens import TokenizedSplit


class TrainStep:
    """One trial's optimizer, schedule, loss scaler and step (see the module docstring)."""

    def __init__(self, model, params: dict[str, Any], train: TokenizedSplit, *, epochs: int, pad_id: int, family,
                 device, autocast, precision: str, class_weights: np.ndarray | None, num_labels: int,
                 widths: tuple[int, ...] | None, fixed_shapes: bool, use_graphs: bool, max_oom_retries: int):
        import torch
        from transformers import get_scheduler

        self.model, self.train, self.pad_id, self.device, self.autocast = model, train, pad_id, device, autocast
        self.on_gpu = device.type == "cuda"
        self.batch_size = self.micro_batch = int(params["batch_size"])
        self.widths, self.fixed_shapes = widths, fixed_shapes
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        total_steps = math.ceil(len(train) / self.batch_size) * epochs
        self.optimizer = torch.optim.AdamW(self.trainable, lr=float(params["learning_rate"]),
                                           weight_decay=float(params["weight_decay"]), fused=self.on_gpu)
        self.scaler = loss_scaler(device, precision)
        self.scheduler = get_scheduler(params["lr_scheduler"], self.optimizer,
                                       num_warmup_steps=int(float(params["warmup_ratio"]) * total_steps),
                                       num_training_steps=total_steps)
        self.row_weights = class_weights if class_weights is not None else np.ones(num_labels, np.float32)
        self.loss_weight = torch.tensor(self.row_weights, device=device)
        self.max_grad_norm = float(params["max_grad_norm"])
        self.max_oom_retries, self.oom_retries = max_oom_retries, 0
        self.test_limit = oom_test_limit()
        self.prepare_mask = mask_preparer(model, family, precision)
        self.graphs = StepGraphs(self._forward_backward, self.trainable) if use_graphs else None

    # ----------------------------------------------------------------------------------------- one step

    def __call__(self, rows: np.ndarray):
        """One optimizer step on one (effective) batch, in micro-batches; on OOM, a smaller micro-batch and the
        step again. Returns the step's loss, on the device."""
        import torch

        while True:
            try:
                self._clear_grads()
                # Summed on the host from the labels there: indexing a device tensor would copy and sync.
                total_weight = float(self.row_weights[self.train.labels[rows]].sum())
                step_loss = torch.zeros((), device=self.device)
                for start in range(0, len(rows), self.micro_batch):
                    step_loss += self._micro_step(rows[start:start + self.micro_batch], total_weight)
                break
            except Exception as error:  # noqa: BLE001 - only OOM is retried here
                self._after_oom(error)
            # Outside the except block: its traceback (and a failed capture's graph in it) is gone by now, so the
            # memory it held goes back to the GPU for its neighbours.
            if self.on_gpu:
                torch.cuda.empty_cache()
        self._optimizer_step()
        return step_loss

    def warm_up(self, batches: list[np.ndarray]) -> None:
        """Compile (or capture) every padding bucket these batches need before the clock starts: one
        forward/backward per bucket, gradients dropped, no optimizer step (so training is unchanged)."""
        self.model.train()
        firsts: dict[int, np.ndarray] = {}
        for rows in batches:
            for start in range(0, len(rows), self.micro_batch):
                part = rows[start:start + self.micro_batch]
                firsts.setdefault(padded_width(int(self.train.lengths[part].max()), self.widths), part)
        try:
            for part in firsts.values():
                self._micro_step(part, float(len(part)))
        except Exception as error:
            if not is_oom(error):
                raise
        self._clear_grads()

    def _micro_step(self, part: np.ndarray, total_weight: float):
        """Forward + backward of one micro-batch (filled up to the micro-batch size when shapes are fixed)."""
        import torch

        if self.test_limit and len(part) > self.test_limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: micro-batch {len(part)} > {self.test_limit})")
        batch = self._to_device(collate(self.train, part, self.pad_id, widths=self.widths,
                                        num_rows=self.micro_batch if self.fixed_shapes else None))
        if self.graphs is not None:
            try:
                return self.graphs(*batch, total_weight)
            except CaptureFailed as error:
                self.drop_graphs(str(error))
        return self._forward_backward(*batch, total_weight)

    def _forward_backward(self, ids, mask, labels, total_weight):
        loss = batch_loss(self.model, ids, self.prepare_mask(mask), labels, self.loss_weight, total_weight,
                          self.autocast)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _optimizer_step(self) -> None:
        clip_and_step(self.trainable, self.optimizer, self.scheduler, self.scaler, self.max_grad_norm)

    # ----------------------------------------------------------------------------------------- out of memory

    def _after_oom(self, error: Exception) -> None:
        """The ladder: a halved micro-batch (gradient accumulation keeps the effective batch), then at micro-batch
        1 gradient checkpointing; re-raises anything else, and an OOM past the last rung or the retries."""
        checkpointing = activation_checkpointing(self.model.get_base_model())
        if not is_oom(error) or (self.micro_batch == 1 and checkpointing) or self.oom_retries >= self.max_oom_retries:
            raise  # the error being handled, with its own traceback
        self.oom_retries += 1
        self.drop_graphs()  # their memory, and that of the micro-batch size they were captured for
        self._clear_grads()
        if self.micro_batch > 1:
            self.micro_batch = max(1, self.micro_batch // 2)
            print(f"[tune_app] out of memory: micro-batch -> {self.micro_batch}, gradient accumulation -> "
                  f"{math.ceil(self.batch_size / self.micro_batch)} (effective batch {self.batch_size} unchanged)",
                  flush=True)
        else:
            self.drop_graphs("gradient checkpointing (recomputation restores RNG state on the host)")
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            print("[tune_app] out of memory at micro-batch 1: gradient checkpointing on", flush=True)

    def drop_graphs(self, why: str | None = None) -> None:
        """Free the captured graphs (they are captured again at the next shapes); with `why`, graphs stay off
        for the rest of the trial, and the log says why."""
        if self.graphs is not None:
            self.graphs.reset()
            if why:
                print(f"[tune_app] CUDA graphs off for this trial, training eagerly: {why}", flush=True)
                self.graphs = None

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the step: optimizer, schedule, loss scale and micro-batch size."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro_batch = state["micro_batch"]

    def held(self) -> tuple:
        """What must outlive the trial's thread (`memory.keep`): model, optimizer, schedule, scaler, graphs."""
        return self.model, self.optimizer, self.scheduler, self.scaler, self.graphs

    def _clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=self.graphs is None)  # graphs accumulate into fixed gradient tensors

    def _to_device(self, tensors) -> list:
        if self.on_gpu:
            return [t.pin_memory().to(self.device, non_blocking=True) for t in tensors]
        return list(tensors)


def loss_scaler(device, precision: str):
    """A trial's loss scaler (torch.amp.GradScaler) under fp16 autocast on a GPU (one without bf16), where small
    gradients underflow to zero unless the loss is scaled up first; None otherwise."""
    import torch

    return torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "fp16" else None


def clip_and_step(trainable: list, optimizer, scheduler, scaler, max_grad_norm: float) -> None:
    """The end of a trial's effective batch: its gradients unscaled (under a loss scaler) and clipped, then its
    optimizer and schedule stepped; under a loss scaler a step whose gradients overflowed is skipped (the scale
    shrinks), and the schedule with it."""
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm, foreach=True)
    if scaler is None:
        optimizer.step()
        scheduler.step()
        return
    scale = scaler.get_scale()  # a host sync, as fp16 training has anyway (it never runs as a CUDA graph)
    scaler.step(optimizer)  # skipped when a gradient overflowed; update() then shrinks the scale
    scaler.update()
    if scaler.get_scale() >= scale:  # the step was taken: the schedule moves with the optimizer
        scheduler.step()


def step_mode(ctx, on_gpu: bool, precision: str) -> tuple[bool, bool]:
    """(torch.compile, CUDA graphs) for a trial (or a pack) of this study (a TrialContext).

    compile: auto stays eager: regional compilation measured slower than eager on an H100 (roberta-large 51 vs
    80 samples/s; llama-7b recompiled per block, 192 graphs); `train.compile: true` turns it on. Graphs capture the
    eager step: never with torch.compile (its compilation would run inside the capture stream's sync-checked
    warm-up), nor under fp16, whose loss scaling reads found-inf on the host."""
    use_compile = ctx.compile is True
    use_graphs = on_gpu and ctx.cuda_graphs in (True, "auto") and not use_compile and precision != "fp16"
    return use_compile, use_graphs


def batch_loss(model, ids, mask, labels, loss_weight, total_weight: float, autocast):
    """The model's forward on a micro-batch and its `share_of_loss`."""
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return share_of_loss(logits, labels, loss_weight, total_weight)


def share_of_loss(logits, labels, loss_weight, total_weight: float):
    """A micro-batch's share of its effective batch's class-weighted mean cross-entropy: the weighted sum of its
    rows' losses over `total_weight`, the summed class weights of the WHOLE effective batch. Micro-batch losses
    therefore add up to the full batch's loss (and gradients), however the batch is split; filler rows
    (IGNORE_INDEX) add nothing."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), labels, weight=loss_weight, reduction="sum",
                                             ignore_index=IGNORE_INDEX) / total_weight
