"""`gpu: auto`: parameter counts from config dims, the memory estimate, and the packing decision."""

from __future__ import annotations

import os

import pytest
from transformers import AutoConfig, LlamaConfig, RobertaConfig

from tune_app.spec.config import ModelConfig
from tune_app.study.resources import (
    GIB,
    GPU_MEMORY_ENV,
    auto_estimate,
    estimate_trial_memory,
    gpu_memory_bytes,
    gpu_share,
    lora_parameters,
    padded_length,
    share_for,
    trials_per_gpu,
)
from tune_app.train.precision import checkpoint_dtype, count_parameters, weights_dtype

ROBERTA_LARGE = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1)
LLAMA_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       intermediate_size=11008)


@pytest.fixture(scope="module")
def minilm_config(minilm_path):
    return AutoConfig.from_pretrained(minilm_path)


@pytest.mark.parametrize("name", ["roberta-large", "llama-7b", "minilm"])
def test_parameter_count_matches_the_instantiated_model(name, minilm_config):
    import torch
    from transformers import AutoModelForSequenceClassification

    config = {"roberta-large": ROBERTA_LARGE, "llama-7b": LLAMA_7B, "minilm": minilm_config}[name]
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = AutoModelForSequenceClassification.from_config(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


def test_lora_parameters_grow_with_rank_and_targets():
    qv = lora_parameters(ROBERTA_LARGE, 8, "attention_qv")
    # r x (in + out) for q and v in 24 blocks = 8 x 2048 x 2 x 24 = 786,432, plus the 1024x1024 dense + out head.
    assert qv == 786_432 + 1024 * 1024 + 1024 + 1024 * 2 + 2
    assert lora_parameters(ROBERTA_LARGE, 16, "attention_qv") > qv
    assert lora_parameters(ROBERTA_LARGE, 8, "all_linear") > lora_parameters(ROBERTA_LARGE, 8, "attention") > qv


def test_memory_estimates_are_plausible(minilm_config):
    # llama-7b, bf16 weights: 6.6e9 x 2 B = 13.2 GB; batch 8 x 64 tokens of activations is a few GB at most
    # (we measured a 16.5 GB peak at batch 8 on the tweets on an H100). Must land between 14 and 24 GB.
    llama = estimate_trial_memory(LLAMA_7B, batch_size=8, seq_len=64, lora_rank=8, preset="attention_qv",
                                  weights_bytes=2, activation_bytes=2)
    assert 14 * GIB < llama.total < 24 * GIB
    # roberta-large fp32: 1.42 GB weights; measured peak 2.8 GB (tweets, batch 8) plus the CUDA context.
    roberta = estimate_trial_memory(ROBERTA_LARGE, batch_size=8, seq_len=64, lora_rank=8, preset="attention_qv",
                                    weights_bytes=4, activation_bytes=2)
    assert 2.4 * GIB < roberta.total < 6 * GIB
    # Autocast keeps bf16 copies of fp32 block weights for the backward: 2 bytes per non-embedding parameter
    # (about 0.6 GB here); none when the weights are half precision already, or with fp32 compute.
    assert 0.5 * GIB < roberta.cast_weights < 0.7 * GIB and llama.cast_weights == 0
    assert estimate_trial_memory(ROBERTA_LARGE, batch_size=8, seq_len=64, lora_rank=8, preset="attention_qv",
                                 weights_bytes=4, activation_bytes=4).cast_weights == 0
    # Activations scale with tokens: 512-token rows need 8x the 64-token activations.
    long = estimate_trial_memory(ROBERTA_LARGE, batch_size=8, seq_len=512, lora_rank=8, preset="attention_qv",
                                 weights_bytes=4, activation_bytes=2)
    assert long.activations == 8 * roberta.activations
    # MiniLM: 91 MB of weights; the process overhead dominates (1-2 GB).
    minilm = estimate_trial_memory(minilm_config, batch_size=16, seq_len=64, lora_rank=8, preset="attention_qv",
                                   weights_bytes=4, activation_bytes=2)
    assert 1 * GIB < minilm.total < 2 * GIB


def test_packing_respects_memory_and_cores():
    est = estimate_trial_memory(ROBERTA_LARGE, batch_size=8, seq_len=64, lora_rank=8, preset="attention_qv",
                                weights_bytes=4, activation_bytes=2)
    assert trials_per_gpu(est, 80 * 10**9, cpus_per_gpu=16, cpus_per_trial=2) == 8  # cores bind first
    assert trials_per_gpu(est, 80 * 10**9, cpus_per_gpu=64, cpus_per_trial=1) > 8  # memory binds
    assert trials_per_gpu(est, 2 * 10**9, cpus_per_gpu=16, cpus_per_trial=1) == 1  # too big: a whole GPU
    assert share_for(3) == 0.3333 and 3 * share_for(3) <= 1 and share_for(1) == 1.0
    llama = estimate_trial_memory(LLAMA_7B, batch_size=8, seq_len=64, lora_rank=8, preset="attention_qv",
                                  weights_bytes=2, activation_bytes=2)
    assert trials_per_gpu(llama, 80 * 10**9, cpus_per_gpu=16, cpus_per_trial=1) in (3, 4)


def test_packed_trials_plan_memory_for_one_base_and_k_adapters():
    """tune.pack: one copy of the base and one process per GPU, plus each trial's adapter and activations: on an
    80 GB GPU, a 7B model's packed trials are as many as fit that sum, over four times the unpacked count."""
    llama = estimate_trial_memory(LLAMA_7B, batch_size=8, seq_len=64, lora_rank=8, preset="attention_qv",
                                  weights_bytes=2, activation_bytes=2)
    usable = 0.9 * 80 * 10**9
    alone = trials_per_gpu(llama, 80 * 10**9, cpus_per_gpu=None, cpus_per_trial=1)
    packed = trials_per_gpu(llama, 80 * 10**9, cpus_per_gpu=None, cpus_per_trial=1, packed=True)
    assert alone * llama.total <= usable < (alone + 1) * llama.total
    per_trial = llama.trainable + llama.activations
    assert llama.weights + llama.overhead + packed * per_trial <= usable < llama.weights + llama.overhead + (
        packed + 1) * per_trial
    assert packed > 4 * alone
    assert trials_per_gpu(llama, 80 * 10**9, cpus_per_gpu=4, cpus_per_trial=1, packed=True) == 4  # cores still cap


def test_explicit_fractions_are_honoured_and_auto_packs():
    est = estimate_trial_memory(ROBERTA_LARGE, batch_size=8, seq_len=64, lora_rank=8, preset="attention_qv",
                                weights_bytes=4, activation_bytes=2)
    assert gpu_share(ModelConfig(checkpoint="x", gpu=0.3), 1, estimate=est) == 0.3
    assert gpu_share(ModelConfig(checkpoint="x", gpu="auto", cpu=2), 1, estimate=est, cpus_available=16,
                     gpu_memory=80 * 10**9) == 0.125
    assert gpu_share(ModelConfig(checkpoint="x", gpu="auto"), 0, estimate=est) == 0.0  # CPU-only cluster


def test_weights_dtype_policy():
    assert weights_dtype("auto", "float32", 355_000_000, on_gpu=True) == "fp32"
    assert weights_dtype("auto", "float32", 7_000_000_000, on_gpu=True) == "half"  # no 28 GB fp32 copy
    assert weights_dtype("auto", "bfloat16", 100, on_gpu=True) == "half"
    assert weights_dtype("auto", "bfloat16", 100, on_gpu=False) == "fp32"
    assert weights_dtype("auto", "bfloat16", 100, on_gpu=True, precision="fp32") == "fp32"
    assert weights_dtype("fp16", "float32", 100, on_gpu=False) == "fp16"


def test_checkpoint_dtype_is_read_without_the_deprecation_warning(tmp_path, caplog):
    """config.json's dtype, under both spellings, without transformers 5's "`torch_dtype` is deprecated" line
    (which tune-app run printed once per study)."""
    import logging
    import types

    import torch

    getattr(logging.Logger.warning_once, "cache_clear", lambda: None)()  # transformers logs it once per process
    hf_logger = logging.getLogger("transformers")  # does not propagate to the root logger caplog listens on
    hf_logger.addHandler(caplog.handler)
    try:
        dims = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        RobertaConfig(**dims, dtype="bfloat16").save_pretrained(tmp_path / "bf16")
        assert checkpoint_dtype(AutoConfig.from_pretrained(tmp_path / "bf16")) in (torch.bfloat16, "bfloat16")
        RobertaConfig(**dims).save_pretrained(tmp_path / "none")  # as many older Hub configs: no dtype at all
        assert checkpoint_dtype(AutoConfig.from_pretrained(tmp_path / "none")) is None
    finally:
        hf_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert checkpoint_dtype(types.SimpleNamespace(torch_dtype="float16")) == "float16"  # transformers < 4.56
    assert checkpoint_dtype(types.SimpleNamespace()) is None


def test_padded_length_is_the_trials_bucket_of_the_longest_row():
    assert [padded_length(n, 512) for n in (10, 40, 130, 300, 600)] == [16, 64, 192, 384, 512]
    assert padded_length(None, 256) == 256  # data not tokenized yet: the cap


def test_auto_estimate_follows_train_precision(tmp_path):
    """train.precision: fp32 means fp32 base weights and activations even for a 7B model: twice the bytes."""
    LLAMA_7B.save_pretrained(tmp_path)
    model = ModelConfig(checkpoint=str(tmp_path), gpu="auto")
    half = auto_estimate(model, {}, 512, 40)
    full = auto_estimate(model, {}, 512, 40, precision="fp32")
    assert full.weights == 2 * half.weights and full.activations == 2 * half.activations
    assert full.trainable == half.trainable  # LoRA, head and AdamW states are fp32 either way


@pytest.mark.parametrize("script, expected", [
    ("echo 81559; echo 81559", 81559 * 2**20),  # an H100 80GB, as nvidia-smi lists it (MiB per GPU)
    ("echo 'NVIDIA-SMI has failed' >&2; exit 9", None),  # broken driver: torch's GPU, else the 80 GB default
])
def test_gpu_memory_is_read_from_nvidia_smi(tmp_path, monkeypatch, script, expected):
    import torch

    if expected is None:
        expected = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 10**9
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{script}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)
    assert gpu_memory_bytes() == expected
    monkeypatch.setenv(GPU_MEMORY_ENV, "40")
    assert gpu_memory_bytes() == 40 * 10**9  # the setting wins


