"""The training loop on CPU with a tiny random-weight BERT: batching, bucketed padding, gradient accumulation,
learning on a toy task, and resuming from a checkpoint. `fit` runs in-process (no Ray)."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np
import pytest
import torch

from tune_app.spec.rundir import STATE_FILE
from tune_app.spec.space import HYPERPARAMETERS
from tune_app.train import memory as base_cache
from tune_app.train.batching import (
    CPU_INFERENCE_ROWS,
    IGNORE_INDEX,
    bucket_widths,
    collate,
    inference_batches,
    length_grouped_batches,
    padded_width,
)
from tune_app.train.evaluation import predict_logits
from tune_app.train.memory import OOM_TEST_ENV
from tune_app.train.model import ModelSpec, build_model, trial_base
from tune_app.train.step import batch_loss
from tune_app.train.tokens import TokenizedData, TokenizedSplit
from tune_app.train.trainable import TrialContext, fit

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)
"""Deterministic runs; a wider random init so the toy signal is not squashed to noise by a random pooler."""


def toy_split(n: int, seed: int, vocab: int = 10_000) -> TokenizedSplit:
    """Learnable toy task: the class is the first token (word id 1000 or 2000, where BERT pools from), followed by
    4-40 random words (3000-8999); ids scaled down for a smaller vocabulary."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    rows = [[vocab // 10 if y else vocab // 5] + rng.integers(vocab * 3 // 10, vocab * 9 // 10,
                                                              int(rng.integers(4, 40))).tolist() for y in labels]
    return TokenizedSplit.from_lists([[int(t) for t in r] for r in rows], labels)


def make_context(checkpoint: str, epochs: int, n_train: int = 64, n_val: int = 32, vocab: int = 10_000) -> TrialContext:
    """fp32 and eager everywhere, so these tests mean the same on a GPU (where `auto` would pick bf16 autocast and
    CUDA graphs); the GPU-only tests turn those on themselves."""
    data = TokenizedData(key="toy", train=toy_split(n_train, 0, vocab), val=toy_split(n_val, 1, vocab))
    return TrialContext(models={"m": ModelSpec(checkpoint=checkpoint, data_key="toy")}, data_refs={"toy": data},
                        label_names=["0", "1"], class_weights=[0.8, 1.3], epochs=epochs, eval_batch_size=16,
                        max_length=64, compile=False, precision="fp32", cuda_graphs=False)


def make_config(**overrides) -> dict:
    config = {name: h.default for name, h in HYPERPARAMETERS.items()}
    config.update({"model": "m", "lora_dropout": 0.0, **overrides})
    return config


def run_fit(config, ctx, resume_dir=None):
    """fit with a report callback that keeps each epoch's metrics and checkpoint files (read inside the call)."""
    from safetensors.torch import load_file

    epochs = []

    def report(metrics, directory):
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=False)
        epochs.append((metrics, load_file(os.path.join(directory, "adapter_model.safetensors")), state))

    fit(config, ctx, report=report, resume_dir=resume_dir, threads=1)
    return epochs


def test_length_grouped_batches_cover_every_row_once_with_little_padding():
    lengths = np.random.default_rng(3).integers(1, 200, size=1003)
    batches = length_grouped_batches(lengths, 16, np.random.default_rng(0))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1003))
    assert all(1 <= len(b) <= 16 for b in batches) and sum(len(b) < 16 for b in batches) <= 2
    # Sorted within chunks of 50 batches: the padded area is far below what random batches would need.
    grouped = sum(len(b) * lengths[b].max() for b in batches)
    random_batches = np.array_split(np.random.default_rng(1).permutation(1003), len(batches))
    assert grouped < 0.7 * sum(len(b) * lengths[b].max() for b in random_batches)
    # Seeded: the same epoch gives the same batches, another epoch another order.
    again = length_grouped_batches(lengths, 16, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, length_grouped_batches(
        lengths, 16, np.random.default_rng(1))))


def test_bucketed_padding_gives_few_shapes():
    assert bucket_widths(512) == (16, 32, 64, 128, 192, 256, 384, 512)
    assert bucket_widths(100) == (16, 32, 64, 100)
    widths = bucket_widths(512)
    assert [padded_width(n, widths) for n in (1, 16, 17, 65, 129, 500)] == [16, 16, 32, 128, 192, 512]
    assert padded_width(13) == 16 and padded_width(17) == 24  # eager: multiples of 8
    # Every length 1..512 lands in one of 8 shapes, never shorter than the row.
    assert len({padded_width(n, widths) for n in range(1, 513)}) == 8

    split = toy_split(5, 0)
    rows = np.array([0, 3])
    ids, mask, labels = collate(split, rows, pad_id=0, widths=widths, num_rows=4)
    assert ids.shape == (4, padded_width(int(split.lengths[rows].max()), widths))
    assert mask[:2].sum(1).tolist() == split.lengths[rows].tolist()
    assert labels.tolist()[:2] == split.labels[rows].tolist() and labels.tolist()[2:] == [IGNORE_INDEX] * 2
    assert torch.equal(ids[2], ids[0]) and torch.equal(ids[3], ids[0])  # filler rows: a real row, no loss


