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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tune_app.data import TokenizedSplit
from tune_app.families import Family, family_for
from tune_app.metrics import classification_metrics
from tune_app.space import HYPERPARAMETERS, resolve_alpha

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.json"
OOM_TEST_ENV = "TUNE_APP_TEST_OOM_ABOVE"
"""Fault injection for tests only: raise a CUDA-style OOM when a micro-batch exceeds this many rows."""


@dataclass(frozen=True)
class ModelSpec:
    """A model of the study as a trial needs it (checkpoint already resolved to a Hub name or local path)."""

    checkpoint: str
    data_key: str
    dtype: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    target_modules: tuple[str, ...] | None = None


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
    max_length: int = 512
    max_oom_retries: int = 3
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- model


def _torch_dtype(name: str, checkpoint_dtype: Any, on_gpu: bool):
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name != "auto":
        return table[name]
    # auto: keep half-precision checkpoints (7B LLMs) in bf16 on GPU, no fp32 copy; fp32 otherwise.
    if on_gpu and str(checkpoint_dtype).replace("torch.", "") in ("float16", "bfloat16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def build_model(spec: ModelSpec, params: dict[str, Any], label_names: list[str], *, on_gpu: bool = False):
    """Base checkpoint -> sequence classifier with the right labels and pad token -> PEFT LoRA model.

    Returns (peft_model, family, pad_token_id).
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    load = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    hf_config = AutoConfig.from_pretrained(spec.checkpoint, **load)
    family = family_for(hf_config.model_type) if spec.target_modules is None else _family_or_none(hf_config)
    tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint, **load)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"{spec.checkpoint}: tokenizer has neither a pad nor an eos token")
    num_labels = len(label_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.checkpoint, num_labels=num_labels,
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        dtype=_torch_dtype(spec.dtype, getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None),
                           on_gpu),
        ignore_mismatched_sizes=True, **load)
    # Decoder classifiers find the last real token through pad_token_id: without it, batches > 1 fail.
    model.config.pad_token_id = pad_id

    targets: Any = list(spec.target_modules) if spec.target_modules else family.target_modules(
        params["target_modules"])
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=int(params["lora_rank"]), lora_alpha=resolve_alpha(params), lora_dropout=float(params["lora_dropout"]),
        bias=params["lora_bias"], use_rslora=bool(params["use_rslora"]), target_modules=targets,
        # The fresh classification head trains in full and is saved with the adapter (peft#310, peft#876).
        modules_to_save=list(family.head) if family else None,
    )
    return get_peft_model(model, lora), family, pad_id


def _family_or_none(hf_config) -> Family | None:
    from tune_app.families import FAMILIES

    return FAMILIES.get(hf_config.model_type)


# --------------------------------------------------------------------------------------------- batches


def length_grouped_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length rows: a seeded shuffle, sorted within chunks of 50 batches, then the
    batches themselves shuffled. Little padding, and the batch order stays random."""
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def collate(split: TokenizedSplit, rows: np.ndarray, pad_id: int, pad_multiple: int = 8):
    """Rows -> padded input_ids / attention_mask / labels tensors, padded to the longest row in the batch
    (rounded up to `pad_multiple` so that shapes repeat)."""
    import torch

    lengths = split.lengths[rows]
    width = int(math.ceil(lengths.max() / pad_multiple) * pad_multiple)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, (i, n) in enumerate(zip(rows, lengths)):
        ids[j, :n] = split.row(i)
        mask[j, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(split.labels[rows].copy())


# --------------------------------------------------------------------------------------------- evaluation


def predict_logits(model, split: TokenizedSplit, pad_id: int, batch_size: int, device, autocast) -> np.ndarray:
    """Logits for every row of a split (in row order), longest rows first so batches pad little."""
    import torch

    order = np.argsort(-split.lengths, kind="stable")
    out = np.zeros((len(split), model.config.num_labels), dtype=np.float32)
    model.eval()
    with torch.inference_mode(), autocast():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask, _ = collate(split, rows, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out[rows] = logits.float().cpu().numpy()
    return out


def evaluate(model, split: TokenizedSplit, pad_id: int, batch_size: int, device, autocast,
             loss_weights: np.ndarray | None) -> dict[str, float]:
    """Validation metrics and the (class-weighted) cross-entropy."""
    import torch

    logits = predict_logits(model, split, pad_id, batch_size, device, autocast)
    weight = torch.tensor(loss_weights, dtype=torch.float32) if loss_weights is not None else None
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(split.labels.copy()),
                                             weight=weight)
    metrics = classification_metrics(split.labels, logits.argmax(-1), model.config.num_labels)
    return {**metrics, "eval_loss": float(loss)}


# --------------------------------------------------------------------------------------------- training


def quiet_libraries() -> None:
    """Keep trial logs to what matters: no per-load weight reports or progress bars from transformers."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _autocast_factory(device, precision: str):
    import contextlib

    import torch

    if device.type == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            return lambda: torch.autocast("cuda", dtype=dtype), precision
        return contextlib.nullcontext, "fp32"
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext, "fp32"


def _assigned_cpus() -> int:
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - outside Ray
        return max(1, os.cpu_count() or 1)


def train_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: train LoRA for ctx.epochs epochs, evaluating and reporting after each."""
    import ray
    import torch
    from ray import tune
    from transformers import get_scheduler

    t_start = time.perf_counter()
    quiet_libraries()
    params = {name: config[name] for name in HYPERPARAMETERS}
    spec = ctx.models[config["model"]]
    torch.set_num_threads(_assigned_cpus())
    torch.manual_seed(ctx.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")

    ref = ctx.data_refs[spec.data_key]
    data = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
    model, _family, pad_id = build_model(spec, params, ctx.label_names, on_gpu=on_gpu)
    model.to(device)
    autocast, precision = _autocast_factory(device, ctx.precision)
    use_compile = ctx.compile is True or (ctx.compile == "auto" and on_gpu)
    forward = torch.compile(model) if use_compile else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())

    batch_size = int(params["batch_size"])
    steps_per_epoch = math.ceil(len(data.train) / batch_size)
    total_steps = steps_per_epoch * ctx.epochs
    optimizer = torch.optim.AdamW(trainable, lr=float(params["learning_rate"]),
                                  weight_decay=float(params["weight_decay"]), fused=on_gpu)
    scheduler = get_scheduler(params["lr_scheduler"], optimizer,
                              num_warmup_steps=int(float(params["warmup_ratio"]) * total_steps),
                              num_training_steps=total_steps)
    weights = np.asarray(ctx.class_weights, dtype=np.float32) if ctx.weighted_loss else None
    loss_weight = torch.tensor(weights if weights is not None else np.ones(len(ctx.label_names), np.float32),
                               device=device)

    start_epoch, micro_batch, train_seconds = 0, batch_size, 0.0
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # resumed trial: adapter, optimizer, schedule and clock as they were
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        with checkpoint.as_directory() as ckpt_dir:
            set_peft_model_state_dict(model, load_file(os.path.join(ckpt_dir, "adapter_model.safetensors")))
            state = torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, micro_batch, train_seconds = state["epoch"], state["micro_batch"], state["train_seconds"]

    oom_test_limit = int(os.environ.get(OOM_TEST_ENV, "0"))
    oom_retries = 0

    def train_step(rows: np.ndarray) -> torch.Tensor:
        """One optimizer step on one (effective) batch, in micro-batches; on OOM, halve the micro-batch and
        redo the step, so the effective batch size, the tuned value, never changes."""
        nonlocal micro_batch, oom_retries
        while True:
            try:
                optimizer.zero_grad(set_to_none=True)
                total_weight = loss_weight[torch.from_numpy(data.train.labels[rows]).to(device)].sum()
                step_loss = torch.zeros((), device=device)
                for start in range(0, len(rows), micro_batch):
                    part = rows[start:start + micro_batch]
                    if oom_test_limit and len(part) > oom_test_limit:
                        raise torch.OutOfMemoryError(f"CUDA out of memory (test: micro-batch {len(part)} "
                                                     f"> {oom_test_limit})")
                    ids, mask, labels = (t.to(device, non_blocking=True) for t in collate(data.train, part, pad_id))
                    with autocast():
                        logits = forward(input_ids=ids, attention_mask=mask).logits
                    # Weighted mean over the whole effective batch, however it is split into micro-batches.
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels, weight=loss_weight,
                                                             reduction="sum") / total_weight
                    loss.backward()
                    step_loss += loss.detach()
                break
            except Exception as error:  # noqa: BLE001 - only OOM is retried here
                if not _is_oom(error) or micro_batch == 1 or oom_retries >= ctx.max_oom_retries:
                    raise
                oom_retries += 1
                micro_batch = max(1, micro_batch // 2)
                print(f"[tune_app] out of memory: micro-batch -> {micro_batch}, gradient accumulation -> "
                      f"{math.ceil(batch_size / micro_batch)} (effective batch {batch_size} unchanged)", flush=True)
                optimizer.zero_grad(set_to_none=True)
                if on_gpu:
                    torch.cuda.empty_cache()
        if float(params["max_grad_norm"]) > 0:
            torch.nn.utils.clip_grad_norm_(trainable, float(params["max_grad_norm"]))
        optimizer.step()
        scheduler.step()
        return step_loss

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    setup_seconds = time.perf_counter() - t_start
    for epoch in range(start_epoch, ctx.epochs):
        model.train()
        rng = np.random.default_rng([ctx.seed, epoch])
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        batches = length_grouped_batches(data.train.lengths, batch_size, rng)
        for rows in batches:
            loss_sum += train_step(rows)
        train_loss = float(loss_sum) / len(batches)  # the epoch's one host sync
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        t0 = time.perf_counter()
        metrics = evaluate(model, data.val, pad_id, ctx.eval_batch_size, device, autocast, weights)
        metrics.update(
            epoch=epoch + 1, train_loss=train_loss, train_time_s=train_seconds,
            eval_time_s=time.perf_counter() - t0, setup_time_s=setup_seconds,
            train_samples_per_s=len(data.train) / epoch_seconds,
            trainable_params=n_trainable, total_params=n_total, micro_batch_size=micro_batch,
            autocast=precision, compiled=use_compile, device=device.type,
            peak_memory_mb=_peak_memory_mb(on_gpu),
        )
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)  # adapter + classification head only, never the base weights
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1, "micro_batch": micro_batch, "train_seconds": train_seconds},
                       os.path.join(tmp, STATE_FILE))
            Path(tmp, METRICS_FILE).write_text(json.dumps({**metrics, "config": params, "model": config["model"]},
                                                          indent=2, default=str))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _peak_memory_mb(on_gpu: bool) -> float:
    if on_gpu:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
