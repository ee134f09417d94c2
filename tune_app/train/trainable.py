"""The trainable: one LoRA sequence-classification trial, whose recipe (`fit`) reads top to bottom.

    set up (base, LoRA, step) -> resume -> warm up -> per epoch: train, evaluate, checkpoint, report

`train_trial` is what Ray Tune runs in each trial actor. It receives the hyperparameters in `config` and
everything else (tokenized data by object reference, model specs, training settings) in a `TrialContext`
through `tune.with_parameters`, so nothing heavy travels through the search space. The step itself (micro-batches,
the OOM ladder, CUDA graphs, loss scaling) is `TrainStep`; what a trial leaves behind is `tune_app.train.memory`'s.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tune_app.spec.space import HYPERPARAMETERS, MODEL_KEY, SEED_KEY
from tune_app.train import checkpoint, memory
from tune_app.train.batching import bucket_widths, length_grouped_batches
from tune_app.train.evaluation import eager, eval_batch_size, evaluate
from tune_app.train.heartbeat import Heartbeat
from tune_app.train.memory import peak_memory_mb, release_memory
from tune_app.train.model import (
    ModelSpec,
    build_model,
    compile_blocks,
    compiled_graphs,
    quiet_libraries,
    quiet_ray,
    trial_base,
)
from tune_app.train.pack import pack_name, packable
from tune_app.train.precision import autocast_factory, train_in_fp32
from tune_app.train.step import TrainStep, step_mode
from tune_app.train.tokens import fetch


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
    packs: dict[str, str] = field(default_factory=dict)
    """Model -> the name prefix of its packs (tune.pack): its trials train in the pack on their node's device."""
    pack_registry: str | None = None
    """The actor name of the study's pack registry (tune_app.study.packing), which starts the pack of a node that
    joined after the study started."""
    progress: Any = None
    """The study's progress board (a Ray actor handle, tune_app.study.board) that heartbeats tell; None: none."""


