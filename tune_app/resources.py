"""Trial resources: how much of a GPU (and how many CPUs) each trial of a model holds."""

from __future__ import annotations

from tune_app.config import ModelConfig

AUTO_GPU_SHARE = 1.0
"""GPU share of `gpu: auto` trials until a memory estimate is available."""


def gpu_share(model: ModelConfig, gpus_available: float) -> float:
    """The model's GPU share per trial, or 0 on a cluster without GPUs (the same YAML then runs on CPU)."""
    if gpus_available <= 0:
        return 0.0
    if model.gpu == "auto":
        return AUTO_GPU_SHARE
    return float(model.gpu)