def test_inference_batches_hold_the_tokens_of_the_widest():
    """Longest rows first; each batch holds at most the padded tokens of `batch_size` rows of the longest, so the
    widest batch has batch_size rows and short rows go many to a batch."""
    lengths = np.random.default_rng(4).integers(1, 120, size=500)
    lengths[7] = 300
    batches = inference_batches(lengths, 16)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    assert batches[0][0] == 7 and len(batches[0]) == 16
    budget = 16 * padded_width(300)
    assert all(len(b) * padded_width(int(lengths[b].max())) <= budget and len(b) <= 4 * 16 for b in batches)
    assert len(batches) < 500 / 16 / 2  # fixed 16-row batches would need 32
    assert inference_batches(np.array([], dtype=np.int64), 16) == []
    # Rows are capped at 4 x batch_size however short; an empty row (length 0) is a row like any other.
    short = inference_batches(np.array([300] + [5] * 200 + [0]), 16)
    assert [len(b) for b in short] == [16, 64, 64, 58]  # the first holds the 300-token row, padded to its width


def test_evaluation_out_of_memory_halves_its_batches(tiny_models, monkeypatch, capsys):
    """A trial whose evaluation runs out of memory retries with half the batch, down to what fits, and scores
    every row as before, in row order."""
    model, _, pad_id = build_model(ModelSpec(tiny_models("bert"), "k"), make_config(), ["0", "1"])
    split = toy_split(70, 2)
    args = (model, split, pad_id, 64, torch.device("cpu"), contextlib.nullcontext)
    whole, size = predict_logits(*args)
    assert size == CPU_INFERENCE_ROWS == 8  # a CPU: small batches, which pad least
    monkeypatch.setenv(OOM_TEST_ENV, "3")
    halved, fitted = predict_logits(*args)
    assert "out of memory in evaluation: batches of 4 rows" in capsys.readouterr().out and fitted == 2
    np.testing.assert_allclose(halved, whole, rtol=1e-4, atol=1e-5)
    # The size that fit fits next time: the next evaluation (next epoch) does not run out of memory again.
    again, same = predict_logits(*args[:3], fitted, *args[4:])
    assert same == fitted and "out of memory" not in capsys.readouterr().out
    np.testing.assert_allclose(again, whole, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_equals_full_batch(tiny_models):
    checkpoint = tiny_models("bert", **NO_DROPOUT)
    model, _, pad_id = build_model(ModelSpec(checkpoint, "toy"), make_config(lora_rank=4), ["0", "1"])
    model.eval()  # dropout off; gradients still flow
    split = toy_split(12, 2)
    rows = np.arange(12)
    weight = torch.tensor([0.8, 1.3])
    total = float(weight[torch.from_numpy(split.labels)].sum())
    trainable = [p for p in model.parameters() if p.requires_grad]
    nullcontext = __import__("contextlib").nullcontext

    def grads(parts, num_rows=None):
        model.zero_grad(set_to_none=True)
        for part in parts:
            batch_loss(model, *collate(split, part, pad_id, num_rows=num_rows), weight, total, nullcontext).backward()
        return [p.grad.clone() for p in trainable]

    full = grads([rows])
    for split_into, num_rows in ((np.array_split(rows, 3), None), (np.array_split(rows, [5, 9]), 5)):
        accumulated = grads(split_into, num_rows)  # 4+4+4, and 5+4+3 filled up to 5 rows
        for a, b in zip(full, accumulated):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in full)


