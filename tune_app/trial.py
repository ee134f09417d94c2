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

from tune_app import base_cache
from tune_app.cuda_graphs import CaptureFailed, StepGraphs
from tune_app.data import TokenizedSplit
from tune_app.families import (FAMILIES, align_head, checkpoint_head_labels, family_for, modules_to_save,
                                prepare_tokenizer)
from tune_app.metrics import classification_metrics, weighted_cross_entropy
from tune_app.space import HYPERPARAMETERS, resolve_alpha

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.json"
OOM_TEST_ENV = "TUNE_APP_TEST_OOM_ABOVE"
"""Fault injection for tests only: raise a CUDA-style OOM when a training micro-batch, or the widest evaluation
batch, exceeds this many rows."""
_last_trial: list = []
"""The running or last trial's model, optimizer and graphs, held from its first report until this worker's next trial
starts (release_memory), so that they are never freed by a trial thread Tune may be ending (see train_trial)."""


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
    cuda_graphs: str | bool = "auto"
    max_length: int = 512
    max_oom_retries: int = 3


# --------------------------------------------------------------------------------------------- model


def _dtype(name: str):
    """torch dtype of a precision name: bf16, fp16 or fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _torch_dtype(name: str, hf_config: Any, on_gpu: bool, precision: str = "auto"):
    """torch dtype of the frozen base weights (policy: resources.weights_dtype)."""
    from tune_app.resources import checkpoint_dtype, count_parameters, weights_dtype

    try:
        n_params = count_parameters(hf_config)
    except (AttributeError, TypeError):  # an exotic config: decide by the checkpoint's dtype alone
        n_params = 0
    name = weights_dtype(name, checkpoint_dtype(hf_config), n_params, on_gpu=on_gpu, precision=precision)
    if name == "half":
        name = "fp16" if precision == "fp16" else gpu_half_precision()
    return _dtype(name)


def gpu_half_precision() -> str:
    """bf16 where the GPU computes in it (Ampere and later), else fp16: not bf16 emulated in fp32 arithmetic."""
    import torch

    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


@dataclass
class Base:
    """A base checkpoint loaded as a sequence classifier (`load_base`)."""

    model: Any
    tokenizer: Any
    family: Any
    pad_id: int
    loading: dict[str, Any]
    """from_pretrained's loading info: the weights the checkpoint lacked or had in another shape."""
    head_note: str | None
    """What became of a checkpoint's own classification head (kept, reordered, replaced); None for a base model."""


def load_base(spec: ModelSpec, label_names: list[str], *, on_gpu: bool = False, precision: str = "auto",
              family_required: bool = False) -> Base:
    """Base checkpoint -> sequence classifier with the right labels, head rows and pad token, no LoRA yet: what
    a trial adapts, and what `tune-app evaluate --baseline` scores alone. With `family_required`, a model type
    outside the family table is an error."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    load = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    hf_config = AutoConfig.from_pretrained(spec.checkpoint, **load)
    family = family_for(hf_config.model_type) if family_required else FAMILIES.get(hf_config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint, **load)
    pad_id = prepare_tokenizer(tokenizer, family)  # decoders: pad = eos
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        spec.checkpoint, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        dtype=_torch_dtype(spec.dtype, hf_config, on_gpu, precision),
        ignore_mismatched_sizes=True, output_loading_info=True, **load)
    # Decoder classifiers find the last real token through pad_token_id: without it, batches > 1 fail.
    model.config.pad_token_id = pad_id
    model.config.use_cache = False  # a classifier never generates: no KV cache built in every forward
    if note := align_head(model, family, checkpoint_head_labels(hf_config), label_names):
        print(f"[tune_app] {spec.checkpoint}: {note}", flush=True)
    return Base(model, tokenizer, family, pad_id, loading, note)


def trial_base(spec: ModelSpec, label_names: list[str], *, on_gpu: bool = False, precision: str = "auto") -> Base:
    """The base a trial adapts. Explicit target_modules also serve model types outside the family table (family
    None: PEFT's default head); without them the table must know the model type."""
    return load_base(spec, label_names, on_gpu=on_gpu, precision=precision, family_required=spec.target_modules is None)


def build_model(spec: ModelSpec, params: dict[str, Any], label_names: list[str], *, on_gpu: bool = False,
                precision: str = "auto", base: Base | None = None):
    """PEFT LoRA with the trial's hyperparameters on `base` (by default `trial_base`, loaded here). Returns
    (peft_model, family, pad_id)."""
    from peft import LoraConfig, TaskType, get_peft_model

    base = base or trial_base(spec, label_names, on_gpu=on_gpu, precision=precision)
    family = base.family
    targets: Any = list(spec.target_modules) if spec.target_modules else family.target_modules(
        params["target_modules"])
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=int(params["lora_rank"]), lora_alpha=resolve_alpha(params), lora_dropout=float(params["lora_dropout"]),
        bias=params["lora_bias"], use_rslora=bool(params["use_rslora"]), target_modules=targets,
        fan_in_fan_out=bool(family and family.fan_in_fan_out),
        # The fresh classification head trains in full and is saved with the adapter (peft#310, peft#876).
        modules_to_save=modules_to_save(family, base.loading),
    )
    return get_peft_model(base.model, lora), family, base.pad_id


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


