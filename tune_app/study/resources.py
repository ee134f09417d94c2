"""Trial resources: how much of a GPU (and how many CPUs) each trial of a model holds.

`gpu: auto` estimates a trial's peak GPU memory from the model's config (no weights loaded) and the largest
batch/rank its search space can propose, then packs as many trials on a GPU as fit its memory, but never more
than the CPU cores allow: on short texts a training step is bound by Python and kernel launches on the CPU, so a
trial without its own core slows every other trial. Explicit fractions are honoured as given.

Nothing here imports torch or Ray at module level.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from tune_app.spec.paths import hub_options, resolve_checkpoint
from tune_app.train.batching import bucket_widths, padded_width
from tune_app.train.precision import checkpoint_dtype, count_parameters, dimensions, weights_dtype

GIB = 2**30
DEFAULT_GPU_MEMORY_GB = 80.0
"""GPU memory assumed when neither the cluster's GPU nodes nor this machine can say (no nvidia-smi, no CUDA)."""
GPU_MEMORY_ENV = "TUNE_APP_GPU_MEMORY_GB"
"""Set to plan `gpu: auto` for this GPU memory (GB) instead of what the GPU nodes report (to pack more tightly, or
where nvidia-smi is missing)."""
USABLE_MEMORY = 0.90
"""Share of a GPU's memory that trials may plan on (the rest: allocator fragmentation, neighbours' spikes)."""
PROCESS_OVERHEAD_BYTES = int(1.0 * GIB)
"""Per trial process: CUDA context (~0.5 GB on Hopper), cuBLAS/cuDNN workspaces, torch.compile's buffers."""
MAX_TRIALS_PER_GPU = 32
"""Beyond this, Ray's fractional bookkeeping and the per-process overhead dominate: never pack more."""


def _largest(value: Any) -> Any:
    """The largest value a search-space entry can take: a scalar, {choice: [...]}, or {int/uniform...: [lo, hi]}."""
    if isinstance(value, dict) and len(value) == 1:
        (kind, arg), = value.items()
        if kind == "choice":
            return max(arg, key=lambda v: (_TARGET_ORDER.get(v, 0) if isinstance(v, str) else v))
        return arg[1]
    return value


_TARGET_ORDER = {"attention_qv": 1, "attention": 2, "all_linear": 3}


def lora_parameters(hf_config, rank: int, preset: str, num_labels: int = 2) -> int:
    """Trainable parameters: LoRA A/B on every targeted projection of every block, plus the classification head."""
    d = dimensions(hf_config)
    h, i = d["hidden"], d["inter"]
    q_out, kv_out = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    shapes = [(h, q_out), (h, kv_out)]  # attention_qv: q and v
    if preset in ("attention", "all_linear"):
        shapes += [(h, kv_out), (q_out, h)]
    if preset == "all_linear":
        shapes += [(h, i), (i, h)] + ([(h, i)] if d["gated"] else [])
    per_layer = sum(rank * (a + b) for a, b in shapes)
    head = h * num_labels + (0 if d["decoder"] else h * h + h + num_labels)
    return d["layers"] * per_layer + head


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of one trial, in bytes, by part."""

    weights: int
    """Frozen base weights in their dtype."""
    trainable: int
    """LoRA + head in fp32: weights, gradients, two AdamW moments (16 bytes per parameter)."""
    activations: int
    """Tensors saved for backward for the largest batch at the padded sequence length."""
    cast_weights: int = 0
    """Half-precision copies of fp32 frozen block weights that autocast makes in the forward and keeps for the
    backward (fp32 weights under bf16/fp16 autocast only)."""
    overhead: int = PROCESS_OVERHEAD_BYTES
    """CUDA context and workspaces of the trial's process."""

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.cast_weights + self.overhead


def estimate_trial_memory(hf_config, *, batch_size: int, seq_len: int, lora_rank: int, preset: str,
                          weights_bytes: int, activation_bytes: int, num_labels: int = 2) -> MemoryEstimate:
    """Peak memory of a LoRA trial. Activations per token per block: about 16 hidden-size vectors (LayerNorm and
    attention inputs/outputs, q/k/v, dropout masks, LoRA inputs) plus 2 (3 when gated) MLP-width vectors, in the
    autocast dtype; frozen projections without LoRA save nothing for their weights. No attention matrix is stored
    (SDPA). Validated against measured peaks in benchmarks/ (see README)."""
    d = dimensions(hf_config)
    per_token = activation_bytes * (16 * d["hidden"] + (3 if d["gated"] else 2) * d["inter"]) * d["layers"]
    per_token += activation_bytes * 2 * d["hidden"]  # embeddings output and final hidden state
    n_params = count_parameters(hf_config, num_labels)
    embeddings = (d["vocab"] + d["positions"] + d["types"]) * d["hidden"]  # never cast: not a matmul weight
    return MemoryEstimate(
        weights=n_params * weights_bytes,
        trainable=16 * lora_parameters(hf_config, lora_rank, preset, num_labels),
        activations=int(per_token * batch_size * seq_len),
        cast_weights=activation_bytes * (n_params - embeddings) if activation_bytes < weights_bytes else 0,
    )


def padded_length(longest: int | None, max_length: int) -> int:
    """The widest padded batch a trial can see: the padding bucket of the longest tokenized row (trial's own rule;
    an eager trial pads less), max_length when the data is not tokenized yet."""
    if not longest:
        return max_length
    return min(max_length, padded_width(longest, bucket_widths(max_length)))