def train_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: `fit` with Tune's checkpoint to resume from and `tune.report` per epoch; a
    trial of a packed model trains in its node's pack instead (`train_in_pack`)."""
    from ray import tune

    def report(metrics: dict[str, Any], checkpoint_dir: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    trial_id, saved = tune.get_context().get_trial_id(), tune.get_checkpoint()
    if saved is not None and trial_id not in saved.path:
        # A worker reused for a new trial can be handed the checkpoint its previous trial reported last (seen with
        # packed trials, whose thin process returns at once): a trial resumes only from its own trial folder.
        print(f"[tune_app] ignoring checkpoint {saved.path}: not this trial's", flush=True)
        saved = None
    resume_dir = saved.to_directory() if saved else None
    if config[MODEL_KEY] in ctx.packs and packable(config) and train_in_pack(config, ctx, resume_dir):
        return
    fit(config, ctx, report=report, resume_dir=resume_dir, threads=_assigned_cpus(),
        progress=Heartbeat(ctx.progress, trial_id))


def train_in_pack(config: dict[str, Any], ctx: TrialContext, resume_dir: str | None) -> bool:
    """A thin trial: join the pack of this trial's model on the device Ray placed it on (the study's pack registry
    starts it on a node that joined after the study started), report each epoch's result the pack sends, and
    leave. False when this device can have no pack: the trial then trains alone."""
    import ray
    from ray import tune

    quiet_ray()  # the thin trial imports no model library: only Ray's loggers need quieting
    gpus = ray.get_gpu_ids()
    device = str(gpus[0]) if gpus else "cpu"
    node_id = ray.get_runtime_context().get_node_id()
    name = pack_name(ctx.packs[config[MODEL_KEY]], node_id, device)
    try:
        pack = ray.get_actor(name)
    except ValueError:  # a node that joined later: the registry starts its pack
        started = ray.get(ray.get_actor(ctx.pack_registry).ensure.remote(config[MODEL_KEY], node_id, device)) \
            if ctx.pack_registry else None
        try:
            pack = ray.get_actor(started) if started else None
        except ValueError:  # the pack it started died at once
            pack = None
        if pack is None:
            print(f"[tune_app] no pack {name} on this node: this trial trains alone", flush=True)
            return False
    trial_id = tune.get_context().get_trial_id()
    ray.get(pack.join.remote(trial_id, config, resume_dir))
    try:
        while True:
            result = ray.get(pack.next_result.remote(trial_id))
            if result.get("error"):
                raise RuntimeError(f"in its pack: {result['error']}")
            if result["metrics"] is not None:
                tune.report(result["metrics"], checkpoint=tune.Checkpoint.from_directory(result["checkpoint"]))
            if result["last"]:
                return True
    finally:  # stopped by Tune (SystemExit in its report), failed, or done: its slot is free
        pack.leave.remote(trial_id)


def fit(config: dict[str, Any], ctx: TrialContext, *, report: Callable[[dict[str, Any], str], None],
        resume_dir: str | None = None, threads: int | None = None,
        progress: Callable[..., None] | None = None) -> list[dict[str, Any]]:
    """Train LoRA for ctx.epochs epochs, evaluating after each; `report(metrics, checkpoint_dir)` is called once
    per epoch with a directory holding the adapter files, trainer_state.pt and metrics.json (valid during the
    call only); `progress(epoch, step, steps, samples, seconds)` after each step (a Heartbeat). Needs no Ray: the
    benchmark and tests call it in-process. Returns every epoch's metrics."""
    clock = {"start": time.perf_counter()}
    # A worker's first trial imports the libraries (seconds; timed apart as imports_s), later trials find them.
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForSequenceClassification, get_scheduler  # noqa: F401

    clock["imports"] = time.perf_counter()
    quiet_libraries()
    release_memory()  # what this process's previous trial left (tune_app.train.memory)
    params = {name: config[name] for name in HYPERPARAMETERS}
    spec, seed = ctx.models[config[MODEL_KEY]], config.get(SEED_KEY, ctx.seed)
    torch.set_num_threads(threads or _assigned_cpus())  # a trial's step uses exactly the cores it was given
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    data = fetch(ctx.data_refs[spec.data_key])
    clock["data"] = time.perf_counter()

    # Set up: the base (kept from this worker's last trial of the model, or loaded), LoRA, the step.
    autocast, precision = autocast_factory(device, ctx.precision)
    lease = memory.take((spec, tuple(ctx.label_names), on_gpu, precision, seed), lambda: trial_base(
        spec, ctx.label_names, on_gpu=on_gpu, precision=precision))
    model, family, pad_id = build_model(spec, params, ctx.label_names, base=lease.base)
    model.to(device)
    lease.adapted(model)
    train_in_fp32(model, family)
    use_compile, use_graphs = step_mode(ctx, on_gpu, precision)
    fixed_shapes = use_compile or use_graphs  # padding buckets and filled-up batches: few shapes to build for
    graphs_before = compiled_graphs()
    if use_compile:
        compile_blocks(model)
    clock["load"] = time.perf_counter()
    weights = np.asarray(ctx.class_weights, dtype=np.float32) if ctx.weighted_loss else None
    step = TrainStep(model, params, data.train, epochs=ctx.epochs, pad_id=pad_id, family=family, device=device,
                     autocast=autocast, precision=precision, class_weights=weights, num_labels=len(ctx.label_names),
                     widths=bucket_widths(ctx.max_length) if fixed_shapes else None, fixed_shapes=fixed_shapes,
                     use_graphs=use_graphs, max_oom_retries=ctx.max_oom_retries)
    start_epoch, train_seconds = _resume(model, step, resume_dir, device) if resume_dir else (0, 0.0)

    def epoch_batches(epoch: int) -> list[np.ndarray]:  # the trial's own data order, the same on every resume
        return length_grouped_batches(data.train.lengths, step.batch_size, np.random.default_rng([seed, epoch]))

    # Warm up: capture or compile every padding bucket before the clock starts.
    _sync_and_reset_peak(on_gpu)  # the peak from here on: warm-up (where graphs are captured) and training
    if fixed_shapes and start_epoch < ctx.epochs:
        step.warm_up(epoch_batches(start_epoch))
    _sync_and_reset_peak(on_gpu, reset=False)
    clock["ready"] = time.perf_counter()
    timing = dict(setup_time_s=clock["ready"] - clock["start"], imports_s=clock["imports"] - clock["start"],
                  data_fetch_s=clock["data"] - clock["imports"], model_load_s=clock["load"] - clock["data"],
                  base_reused=lease.reused, compile_time_s=clock["ready"] - clock["load"] if fixed_shapes else 0.0)
    n_trainable, n_total = sum(p.numel() for p in step.trainable), sum(p.numel() for p in model.parameters())

    # Per epoch: train, evaluate, checkpoint and report.
    history, eval_batch = [], eval_batch_size(ctx.eval_batch_size, step.batch_size)
    for epoch in range(start_epoch, ctx.epochs):
        model.train()
        batches = epoch_batches(epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        samples = 0
        for i, rows in enumerate(batches, start=1):
            loss_sum += step(rows)
            samples += len(rows)
            if progress:
                progress(epoch + 1, i, len(batches), samples, time.perf_counter() - t0, force=i == 1)
        train_loss = float(loss_sum) / len(batches)  # the epoch's one host sync
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        t0 = time.perf_counter()
        with eager():
            metrics, predictions = evaluate(model, data.val, pad_id, eval_batch, device, autocast, weights)
        eval_batch = metrics["eval_batch_size"]  # halved by an OOM: stays halved for the next epochs
        metrics.update(
            epoch=epoch + 1, train_loss=train_loss, train_time_s=train_seconds, epoch_time_s=epoch_seconds,
            eval_time_s=time.perf_counter() - t0, **timing, train_samples_per_s=len(data.train) / epoch_seconds,
            trainable_params=n_trainable, total_params=n_total, micro_batch_size=step.micro_batch,
            autocast=precision, compiled=use_compile, compiled_graphs=compiled_graphs() - graphs_before,
            cuda_graphs=len(step.graphs or ()), device=device.type, threads=torch.get_num_threads(),
            **peak_memory_mb(on_gpu))
        _checkpoint_and_report(model, step, lease, metrics,
                               {"config": params, MODEL_KEY: config[MODEL_KEY], SEED_KEY: seed}, predictions,
                               train_seconds=train_seconds, last=epoch + 1 == ctx.epochs, report=report)
        history.append(metrics)
    if start_epoch >= ctx.epochs:  # resumed after its last epoch: nothing trained, nothing reported
        lease.give_back()
    return history


def _resume(model, step: TrainStep, resume_dir: str, device) -> tuple[int, float]:
    """A resumed trial's adapter, optimizer, schedule and clock as its checkpoint saved them: (epochs done,
    training seconds so far)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(resume_dir, "adapter_model.safetensors")))
    state = checkpoint.read_state(resume_dir, device)
    step.load_state_dict(state)
    return state["epoch"], state["train_seconds"]


def _checkpoint_and_report(model, step: TrainStep, lease, metrics: dict[str, Any], identity: dict[str, Any],
                           predictions: np.ndarray, *,
                           train_seconds: float, last: bool, report: Callable[[dict[str, Any], str], None]) -> None:
    """Write the epoch's checkpoint (adapter and head only, the step's state, the metrics, the validation
    predictions) and report it.

    From here on the trial frees nothing (tune_app.train.memory): its model and optimizer are kept for the next
    trial to free, and its base is given back before the last report, since Tune may end the worker once it has
    that report."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # adapter + classification head only, never the base weights
        checkpoint.write(tmp, state=step.state_dict(), epoch=metrics["epoch"], train_seconds=train_seconds,
                         metrics=metrics, identity=identity, predictions=predictions)
        memory.keep(*step.held())
        if last:
            lease.give_back()
        try:
            report(metrics, tmp)
        except SystemExit:  # Tune stops a trial inside its report (ASHA, max_t): the base is reusable all the same
            if not last:
                lease.give_back()
            raise


def _sync_and_reset_peak(on_gpu: bool, *, reset: bool = True) -> None:
    """Wait for the GPU (timings start and stop on finished work) and, with `reset`, start its peak memory anew."""
    if on_gpu:
        import torch

        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def _assigned_cpus() -> int:
    """CPU cores Ray gave this trial (the machine's cores outside Ray)."""
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - outside Ray
        return max(1, os.cpu_count() or 1)