def bucket_widths(max_length: int) -> tuple[int, ...]:
    """Padded widths of a compiled step: 16, 32, 64, 128, then x1.5 / x4/3 (192, 256, 384, 512, ...), capped by
    max_length. Few shapes, so torch.compile builds one graph per width and reuses it for every later batch;
    the padding they add is free on short texts (a step there is bound by kernel launches, not arithmetic)."""
    widths, width = [], 16
    while width < max_length:
        widths.append(width)
        width = width * 2 if width < 128 else (width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3)
    return (*widths, max_length)


def padded_width(longest: int, widths: tuple[int, ...] | None = None, pad_multiple: int = 8) -> int:
    """Width a batch whose longest row has `longest` tokens is padded to: the next bucket, else a multiple of 8."""
    if widths:
        bucket = next((w for w in widths if w >= longest), None)
        if bucket is not None:
            return bucket
    return int(math.ceil(longest / pad_multiple) * pad_multiple)


def collate(split: TokenizedSplit, rows: np.ndarray, pad_id: int, pad_multiple: int = 8, *,
            widths: tuple[int, ...] | None = None, num_rows: int | None = None):
    """Rows -> padded input_ids / attention_mask / labels tensors, padded to the longest row in the batch
    (rounded up to `pad_multiple`, or to the next of `widths` when given). With `num_rows`, a short batch is filled
    up to that many rows with copies of its first row labelled IGNORE_INDEX (no loss, no gradient), so that a
    compiled step sees one batch shape."""
    import torch

    lengths = split.lengths[rows]
    width = padded_width(int(lengths.max()), widths, pad_multiple)
    n = max(len(rows), num_rows or 0)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    for j, (i, length) in enumerate(zip(rows, lengths)):
        ids[j, :length] = split.row(i)
        mask[j, :length] = 1
    labels[:len(rows)] = split.labels[rows]
    if n > len(rows):
        ids[len(rows):], mask[len(rows):] = ids[0], mask[0]
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)


IGNORE_INDEX = -100
"""Label of filler rows: cross-entropy skips them."""


def attention_bias(mask, causal: bool, dtype):
    """A (batch, width) 0/1 padding mask -> the (batch, 1, query, key) additive bias transformers would build from
    it: 0 where a query may attend a key, the dtype's minimum elsewhere (padded keys; later keys too when `causal`).
    Built from device tensors alone, so unlike transformers' own mask building it never syncs with the host."""
    import torch

    keep = mask[:, None, None, :].bool()
    if causal:
        width = mask.shape[-1]
        keep = keep & torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def mask_preparer(model, family, precision: str) -> Callable:
    """What a training forward gets as its attention mask: `attention_bias` for families that take a prepared mask
    (Family.prepared_mask), in the dtype attention computes in; the 2D mask itself for the others, and for batches
    wider than a sliding attention window (that window is transformers' to apply)."""
    if family is None or not family.prepared_mask:
        return lambda mask: mask
    dtype = _dtype(precision) if precision in ("bf16", "fp16") else model.get_base_model().dtype
    window = getattr(model.config, "sliding_window", None)

    def prepare(mask):
        if window and mask.shape[-1] > window:
            return mask
        return attention_bias(mask, family.decoder, dtype)

    return prepare


# --------------------------------------------------------------------------------------------- evaluation