def test_loss_decreases_and_accumulation_changes_nothing(tiny_models, monkeypatch):
    ctx = make_context(tiny_models("bert", **NO_DROPOUT), epochs=4)
    config = make_config(learning_rate=1e-2, batch_size=8, lora_rank=8, lr_scheduler="constant")
    epochs = run_fit(config, ctx)
    losses = [m["train_loss"] for m, _, _ in epochs]
    assert losses[-1] < 0.5 * losses[0], losses
    assert epochs[-1][0]["accuracy"] >= 0.8, epochs[-1][0]
    assert epochs[-1][0]["threads"] == 1 and epochs[-1][0]["compiled"] is False

    # The same run with micro-batches of 4 (the OOM path, forced): the same effective batch, the same training.
    monkeypatch.setenv(OOM_TEST_ENV, "4")
    accumulated = run_fit(config, make_context(ctx.models["m"].checkpoint, epochs=1))
    assert accumulated[0][0]["micro_batch_size"] == 4
    assert abs(accumulated[0][0]["eval_loss"] - epochs[0][0]["eval_loss"]) < 1e-4  # evaluated in batches of 4
    for name, tensor in epochs[0][1].items():
        torch.testing.assert_close(accumulated[0][1][name], tensor, rtol=1e-3, atol=1e-5)


def test_resume_restores_optimizer_and_schedule(tiny_models, tmp_path):
    checkpoint = tiny_models("bert", **NO_DROPOUT)
    config = make_config(learning_rate=1e-3, batch_size=16, lr_scheduler="linear", warmup_ratio=0.2)
    straight = run_fit(config, make_context(checkpoint, epochs=2))

    from safetensors.torch import save_file

    assert straight[0][2]["epoch"] == 1  # epoch 1's checkpoint state says so
    # A 2-epoch trial interrupted after epoch 1: resume it from epoch 1's checkpoint files.
    resume_dir = str(tmp_path)
    save_file(straight[0][1], os.path.join(resume_dir, "adapter_model.safetensors"))
    torch.save(straight[0][2], os.path.join(resume_dir, STATE_FILE))
    resumed = run_fit(config, make_context(checkpoint, epochs=2), resume_dir=resume_dir)

    assert [m["epoch"] for m, _, _ in resumed] == [2]
    end, resumed_end = straight[-1][2], resumed[-1][2]
    assert resumed_end["scheduler"] == end["scheduler"]  # same step count and learning rate
    assert resumed_end["scheduler"]["last_epoch"] == 2 * 4  # 64 rows / 16 per step x 2 epochs
    steps = [s["step"] for s in resumed_end["optimizer"]["state"].values()]
    assert steps and all(float(s) == 8 for s in steps)
    for name, tensor in straight[-1][1].items():
        torch.testing.assert_close(resumed[-1][1][name], tensor, rtol=1e-4, atol=1e-6)
    assert resumed[-1][0]["train_time_s"] > resumed[-1][0]["epoch_time_s"]  # the clock carried over


@pytest.mark.skipif(torch.cuda.is_available(), reason="bit-for-bit repeats are a CPU property: GPU attention "
                    "backward kernels may sum in any order")
@pytest.mark.parametrize("lora_bias", ["none", "all"])
def test_a_trial_repeats_exactly_in_the_same_process(tiny_models, lora_bias):
    """tune.reuse_actors runs trial after trial in one worker process: nothing of an earlier trial (RNG state,
    threads, trained weights) may leak into the next, so the same config gives the same adapter, dropout included.
    The second trial reuses the base the first loaded (`base_cache`); with lora_bias all, the base's biases it
    trained are back to their loaded values."""
    base_cache.clear()
    ctx = make_context(tiny_models("bert"), epochs=1)
    config = make_config(lora_dropout=0.1, learning_rate=1e-2, batch_size=8, lora_bias=lora_bias)
    first, second = run_fit(config, ctx), run_fit(config, ctx)
    assert (first[0][0]["base_reused"], second[0][0]["base_reused"]) == (False, True)
    assert first[0][0]["f1"] == second[0][0]["f1"] and first[0][0]["train_loss"] == second[0][0]["train_loss"]
    assert any("intermediate.dense.bias" in name for name in first[0][1]) == (lora_bias == "all")
    for name, tensor in first[0][1].items():
        torch.testing.assert_close(second[0][1][name], tensor, rtol=0, atol=0)
    assert live_models() == 0  # what train_trial does after each trial: no PEFT model outlives it