def nvidia_smi_memory() -> int | None:
    """Memory of the smallest GPU that nvidia-smi lists on this machine, in bytes; None without nvidia-smi or a
    working driver. A subprocess: the caller opens no CUDA context (on a GPU its trials share, or in a Ray worker
    that lives on)."""
    if smi := shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                    capture_output=True, text=True, timeout=20, check=True).stdout.split()
            return min(int(float(mib) * 2**20) for mib in listed) if listed else None  # MiB per GPU
        except (OSError, subprocess.SubprocessError, ValueError):
            pass  # a broken driver install
    return None


def gpu_memory_bytes() -> int:
    """Total memory of one GPU of this machine: TUNE_APP_GPU_MEMORY_GB, else the smallest GPU nvidia-smi lists,
    else torch's first visible GPU, else 80 GB. (A study asks its cluster's GPU nodes first:
    cluster.planned_gpu_memory.)"""
    if os.environ.get(GPU_MEMORY_ENV):
        return int(float(os.environ[GPU_MEMORY_ENV]) * 1e9)
    if (listed := nvidia_smi_memory()) is not None:
        return listed
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no usable CUDA on the driver: the documented default
        pass
    return int(DEFAULT_GPU_MEMORY_GB * 1e9)


def trials_per_gpu(estimate: MemoryEstimate, gpu_memory: int, cpus_per_gpu: float | None, cpus_per_trial: int,
                   *, packed: bool = False) -> int:
    """How many trials share one GPU: as many as fit its usable memory, no more than its CPU cores can run. Packed
    (tune.pack), the trials share one process and one copy of the base: one base's weights and one process's
    overhead, plus each trial's adapter, optimizer and activations."""
    by_memory = int(USABLE_MEMORY * gpu_memory // estimate.total)
    if packed:
        shared = estimate.weights + estimate.cast_weights + estimate.overhead
        by_memory = int((USABLE_MEMORY * gpu_memory - shared) // (estimate.trainable + estimate.activations))
    by_cpu = int(cpus_per_gpu // cpus_per_trial) if cpus_per_gpu else MAX_TRIALS_PER_GPU
    return max(1, min(by_memory, by_cpu, MAX_TRIALS_PER_GPU))


def share_for(n_trials: int) -> float:
    """1/n rounded down to Ray's resource precision (1e-4), so n trials always fit on one GPU."""
    return 1.0 if n_trials <= 1 else math.floor(10_000 / n_trials) / 10_000


def auto_estimate(model, space: dict[str, Any], max_length: int, longest: int | None,
                  num_labels: int = 2, precision: str = "auto") -> MemoryEstimate:
    """Memory estimate of the largest trial a model's search space can propose (config.json only), at the
    study's train.precision: fp32 keeps weights and activations in 4 bytes, autocast computes in 2."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(resolve_checkpoint(model.checkpoint), **hub_options(model))
    n_params = count_parameters(hf_config, num_labels)
    dtype = weights_dtype(model.dtype, checkpoint_dtype(hf_config), n_params, on_gpu=True, precision=precision)
    return estimate_trial_memory(
        hf_config, batch_size=int(_largest(space.get("batch_size", 8))), seq_len=padded_length(longest, max_length),
        lora_rank=int(_largest(space.get("lora_rank", 8))),
        preset=str(_largest(space.get("target_modules", "attention_qv"))),
        weights_bytes=4 if dtype == "fp32" else 2, activation_bytes=4 if precision == "fp32" else 2,
        num_labels=num_labels)


def gpu_share(model, gpus_available: float, *, estimate: MemoryEstimate | None = None,
              cpus_available: float | None = None, gpu_memory: int | None = None, packed: bool = False) -> float:
    """The model's GPU share per trial, or 0 on a cluster without GPUs (the same YAML then runs on CPU).
    `gpu: auto` needs `estimate`; without one it falls back to a whole GPU."""
    if gpus_available <= 0:
        return 0.0
    if model.gpu != "auto":
        return float(model.gpu)
    if estimate is None:
        return 1.0
    cpus_per_gpu = cpus_available / gpus_available if cpus_available else None
    n = trials_per_gpu(estimate, gpu_memory or gpu_memory_bytes(), cpus_per_gpu, model.cpu, packed=packed)
    return share_for(n)


def trial_resources(cfg, gpus_available: float, *, cpus_available: float | None = None,
                    longest: dict[str, int] | None = None, num_labels: int = 2,
                    gpu_memory: int | None = None) -> dict[str, dict[str, float]]:
    """Ray resources of one trial, per model: its CPUs, and its GPU share when the cluster has GPUs.
    `longest`: model name -> longest tokenized training row (tighter activation estimate than max_length);
    `gpu_memory`: bytes of the GPUs `gpu: auto` plans for (default: this machine's, gpu_memory_bytes)."""
    plan = {}
    for name, m in cfg.models.items():
        estimate = None
        if m.gpu == "auto" and gpus_available > 0:
            estimate = auto_estimate(m, cfg.model_space(name), cfg.data.max_length, (longest or {}).get(name),
                                     num_labels, precision=cfg.train.precision)
        plan[name] = {"cpu": m.cpu, "gpu": gpu_share(m, gpus_available, estimate=estimate,
                                                     cpus_available=cpus_available, gpu_memory=gpu_memory,
                                                     packed=cfg.tune.pack != "off")}
    return plan
