"""A trial's model: the base checkpoint loaded as a sequence classifier (labels, head rows, pad token from the
family table), LoRA added with the trial's hyperparameters, and the switches a step needs (prepared attention
masks, regional compilation, gradient checkpointing).

Export, predict, evaluate and the memory estimate load models through here too, so a bundle is built as its
trial was. Nothing here imports torch at module level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tune_app.spec.families import (
    FAMILIES,
    Family,
    checkpoint_head_labels,
    family_for,
    head_modules,
    inside,
    modules_to_save,
    prepare_tokenizer,
)
from tune_app.spec.paths import hub_options
from tune_app.spec.space import resolve_alpha
from tune_app.train.precision import dtype_of, torch_dtype


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

    load = hub_options(spec)
    hf_config = AutoConfig.from_pretrained(spec.checkpoint, **load)
    family = family_for(hf_config.model_type) if family_required else FAMILIES.get(hf_config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(spec.checkpoint, **load)
    pad_id = prepare_tokenizer(tokenizer, family, getattr(hf_config, "vocab_size", None))  # decoders: pad = eos
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        spec.checkpoint, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        dtype=torch_dtype(spec.dtype, hf_config, on_gpu, precision),
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
    dtype = dtype_of(precision) if precision in ("bf16", "fp16") else model.get_base_model().dtype
    window = getattr(model.config, "sliding_window", None)

    def prepare(mask):
        if window and mask.shape[-1] > window:
            return mask
        return attention_bias(mask, family.decoder, dtype)

    return prepare


def quiet_libraries() -> None:
    """Keep trial logs to what matters: no per-load weight reports or progress bars from transformers."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # transformers' own internals warn about their deprecated names (is_gradient_checkpointing) once per trial.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    quiet_ray()


def quiet_ray() -> None:
    """No line per checkpoint from Ray Train/Tune in a trial's log ("Checkpoint successfully created ..."), and no
    traceback in the study's output when Ray ends a trial's worker: Ray's SIGTERM handler raises SystemExit wherever
    the worker is, and where that is a garbage-collection callback Python prints it as "Exception ignored"."""
    import logging
    import sys

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    if not getattr(sys.unraisablehook, "quiet_exit", False):
        sys.unraisablehook = _quiet_exit(sys.unraisablehook)


def _quiet_exit(hook):
    """`hook` for every exception Python cannot raise, but an exit."""

    def report(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            hook(unraisable)

    report.quiet_exit = True
    return report


def activation_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on in a transformers model."""
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if on is None else on)  # the latter: < 5


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


# --------------------------------------------------------------------------------------------- head and targets


def unmatched_targets(hf_config: Any, names: list[str], *, trust_remote_code: bool = False
                      ) -> tuple[list[str], list[str]]:
    """Of explicit LoRA target names, those that match no layer LoRA can adapt (PEFT's rule for a list: a module
    whose path is the name or ends in '.name'), and the names of the model's linear layers to choose from. The
    model is built from its config on the meta device: no weights are read, no memory is taken."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(hf_config, trust_remote_code=trust_remote_code)
    head = head_modules(FAMILIES.get(hf_config.model_type))  # trained in full (modules_to_save): never LoRA targets
    layers = [(path, module) for path, module in model.named_modules() if not any(inside(path, h) for h in head)]
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    paths = [path for path, module in layers if isinstance(module, adaptable)]
    missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in paths)]
    linear = sorted({path.rsplit(".", 1)[-1] for path, module in layers
                     if isinstance(module, (torch.nn.Linear, Conv1D))})
    return missing, linear


def _label_layer(model: Any, family: Family | None, num_labels: int):
    """The head's last linear layer with one output per label (classifier / classifier.out_proj / score)."""
    import torch

    heads = family.head if family else ("classifier", "score")
    found = None
    for name, module in model.named_modules():
        in_head = any(inside(name, h) for h in heads)
        if in_head and isinstance(module, torch.nn.Linear) and module.out_features == num_labels:
            found = module
    return found


def align_head(model: Any, family: Family | None, checkpoint_labels: list[str] | None,
               label_names: list[str]) -> str | None:
    """Keep a checkpoint's trained head when its labels are the data's labels, else make sure it is fresh.

    Same label set (any order): the head's rows are reordered to the data's class ids, nothing re-initialised
    (twitter-roberta-base-sentiment-latest on negative/neutral/positive data). Same size but other labels: the
    label layer is re-initialised. Other size: transformers already made a fresh one. Returns a log line, or
    None for a base checkpoint.
    """
    import torch

    if checkpoint_labels is None:
        return None
    if sorted(checkpoint_labels) == sorted(label_names) and len(set(label_names)) == len(label_names):
        layer = _label_layer(model, family, len(label_names))
        order = [checkpoint_labels.index(name) for name in label_names]
        if layer is not None and order != list(range(len(order))):
            with torch.no_grad():
                layer.weight.copy_(layer.weight[order].clone())
                if layer.bias is not None:
                    layer.bias.copy_(layer.bias[order].clone())
        return (f"keeping the checkpoint's trained {len(label_names)}-label head ({', '.join(checkpoint_labels)})"
                + ("" if order == list(range(len(order))) else f", rows reordered to the data's ids "
                                                                f"({', '.join(label_names)})"))
    if len(checkpoint_labels) == len(label_names):
        layer = _label_layer(model, family, len(label_names))
        if layer is not None:
            std = getattr(model.config, "initializer_range", 0.02)
            with torch.no_grad():
                layer.weight.normal_(0.0, std)
                if layer.bias is not None:
                    layer.bias.zero_()
    return (f"replacing the checkpoint's {len(checkpoint_labels)}-label head ({', '.join(checkpoint_labels)}) "
            f"with a fresh {len(label_names)}-label head ({', '.join(label_names)}): the labels differ")