@pytest.mark.parametrize("model_type", ["roberta", "llama"])
def test_a_kept_base_is_the_base_as_loaded(tiny_models, model_type):
    """What a worker keeps after a trial is the base a fresh load gives: same modules, same weights (the trained
    head copy and LoRA layers gone, the trained biases restored, in their dtype), nothing left trainable. All
    linear layers adapted, so RoBERTa's head holds LoRA layers inside its trained copy too."""
    from transformers import AutoConfig

    base_cache.clear()
    checkpoint = tiny_models(model_type)
    ctx = make_context(checkpoint, epochs=1, vocab=AutoConfig.from_pretrained(checkpoint).vocab_size)
    run_fit(make_config(learning_rate=1e-2, lora_bias="all", target_modules="all_linear"), ctx)
    kept = base_cache.take((ctx.models["m"], ("0", "1"), torch.cuda.is_available(), "fp32", 0),
                           lambda: pytest.fail("not kept"))
    torch.manual_seed(ctx.seed)  # as fit seeds before its load: the same fresh head, then the same random state
    fresh = trial_base(ctx.models["m"], ctx.label_names)
    torch.testing.assert_close(kept.random_state[0], torch.get_rng_state(), rtol=0, atol=0)
    assert kept.reused and {n: type(m) for n, m in kept.base.model.named_modules()} == {
        n: type(m) for n, m in fresh.model.named_modules()}
    kept_state, fresh_state = kept.base.model.state_dict(), fresh.model.state_dict()
    assert kept_state.keys() == fresh_state.keys()
    for name, tensor in fresh_state.items():
        torch.testing.assert_close(kept_state[name].cpu(), tensor, rtol=0, atol=0, msg=name)  # kept on the GPU there
    assert not any(p.requires_grad or p.grad is not None for p in kept.base.model.parameters())
    assert "peft_config" not in kept.base.model.__dict__
    base_cache.clear()


def test_a_worker_keeps_one_base_and_none_after_a_failed_trial(tiny_models, monkeypatch):
    """A trial of another model replaces the kept base (one in memory at a time); a trial that fails keeps none
    (its base may be half-changed), and the next trial loads afresh."""
    base_cache.clear()
    bert, roberta = make_context(tiny_models("bert"), epochs=1), make_context(tiny_models("roberta"), epochs=1)
    run_fit(make_config(), bert)
    assert run_fit(make_config(), roberta)[0][0]["base_reused"] is False
    assert run_fit(make_config(), roberta)[0][0]["base_reused"] is True
    monkeypatch.setenv(OOM_TEST_ENV, "1")  # every step fails, beyond the retries
    with pytest.raises(torch.OutOfMemoryError):
        run_fit(make_config(batch_size=8), dataclasses.replace(roberta, max_oom_retries=0))
    monkeypatch.delenv(OOM_TEST_ENV)
    assert run_fit(make_config(), roberta)[0][0]["base_reused"] is False
    base_cache.clear()


def live_models() -> int:
    """PEFT models still alive after `release_memory` (each would hold its weights, on a GPU too)."""
    from tune_app.train.memory import release_memory

    release_memory()
    return count_models()