def inference_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Rows longest first, in batches of at most the tokens of `batch_size` rows of the longest and at most
    4 x batch_size rows: the widest batch has `batch_size` rows, narrower ones more, so short rows take fewer
    forwards (fewer kernel launches on a GPU). The row cap bounds what grows with rows, not tokens (DeBERTa's
    relative-position tensors are per row)."""
    order = np.argsort(-lengths, kind="stable")
    if not len(order):
        return []
    budget = batch_size * padded_width(max(1, int(lengths[order[0]])))
    batches, start = [], 0
    while start < len(order):
        rows = min(4 * batch_size, max(1, budget // padded_width(max(1, int(lengths[order[start]])))))
        batches.append(order[start:start + rows])
        start += rows
    return batches


CPU_INFERENCE_ROWS = 8
"""Rows of the widest inference batch on a CPU: a CPU forward is bound by arithmetic, not by launches, so large
batches only add padding (300 tweets with MiniLM on one core: 8.1 s in batches of 8, 11.4 s in batches of 64)."""


def predict_logits(model, split: TokenizedSplit, pad_id: int, batch_size: int, device,
                   autocast) -> tuple[np.ndarray, int]:
    """Logits for every row of a split (in row order), in `inference_batches` (of at most CPU_INFERENCE_ROWS rows
    on a CPU), and the batch size that fit: out of memory, the batches halve (a trial whose training fit only after
    its micro-batch halved must not fail in evaluation), and the caller keeps the size that fit for its next
    evaluation."""
    import torch

    if device.type == "cpu":
        batch_size = min(batch_size, CPU_INFERENCE_ROWS)
    out = np.zeros((len(split), model.config.num_labels), dtype=np.float32)
    oom_test_limit = int(os.environ.get(OOM_TEST_ENV, "0"))
    model.eval()
    while True:
        try:
            with torch.inference_mode(), autocast():
                for rows in inference_batches(split.lengths, batch_size):
                    if oom_test_limit and batch_size > oom_test_limit:  # rows of the widest batch, as tokens go
                        raise torch.OutOfMemoryError(f"CUDA out of memory (test: batch {batch_size} > "
                                                     f"{oom_test_limit})")
                    ids, mask, _ = collate(split, rows, pad_id)
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                    out[rows] = logits.float().cpu().numpy()
            return out, batch_size
        except Exception as error:  # noqa: BLE001 - only OOM is retried
            if not _is_oom(error) or batch_size == 1:
                raise
        # Out of the except block: the failed forward's tensors are released before the cache is emptied.
        batch_size //= 2
        print(f"[tune_app] out of memory in evaluation: batches of {batch_size} rows of the longest", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def evaluate(model, split: TokenizedSplit, pad_id: int, batch_size: int, device, autocast,
             loss_weights: np.ndarray | None) -> dict[str, float]:
    """Validation metrics, the (class-weighted) cross-entropy, and eval_batch_size: the batch size that fit."""
    logits, fitted = predict_logits(model, split, pad_id, batch_size, device, autocast)
    metrics = classification_metrics(split.labels, logits.argmax(-1), model.config.num_labels)
    return {**metrics, "eval_loss": weighted_cross_entropy(logits, split.labels.copy(), loss_weights),
            "eval_batch_size": fitted}


# --------------------------------------------------------------------------------------------- training


def quiet_libraries() -> None:
    """Keep trial logs to what matters: no per-load weight reports or progress bars from transformers."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # transformers' own internals warn about their deprecated names (is_gradient_checkpointing) once per trial.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def activation_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on in a transformers model."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)  # the latter: < 5


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _autocast_factory(device, precision: str):
    import contextlib

    import torch

    if device.type == "cuda":
        if precision == "auto":
            precision = gpu_half_precision()
        if precision in ("bf16", "fp16"):
            dtype = _dtype(precision)
            return lambda: torch.autocast("cuda", dtype=dtype), precision
        return contextlib.nullcontext, "fp32"
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext, "fp32"


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


def transformer_blocks(model) -> list:
    """The model's repeated transformer blocks: the longest ModuleList whose entries are all of one class."""
    import torch

    best: list = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best) \
                and len({type(m) for m in module}) == 1:
            best = list(module)
    return best


def compile_blocks(model) -> int:
    """Regional compilation: torch.compile each transformer block in place. All blocks share one graph per input
    shape (their weights are graph inputs), so compiling costs about one block per padding bucket instead of the
    whole network, and the saved adapter's parameter names do not change. Returns the number of blocks."""
    import torch
    import torch._dynamo

    # One graph per (bucket, train/eval) shape: allow more recompiles than the default 8 per code object.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (to check: one per padding bucket, not per step)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - private counter moved: report nothing rather than fail a trial
        return -1


def _eager():
    """Evaluation runs eagerly: large batches amortise launches, and no eval-shape graphs need compiling."""
    import contextlib

    import torch

    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


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


def release_memory() -> None:
    """Free what the last trial left in this process (`_last_trial`, and objects in reference cycles) and hand the
    GPU blocks cached for it back to the trials sharing the GPU."""
    import gc

    import torch

    _last_trial.clear()
    gc.collect()
    if torch.cuda.is_initialized():
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:  # per-stream cuBLAS workspaces, e.g. of a trial's CUDA-graph stream
            clear_workspaces()
        torch.cuda.empty_cache()


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
    spec = ctx.models[config["model"]]
    torch.set_num_threads(threads or _assigned_cpus())  # a trial's step uses exactly the cores it was given
    torch.manual_seed(ctx.seed)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")

    data = _fetch(ctx.data_refs[spec.data_key])
    t_data = time.perf_counter()
    autocast, precision = _autocast_factory(device, ctx.precision)
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
                if not _is_oom(error) or (micro_batch == 1 and checkpointing) or oom_retries >= ctx.max_oom_retries:
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
            if not _is_oom(error):
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
            Path(tmp, METRICS_FILE).write_text(json.dumps({**metrics, "config": params, "model": config["model"]},
                                                          indent=2, default=str))
            _last_trial[:] = [model, optimizer, scheduler, scaler, graphs]  # see train_trial
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
