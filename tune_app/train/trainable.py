"""The trainable: one LoRA sequence-classification training run, readable top to bottom.

`train_trial` is what Ray Tune runs in each trial actor. It receives the hyperparameters in `config` and
everything else (tokenized data by object reference, model specs, training settings) in a `TrialContext`
through `tune.with_parameters`, so nothing heavy travels through the search space.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tune_app.spec.rundir import CHECKPOINT_METRICS, STATE_FILE
from tune_app.spec.space import HYPERPARAMETERS, MODEL_KEY
from tune_app.train import memory as base_cache
from tune_app.train.batching import bucket_widths, collate, length_grouped_batches, padded_width
from tune_app.train.cuda_graphs import CaptureFailed, StepGraphs
from tune_app.train.evaluation import _eager, evaluate
from tune_app.train.memory import OOM_TEST_ENV, is_oom, release_memory
from tune_app.train.model import (ModelSpec, activation_checkpointing, build_model, compile_blocks, compiled_graphs,
                                  mask_preparer, quiet_libraries, trial_base)
from tune_app.train.precision import autocast_factory
from tune_app.train.step import batch_loss


@dataclass
class TrialContext:
    """What every trial shares, handed over once by `tune.with_parameters`."""

    models: dict[str, ModelSpec]
    data_refs: dict[str, Any]
    """Tokenizer key -> Ray ObjectRef of a `TokenizedData` (or the object itself, outside Ray)."""
    label_names: list[str]
    class_weights: list[float]
    epochs: int
    eval_batch_size: int = 64
    weighted_loss: bool = True
    seed: int = 0
    precision: str = "auto"
    compile: str | bool = "auto"
    cuda_graphs: str | bool = "auto"
    max_length: int = 512
    max_oom_retries: int = 3


# --------------------------------------------------------------------------------------------- model


# --------------------------------------------------------------------------------------------- batches


# --------------------------------------------------------------------------------------------- evaluation


# --------------------------------------------------------------------------------------------- training


def _assigned_cpus() -> int:
    """CPU cores Ray gave this trial (the machine's cores outside Ray)."""
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - outside Ray
        return max(1, os.cpu_count() or 1)


def _fetch(ref: Any):
    """A TokenizedData from a Ray object reference (or the object itself, outside Ray)."""
    if type(ref).__name__ == "ObjectRef":
        import ray

        return ray.get(ref)
    return ref


def train_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: `fit` with Tune's checkpoint to resume from and `tune.report` per epoch.

    A trial frees what the worker's previous trial left (tune.reuse_actors) when it starts (`fit`), not on its
    own way out: once Tune has a trial's report it may end the worker without waiting for the trial's thread, and a
    thread still freeing CUDA memory as the process exits aborts it ('Fatal Python error: Aborted', seen on an H100
    in 4 of 8 trials that ASHA stopped at max_t). So after a report a trial frees nothing: `fit` keeps the base
    before its last report, and its model and optimizer stay referenced (`_last_trial`) until the next trial."""
    from ray import tune

    def report(metrics: dict[str, Any], checkpoint_dir: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    checkpoint = tune.get_checkpoint()
    resume_dir = checkpoint.to_directory() if checkpoint else None
    fit(config, ctx, report=report, resume_dir=resume_dir, threads=_assigned_cpus())


def fit(config: dict[str, Any], ctx: TrialContext, *, report: Callable[[dict[str, Any], str], None],
        resume_dir: str | None = None, threads: int | None = None) -> list[dict[str, Any]]:
    """Train LoRA for ctx.epochs epochs, evaluating after each; `report(metrics, checkpoint_dir)` is called once
    per epoch with a directory holding the adapter files, trainer_state.pt and metrics.json (valid during the
    call only). Needs no Ray: the benchmark and tests call it in-process. Returns every epoch's metrics."""
    t_start = time.perf_counter()
    # A worker's first trial imports the libraries (seconds; timed apart as imports_s), later trials find them.
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForSequenceClassification, get_scheduler  # noqa: F401

    t_imports = time.perf_counter()
    quiet_libraries()
    release_memory()  # what this process's previous trial left (see train_trial)
    params = {name: config[name] for name in HYPERPARAMETERS}
    spec = ctx.models[config[MODEL_KEY]]
    torch.set_num_threads(threads or _assigned_cpus())  # a trial's step uses exactly the cores it was given
    torch.manual_seed(ctx.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")

    data = _fetch(ctx.data_refs[spec.data_key])
    t_data = time.perf_counter()
    autocast, precision = autocast_factory(device, ctx.precision)
    # A worker's later trials of the same model reuse the base its last trial loaded (tune.reuse_actors).
    lease = base_cache.take((spec, tuple(ctx.label_names), on_gpu, precision, ctx.seed), lambda: trial_base(
        spec, ctx.label_names, on_gpu=on_gpu, precision=precision))
    model, family, pad_id = build_model(spec, params, ctx.label_names, base=lease.base)
    model.to(device)
    lease.adapted(model)
    # Adapters and head train in fp32 even when the frozen base is bf16 (AdamW on bf16 weights loses updates).
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    # compile: auto stays eager for now: regional compilation measured SLOWER than eager on an H100 (roberta-large
    # 51 vs 80 samples/s; llama-7b recompiled per block, 192 graphs). `train.compile: true` turns it on.
    use_compile = ctx.compile is True
    # Graphs capture the eager step: never with torch.compile (its compilation would run inside the capture
    # stream's sync-checked warm-up), nor under fp16, whose loss scaling reads found-inf on the host.
    use_graphs = on_gpu and ctx.cuda_graphs in (True, "auto") and not use_compile and precision != "fp16"
    fixed_shapes = use_compile or use_graphs  # padding buckets and filled-up batches: few shapes to build for
    graphs_before = compiled_graphs()
    widths = bucket_widths(ctx.max_length) if fixed_shapes else None
    if use_compile:
        compile_blocks(model)
    t_load = time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())

    batch_size = int(params["batch_size"])
    eval_batch = max(ctx.eval_batch_size, 4 * batch_size)  # no activations kept: larger batches, fewer launches
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    total_steps = steps_per_epoch * ctx.epochs
    optimizer = torch.optim.AdamW(trainable, lr=float(params["learning_rate"]),
                                  weight_decay=float(params["weight_decay"]), fused=on_gpu)
    # fp16 autocast (GPUs without bf16): small gradients underflow to zero unless the loss is scaled up first.
    scaler = torch.amp.GradScaler("cuda") if on_gpu and precision == "fp16" else None
    scheduler = get_scheduler(params["lr_scheduler"], optimizer,
                              num_warmup_steps=int(float(params["warmup_ratio"]) * total_steps),
                              num_training_steps=total_steps)
    weights = np.asarray(ctx.class_weights, dtype=np.float32) if ctx.weighted_loss else None
    row_weights = weights if weights is not None else np.ones(len(ctx.label_names), np.float32)
    loss_weight = torch.tensor(row_weights, device=device)
    max_grad_norm = float(params["max_grad_norm"])

    start_epoch, micro_batch, train_seconds = 0, batch_size, 0.0
    if resume_dir:  # resumed trial: adapter, optimizer, schedule and clock as they were
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(os.path.join(resume_dir, "adapter_model.safetensors")))
        state = torch.load(os.path.join(resume_dir, STATE_FILE), map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, micro_batch, train_seconds = state["epoch"], state["micro_batch"], state["train_seconds"]

    prepare_mask = mask_preparer(model, family, precision)
    oom_test_limit = int(os.environ.get(OOM_TEST_ENV, "0"))
    oom_retries = 0

    def to_device(tensors):
        if on_gpu:
            return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
        return list(tensors)

    def forward_backward(ids, mask, labels, total_weight) -> torch.Tensor:
        loss = batch_loss(model, ids, prepare_mask(mask), labels, loss_weight, total_weight, autocast)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()

    graphs = StepGraphs(forward_backward, trainable) if use_graphs else None

    def clear_grads() -> None:
        optimizer.zero_grad(set_to_none=graphs is None)  # graphs accumulate into fixed gradient tensors

    def drop_graphs(why: str | None = None) -> None:
        """Free the captured graphs (they are captured again at the next shapes); with `why`, graphs stay off
        for the rest of the trial, and the log says why."""
        nonlocal graphs
        if graphs is not None:
            graphs.reset()
            if why:
                print(f"[tune_app] CUDA graphs off for this trial, training eagerly: {why}", flush=True)
                graphs = None

    def micro_step(part: np.ndarray, total_weight: float) -> torch.Tensor:
        """Forward + backward of one micro-batch (filled up to the micro-batch size when shapes are fixed)."""
        if oom_test_limit and len(part) > oom_test_limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: micro-batch {len(part)} > {oom_test_limit})")
        batch = to_device(collate(data.train, part, pad_id, widths=widths,
                                  num_rows=micro_batch if fixed_shapes else None))
        if graphs is not None:
            try:
                return graphs(*batch, total_weight)
            except CaptureFailed as error:
                drop_graphs(str(error))
        return forward_backward(*batch, total_weight)

    def train_step(rows: np.ndarray) -> torch.Tensor:
        """One optimizer step on one (effective) batch, in micro-batches; on OOM, halve the micro-batch and
        redo the step (at micro-batch 1, turn on gradient checkpointing), so the effective batch size, the
        tuned value, never changes. No host sync: the loss stays on the device."""
        nonlocal micro_batch, oom_retries
        while True:
            try:
                clear_grads()
                # Summed on the host from the labels there: indexing a device tensor would copy and sync.
                total_weight = float(row_weights[data.train.labels[rows]].sum())
                step_loss = torch.zeros((), device=device)
                for start in range(0, len(rows), micro_batch):
                    step_loss += micro_step(rows[start:start + micro_batch], total_weight)
                break
            except Exception as error:  # noqa: BLE001 - only OOM is retried here
                checkpointing = activation_checkpointing(model.get_base_model())
                if not is_oom(error) or (micro_batch == 1 and checkpointing) or oom_retries >= ctx.max_oom_retries:
                    raise
                oom_retries += 1
                drop_graphs()  # their memory, and that of the micro-batch size they were captured for
                clear_grads()
                if micro_batch > 1:
                    micro_batch = max(1, micro_batch // 2)
                    print(f"[tune_app] out of memory: micro-batch -> {micro_batch}, gradient accumulation -> "
                          f"{math.ceil(batch_size / micro_batch)} (effective batch {batch_size} unchanged)",
                          flush=True)
                else:
                    drop_graphs("gradient checkpointing (recomputation restores RNG state on the host)")
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    print("[tune_app] out of memory at micro-batch 1: gradient checkpointing on", flush=True)
            # Outside the except block: its traceback (and a failed capture's graph in it) is gone by now, so the
            # memory it held goes back to the GPU for its neighbours.
            if on_gpu:
                torch.cuda.empty_cache()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm, foreach=True)
        if scaler is None:
            optimizer.step()
            scheduler.step()
            return step_loss
        scale = scaler.get_scale()  # a host sync, as fp16 training has anyway (it never runs as a CUDA graph)
        scaler.step(optimizer)  # skipped when a gradient overflowed; update() then shrinks the scale
        scaler.update()
        if scaler.get_scale() >= scale:  # the step was taken: the schedule moves with the optimizer
            scheduler.step()
        return step_loss

    def warm_up(batches: list[np.ndarray]) -> None:
        """Compile (or capture) every padding bucket this epoch needs before the clock starts: one
        forward/backward per bucket, gradients dropped, no optimizer step (so training is unchanged)."""
        model.train()
        firsts: dict[int, np.ndarray] = {}
        for rows in batches:
            for start in range(0, len(rows), micro_batch):
                part = rows[start:start + micro_batch]
                firsts.setdefault(padded_width(int(data.train.lengths[part].max()), widths), part)
        try:
            for part in firsts.values():
                micro_step(part, float(len(part)))
        except Exception as error:  # noqa: BLE001 - an OOM here is handled by train_step's retries
            if not is_oom(error):
                raise
        clear_grads()

    def epoch_batches(epoch: int) -> list[np.ndarray]:
        return length_grouped_batches(data.train.lengths, batch_size, np.random.default_rng([ctx.seed, epoch]))

    if on_gpu:  # the peak from here on: warm-up (where graphs are captured) and training, not the model load
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if fixed_shapes and start_epoch < ctx.epochs:
        warm_up(epoch_batches(start_epoch))
    if on_gpu:
        torch.cuda.synchronize()
    t_ready = time.perf_counter()
    timing = dict(setup_time_s=t_ready - t_start, imports_s=t_imports - t_start, data_fetch_s=t_data - t_imports,
                  model_load_s=t_load - t_data, base_reused=lease.reused,
                  compile_time_s=t_ready - t_load if fixed_shapes else 0.0)
    history = []
    for epoch in range(start_epoch, ctx.epochs):
        model.train()
        batches = epoch_batches(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for rows in batches:
            loss_sum += train_step(rows)
        train_loss = float(loss_sum) / len(batches)  # the epoch's one host sync
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        t0 = time.perf_counter()
        with _eager():
            metrics = evaluate(model, data.val, pad_id, eval_batch, device, autocast, weights)
        eval_batch = metrics["eval_batch_size"]  # halved by an OOM: stays halved for the next epochs
        metrics.update(
            epoch=epoch + 1, train_loss=train_loss, train_time_s=train_seconds, epoch_time_s=epoch_seconds,
            eval_time_s=time.perf_counter() - t0, **timing,
            train_samples_per_s=len(data.train) / epoch_seconds,
            trainable_params=n_trainable, total_params=n_total, micro_batch_size=micro_batch,
            autocast=precision, compiled=use_compile, compiled_graphs=compiled_graphs() - graphs_before,
            cuda_graphs=len(graphs or ()), device=device.type, threads=torch.get_num_threads(),
            **_peak_memory_mb(on_gpu),
        )
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)  # adapter + classification head only, never the base weights
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "epoch": epoch + 1, "micro_batch": micro_batch, "train_seconds": train_seconds},
                       os.path.join(tmp, STATE_FILE))
            Path(tmp, CHECKPOINT_METRICS).write_text(json.dumps({**metrics, "config": params, MODEL_KEY: config[MODEL_KEY]},
                                                          indent=2, default=str))
            base_cache.keep(model, optimizer, scheduler, scaler, graphs)  # see train_trial
            last = epoch + 1 == ctx.epochs
            if last:  # before Tune hears the trial is done: see train_trial
                lease.give_back()
            try:
                report(metrics, tmp)
            except SystemExit:  # Tune stops a trial inside its report (ASHA, max_t): the base is reusable all the same
                if not last:
                    lease.give_back()
                raise
        history.append(metrics)
    if start_epoch >= ctx.epochs:  # resumed after its last epoch: nothing trained, nothing reported
        lease.give_back()
    return history


def _peak_memory_mb(on_gpu: bool) -> dict[str, float]:
    """Peak memory of the trial since its warm-up: on a GPU the most allocated at once (graphs' captures included,
    so eager and graphed trials compare) as peak_memory_mb, and the most the allocator reserved (what neighbours
    on a shared GPU could not use) as peak_reserved_mb; on CPU the process's peak RSS."""
    if on_gpu:
        import torch

        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