def count_models() -> int:
    import gc

    from peft import PeftModel

    return sum(isinstance(o, PeftModel) for o in gc.get_objects())


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tiny_models):
    """train.compile: true compiles each transformer block once per padding bucket (16/32/64 here: the toy rows
    are 5-41 tokens), warms them up before the clock starts, and trains what eager trains."""
    checkpoint = tiny_models("bert", **NO_DROPOUT)
    config = make_config(learning_rate=1e-2, batch_size=8, lora_rank=4)
    eager = run_fit(config, make_context(checkpoint, epochs=1))
    ctx = make_context(checkpoint, epochs=1)
    ctx.compile = True
    compiled = run_fit(config, ctx)
    metrics = compiled[0][0]
    assert metrics["compiled"] is True and metrics["compile_time_s"] > 0
    # Per bucket at most two graphs (the first block's input needs no gradient, the later blocks' do), never
    # one per step or per block.
    assert 1 <= metrics["compiled_graphs"] <= 2 * 3, metrics["compiled_graphs"]
    assert abs(metrics["train_loss"] - eager[0][0]["train_loss"]) < 1e-3
    for name, tensor in eager[0][1].items():
        torch.testing.assert_close(compiled[0][1][name], tensor, rtol=1e-3, atol=1e-4)
    assert live_models() == 0  # torch.compile's caches keep no trained model alive for the next trial


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_train_like_eager(tiny_models, monkeypatch):
    """train.cuda_graphs replays one captured forward+backward per padding bucket (16/32/64 here) and trains what
    eager trains: same losses, same adapter. Batch 8 meets the OOM test hook, so graphs are dropped and captured
    again mid-step for micro-batches of 4 (gradient accumulation), and the short last batch is filled up."""
    monkeypatch.setenv(OOM_TEST_ENV, "4")
    checkpoint = tiny_models("bert", **NO_DROPOUT)
    config = make_config(learning_rate=1e-2, batch_size=8, lora_rank=4)
    runs = {}
    for graphs in (False, True):
        ctx = make_context(checkpoint, epochs=2, n_train=60)
        ctx.cuda_graphs, ctx.precision = graphs, "fp32"
        runs[graphs] = run_fit(config, ctx)
    assert runs[True][-1][0]["cuda_graphs"] >= 2 and runs[False][-1][0]["cuda_graphs"] == 0
    for (eager, _, _), (graphed, _, _) in zip(runs[False], runs[True]):
        assert abs(eager["train_loss"] - graphed["train_loss"]) < 1e-4
        assert abs(eager["eval_loss"] - graphed["eval_loss"]) < 1e-4
    for name, tensor in runs[False][-1][1].items():
        torch.testing.assert_close(runs[True][-1][1][name], tensor, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with loss scaling is for GPUs")
def test_fp16_trains_with_loss_scaling(tiny_models):
    """train.precision fp16 (GPUs without bf16): the loss is scaled up before the backward so that small fp16
    gradients do not flush to zero, and unscaled before clipping; CUDA graphs stay off. It learns the toy task,
    and the scaler's state goes into the checkpoint (a resumed trial continues with its scale)."""
    ctx = make_context(tiny_models("bert", **NO_DROPOUT), epochs=3)
    ctx.precision, ctx.cuda_graphs = "fp16", "auto"
    epochs = run_fit(make_config(learning_rate=1e-2, batch_size=8, lora_rank=8, lr_scheduler="constant"), ctx)
    last = epochs[-1][0]
    assert last["autocast"] == "fp16" and last["cuda_graphs"] == 0
    assert last["train_loss"] < 0.7 * epochs[0][0]["train_loss"], [m["train_loss"] for m, _, _ in epochs]
    assert epochs[-1][2]["scaler"]["scale"] > 0


def test_a_trial_stopped_by_tune_leaves_nothing_for_the_next(tiny_models):
    """Tune stops a trial by raising SystemExit in tune.report, in the trial's own thread, and may end the worker
    right after it: the thread must free nothing then. The trial keeps its base before its last report, and its
    model stays referenced after its thread ends; the next trial frees it first (release_memory), and reuses the
    base."""
    import threading

    from tune_app.train.memory import release_memory

    kept_at_report = []

    def stopped_by_tune(metrics, directory):
        kept_at_report.append((metrics["epoch"], base_cache._kept is not None))
        raise SystemExit(0)

    # lora_bias all: giving the base back swaps the trained biases out, which must not free them either.
    ctx, config = make_context(tiny_models("bert"), epochs=2), make_config(lora_bias="all")
    stops = []

    def trial_thread(epochs: int):
        try:
            fit(config, dataclasses.replace(ctx, epochs=epochs), report=stopped_by_tune, threads=1)
        except SystemExit:
            stops.append(epochs)

    for epochs in (2, 1):  # stopped early (ASHA), then stopped at its last epoch (max_t)
        thread = threading.Thread(target=trial_thread, args=(epochs,))
        thread.start()
        thread.join()
        assert count_models() == 1  # not freed by the trial's thread
        assert base_cache._kept is not None and base_cache._kept._replaced  # kept, with what it swapped out
        release_memory()
        assert count_models() == 0
    assert stops == [2, 1]
    # The base is handed back before a trial's last report (epoch 1 of 1), after an earlier one (epoch 1 of 2).
    assert kept_at_report == [(1, False), (1, True)]
    assert run_fit(config, ctx)[0][0]["base_reused"] is True


def test_a_worker_ended_inside_a_garbage_collection_callback_prints_no_traceback():
    """Ray ends a trial's worker with SIGTERM, whose handler raises SystemExit wherever the worker is; inside a
    garbage-collection callback Python would print it as "Exception ignored" with a traceback, into the study's
    output. A trial's worker (quiet_ray) keeps exits quiet and every other such exception as loud as before."""
    import subprocess
    import sys

    code = "\n".join([
        "import weakref",
        "from tune_app.train.model import quiet_ray",
        "quiet_ray()",
        "quiet_ray()",  # a worker's next trial: the hook is not wrapped twice
        "class Thing: pass",
        "def raising(kind):",
        "    def callback(_):",
        "        raise kind('from a callback')",
        "    return callback",
        "a, b = Thing(), Thing()",
        "refs = weakref.ref(a, raising(SystemExit)), weakref.ref(b, raising(ValueError))",
        "del a, b",
        "print('still running')",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "still running", done.stderr
    assert "SystemExit" not in done.stderr
    assert done.stderr.count("Exception ignored") == 1 and "ValueError: from a callback" in done.stderr