def test_a_trial_no_node_can_hold_is_warned_about(ray_session, capsys):
    """On a cluster, a trial larger than every live node waits for one to join: the study says so up front."""
    from tune_app.study.cluster import check_trials_fit

    check_trials_fit({"small": {"cpu": 1, "gpu": 0.0}})
    assert capsys.readouterr().out == ""
    check_trials_fit({"big": {"cpu": 999, "gpu": 0.5}})  # the test session's Ray: started by its caller
    assert ("warning: no node of this Ray cluster has 999 CPU and 0.5 GPU for one trial of big; its trials wait "
            "until such a node joins (an autoscaler adds it), or lower models.big.cpu/gpu") in capsys.readouterr().out


def test_gpu_auto_plans_for_the_setting_else_says_it_guesses(ray_session, monkeypatch):
    """Where no GPU node can tell its GPUs' memory (this test session's Ray has none), the plan says it guessed and
    how to set it; TUNE_APP_GPU_MEMORY_GB wins. (The GPU nodes' own nvidia-smi: tests/test_nodes.py.)"""
    from tune_app.study.cluster import planned_gpu_memory

    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)
    guessed = planned_gpu_memory()
    assert guessed.bytes == gpu_memory_bytes() and guessed.basis.startswith("a guess: no GPU node")
    assert GPU_MEMORY_ENV in guessed.describe()
    monkeypatch.setenv(GPU_MEMORY_ENV, "24")
    assert planned_gpu_memory().bytes == 24 * 10**9
    assert planned_gpu_memory().describe() == f"24.0 GB per GPU ({GPU_MEMORY_ENV}=24)"
