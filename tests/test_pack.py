"""Adapter packing (tune_app.train.pack): trials of one model trained in one process over one base train exactly what
each trains alone with the same seed (fp32, CPU): the same losses, metrics and adapters, with hidden, attention and
LoRA dropout on, different ranks, targets, learning rates and batch sizes in one pack, and a trial leaving midway."""

from __future__ import annotations

import csv
import os

import pytest
import torch

from tests.test_trial import make_config, make_context, run_fit
from tune_app.train import memory
from tune_app.train.pack import Pack, fit_pack, packable

DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
"""The base's own dropout on: each trial's rows must draw their own masks, at their own widths."""

TRIALS = {
    "a": dict(lora_rank=4, learning_rate=1e-3, batch_size=8, lora_dropout=0.1),
    "b": dict(lora_rank=8, learning_rate=5e-4, batch_size=4, lora_dropout=0.2, target_modules="attention"),
    "c": dict(lora_rank=2, learning_rate=2e-3, batch_size=16, use_rslora=True, lora_alpha_ratio=2),
}


def run_pack(configs, ctx, stop_after: dict[str, int] | None = None, threads: int = 1, device: str = "cpu"):
    """fit_pack with a report that keeps each trial's metrics and adapter per epoch; a trial in `stop_after` leaves
    after that many epochs (as ASHA stops it). `threads`: the pack's CPU cores (its trials step in that many
    groups at once). On the CPU unless told otherwise, even where there is a GPU (the thread groups are a CPU's)."""
    from safetensors.torch import load_file

    epochs = {name: [] for name in configs}

    def report(name, metrics, directory):
        epochs[name].append((metrics, load_file(os.path.join(directory, "adapter_model.safetensors")),
                             sorted(os.listdir(directory))))
        return len(epochs[name]) < (stop_after or {}).get(name, 10**6)

    memory.clear()
    fit_pack(configs, ctx, report=report, threads=threads, device=device)
    return epochs


@pytest.fixture
def step_threads(monkeypatch):
    """The threads each packed forward ran in, and the trials of each (Pack.step, recorded)."""
    import threading

    seen = []
    step = Pack.step

    def recorded(self, slots=None):
        seen.append((threading.current_thread().name, tuple(sorted(s.name for s in slots or self.slots.values()))))
        return step(self, slots)

    monkeypatch.setattr(Pack, "step", recorded)
    return seen


def solo_runs(configs, ctx):
    runs = {}
    for name, config in configs.items():
        memory.clear()
        runs[name] = run_fit(config, ctx)
    return runs


def assert_same_training(solo, packed, rtol: float = 1e-5):
    """Every epoch's train loss and validation metrics, and the adapter and head it saved, as the solo run's."""
    assert len(packed) == len(solo)
    for (metrics, adapter, _), (p_metrics, p_adapter, files) in zip(solo, packed):
        for key in ("epoch", "train_loss", "eval_loss", "f1", "accuracy"):
            assert p_metrics[key] == pytest.approx(metrics[key], rel=rtol, abs=rtol / 10), key
        assert p_adapter.keys() == adapter.keys()
        for key, tensor in adapter.items():
            torch.testing.assert_close(p_adapter[key], tensor, rtol=rtol, atol=rtol / 10)
        assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "trainer_state.pt",
                "val_predictions.npy"} <= set(files)


@pytest.mark.parametrize("family,threads", [("bert", 1), ("llama", 1), ("bert", 2)])
def test_packed_trials_train_what_each_trains_alone(tiny_models, family, threads, step_threads):
    """Also on two CPU threads, where the trials step in two groups at once, each group a packed forward of its own
    in a step thread of the pack's, neither waiting for the other (the groups change from step to step with the
    trials' work and pace)."""
    checkpoint = tiny_models(family, **(DROPOUT if family == "bert" else {}))
    ctx = make_context(checkpoint, epochs=2, n_train=48, n_val=16, vocab=1000 if family == "bert" else 400)
    configs = {name: make_config(**params) for name, params in TRIALS.items()}
    solo, packed = solo_runs(configs, ctx), run_pack(configs, ctx, threads=threads)
    for name in configs:
        assert_same_training(solo[name], packed[name])
    # The trials really differ: a pack that trained one adapter for all would fail above, but say so plainly too.
    assert len({round(runs[-1][0]["train_loss"], 6) for runs in solo.values()}) == 3
    workers = {thread for thread, _ in step_threads if thread.startswith("tune_app-pack-step")}
    if threads == 1:
        assert not workers and max(len(trials) for _, trials in step_threads) == 3  # all three in one forward
    else:
        assert workers  # the groups stepped in the pack's step threads
        assert {len(trials) for _, trials in step_threads} == {1, 2}


@pytest.mark.parametrize("threads", [1, 2])
def test_each_packed_trial_scales_its_loss_with_its_own_scaler(tiny_models, monkeypatch, threads):
    """fp16 training (a GPU without bf16) scales each trial's loss by a GradScaler of its own. Forced here on the CPU
    in fp32, for solo and packed trials alike (growing every 2 steps, so trials of other step counts end at other
    scales), with trial a's gradients overflowing in its third step: that step is skipped for trial a alone, and
    each packed trial trains what it trains alone and saves its own scaler where its solo run saves it, at its solo
    run's scale."""
    from safetensors.torch import load_file

    from tune_app.spec.rundir import STATE_FILE
    from tune_app.train import pack, step

    def scaler(device, precision):
        return torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)

    clip_and_step = step.clip_and_step

    def overflowing(trainable, optimizer, *args):
        optimizer.tested_steps = getattr(optimizer, "tested_steps", 0) + 1
        if optimizer.param_groups[0]["initial_lr"] == TRIALS["a"]["learning_rate"] and optimizer.tested_steps == 3:
            trainable[0].grad.fill_(float("inf"))
        clip_and_step(trainable, optimizer, *args)

    for module in (step, pack):
        monkeypatch.setattr(module, "loss_scaler", scaler)
        monkeypatch.setattr(module, "clip_and_step", overflowing)
    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=2, n_train=48, n_val=16, vocab=1000)
    configs = {name: make_config(**params) for name, params in TRIALS.items()}
    solo = solo_runs(configs, ctx)
    packed, packed_scales = {name: [] for name in configs}, {}

    def report(name, metrics, directory):
        packed[name].append((metrics, load_file(os.path.join(directory, "adapter_model.safetensors")),
                             sorted(os.listdir(directory))))
        packed_scales[name] = torch.load(os.path.join(directory, STATE_FILE), weights_only=False)["scaler"]["scale"]

    memory.clear()
    fit_pack(configs, ctx, report=report, threads=threads, device="cpu")
    for name in configs:
        assert_same_training(solo[name], packed[name])
    scales = {name: runs[-1][2]["scaler"]["scale"] for name, runs in solo.items()}
    assert packed_scales == scales
    # 12 steps of trial a: 2 taken (the scale doubles), 1 overflowed (skipped, halved), 9 taken (4 doublings).
    assert scales == {"a": 2.0**14, "b": 2.0**(10 + 24 // 2), "c": 2.0**(10 + 6 // 2)}


@pytest.mark.parametrize("threads", [1, 2])
def test_out_of_memory_packs_fewer_trials_per_forward_and_halves_micro_batches(tiny_models, monkeypatch, capsys,
                                                                               threads, step_threads):
    """A packed forward that runs out of memory is taken again trial by trial, and lowers the work one forward may
    take, so later steps pack fewer trials per forward instead of failing every step; a trial that runs out alone
    halves its micro-batch (its effective batch unchanged), as a solo trial's step does. Each trial then trains what
    it trains alone under the same limit: a batch taken again draws its dropout masks again. Injected: a forward of
    more than 2 rows raises a CUDA-style OOM (so, in the end, one trial of micro-batch 2 per forward)."""
    monkeypatch.setenv(memory.OOM_TEST_ENV, "2")
    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=2, n_train=40, n_val=16, vocab=1000)
    configs = {name: make_config(**params) for name, params in TRIALS.items()}
    solo, packed = solo_runs(configs, ctx), run_pack(configs, ctx, threads=threads)
    for name in configs:
        assert [m["micro_batch_size"] for m, _, _ in packed[name]] == [2, 2]
        assert [m["micro_batch_size"] for m, _, _ in solo[name]] == [2, 2]
        assert_same_training(solo[name], packed[name])
    out = capsys.readouterr().out
    assert "c: out of memory in its pack: micro-batch -> 8, gradient accumulation -> 2" in out
    assert f"pack: out of memory with {3 if threads == 1 else 2} trials in one forward" in out
    # Packing fewer per forward: after the first failures, every forward holds one trial.
    steps = len(step_threads)
    assert all(len(trials) == 1 for _, trials in step_threads[steps // 2:])


def test_on_a_cpu_each_trial_steps_at_its_own_pace(tiny_models, monkeypatch):
    """On a CPU of two cores no trial waits for another's step: while one trial's step is held (as a step of batch
    32 takes longer than one of batch 8), the other takes step after step; in lockstep it would wait for it. The
    held trial still trains exactly its solo run."""
    import threading

    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=1, n_train=48, n_val=16, vocab=1000)
    configs = {"slow": make_config(**TRIALS["c"]), "fast": make_config(**TRIALS["a"])}
    fast_steps, released = [], threading.Event()
    step = Pack.step

    def held(self, slots=None):
        names = [s.name for s in slots]
        if names == ["slow"]:
            released.wait(timeout=20)
        step(self, slots)
        if names == ["fast"]:
            fast_steps.append(threading.current_thread().name)
            if len(fast_steps) == 3:
                released.set()

    monkeypatch.setattr(Pack, "step", held)
    packed = run_pack(configs, ctx, threads=2)
    assert released.is_set(), "the fast trial waited for the slow one's step"
    assert all(name.startswith("tune_app-pack-step") for name in fast_steps)
    assert_same_training(solo_runs({"slow": configs["slow"]}, ctx)["slow"], packed["slow"])


def test_on_a_cpu_a_trial_is_evaluated_while_the_others_step(tiny_models, monkeypatch):
    """A trial's epoch-end evaluation runs beside the other trials' steps, as in a process of its own: while it is
    held, the other trial takes steps (a pack that paused for it would wait out the timeout). Both still train
    exactly their solo runs: an evaluation in a training model drops nothing out, and draws nothing."""
    import threading

    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=1, n_train=48, n_val=16, vocab=1000)
    configs = {"short": make_config(**TRIALS["c"]), "long": make_config(**TRIALS["b"])}  # 3 steps, 12 steps
    evaluating, stepped_beside = threading.Event(), threading.Event()
    step, evaluate = Pack.step, Pack.evaluate
    long_steps, beside = [], []

    def held_step(self, slots=None):
        if [s.name for s in slots] == ["long"]:
            if len(long_steps) == 1:  # the long trial's second step waits for the short one's evaluation
                evaluating.wait(timeout=20)
            long_steps.append(evaluating.is_set())
            if long_steps.count(True) == 2:
                stepped_beside.set()
        return step(self, slots)

    def held_evaluation(self, name, *args, **kwargs):
        if name == "short":
            evaluating.set()
            beside.append(stepped_beside.wait(timeout=20))
        return evaluate(self, name, *args, **kwargs)

    monkeypatch.setattr(Pack, "step", held_step)
    monkeypatch.setattr(Pack, "evaluate", held_evaluation)
    packed = run_pack(configs, ctx, threads=2)
    assert beside == [True], "the long trial waited for the short one's evaluation"
    monkeypatch.undo()
    solo = solo_runs(configs, ctx)
    for name in configs:
        assert_same_training(solo[name], packed[name])


def test_a_packs_evaluations_leave_the_compile_stance_as_it_was(tiny_models):
    """Evaluations run in threads of their own (two at once here: twin batch sizes end their epochs together), so
    they must not set the process-wide torch.compile stance: one left at force_eager would keep every later
    torch.compile in the process (a solo trial's train.compile) from compiling anything."""
    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=3, n_train=48, n_val=16, vocab=1000)
    run_pack({"a": make_config(**TRIALS["a"]), "twin": make_config(**{**TRIALS["a"], "learning_rate": 1e-4})},
             ctx, threads=2)
    compiled = []

    def backend(graph, inputs):
        compiled.append(graph)
        return graph.forward

    assert torch.equal(torch.compile(lambda x: x * 2, backend=backend)(torch.ones(2)), torch.full((2,), 2.0))
    assert compiled, "torch.compile ran eagerly after the pack's evaluations"


def serve(configs, ctx, threads: int = 2):
    """A pack actor's body (PackServer) in-process, with these trials joined in order."""
    from tune_app.train.pack import PackServer

    memory.clear()
    server = PackServer(ctx, "m", "cpu", threads=threads, name="test-pack")
    for name, config in configs.items():
        server.join(name, config)
    return server


def assert_result_as_solo(result, ctx, config):
    """A pack server's epoch result has the metrics of the same epoch of the trial's solo run."""
    metrics = solo_runs({"solo": config}, ctx)["solo"][result["metrics"]["epoch"] - 1][0]
    for key in ("train_loss", "eval_loss", "f1", "accuracy"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key


def test_a_pack_server_hands_a_trial_its_result_while_another_steps(tiny_models, monkeypatch):
    """A pack actor's body (PackServer), in-process: a trial whose epoch is done gets its result while the other
    trial's step is under way (the training thread waits for its step threads without holding the lock a trial's
    call needs; before, that call waited out the other's step, or several), and both train their solo runs."""
    import threading

    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=1, n_train=48, n_val=16, vocab=1000)
    configs = {"short": make_config(**TRIALS["c"]), "long": make_config(**TRIALS["b"])}  # 3 steps, 12 steps
    delivered, held = threading.Event(), []
    step = Pack.step

    def held_step(self, slots=None):
        if [s.name for s in slots] == ["long"] and slots[0].steps == 1:  # its second step waits for the delivery
            held.append(delivered.wait(timeout=30))
        return step(self, slots)

    monkeypatch.setattr(Pack, "step", held_step)
    server = serve(configs, ctx)
    results = {"short": server.next_result("short")}
    delivered.set()
    files = {"short": set(os.listdir(results["short"]["checkpoint"]))}  # the trial reports from it, then leaves
    server.leave("short")
    results["long"] = server.next_result("long")
    files["long"] = set(os.listdir(results["long"]["checkpoint"]))
    server.leave("long")
    assert held == [True], "the short trial's result waited for the long trial's step"
    assert not server.trials and not server.pack.slots
    assert results["short"]["metrics"]["packed_trials"] == 2
    monkeypatch.undo()
    for name, result in results.items():
        assert result["last"] and result["metrics"]["epoch"] == 1
        assert {"adapter_model.safetensors", "trainer_state.pt", "metrics.json"} <= files[name]
        assert_result_as_solo(result, ctx, configs[name])


def test_a_diverging_trial_fails_alone_in_its_pack(tiny_models, monkeypatch):
    """A trial whose weights turn NaN (as a far too high learning rate makes them) gets an error naming the
    divergence and the fix; the other trial of its pack trains its solo run to the end."""
    from tune_app.train.pack import Slot

    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=1, n_train=48, n_val=16, vocab=1000)
    configs = {"bad": make_config(**TRIALS["c"]), "good": make_config(**TRIALS["b"])}
    optimizer_step = Slot.optimizer_step

    def diverging(self):
        optimizer_step(self)
        if self.name == "bad":
            with torch.no_grad():
                for parameter in self.trainable:
                    parameter.fill_(float("nan"))

    monkeypatch.setattr(Slot, "optimizer_step", diverging)
    server = serve(configs, ctx)
    bad = server.next_result("bad")
    good = server.next_result("good")
    server.leave("good")
    assert "diverged (lower its learning rate); the other trials of its pack train on" in bad["error"]
    assert "bad" not in server.trials and not server.pack.slots
    monkeypatch.undo()
    assert good["last"] and good["metrics"]["epoch"] == 1
    assert_result_as_solo(good, ctx, configs["good"])


def test_a_trial_that_stops_asking_loses_its_slot_and_the_others_train_on(tiny_models, monkeypatch, capsys):
    """Tune may end a trial without a word (ray.kill skips its `finally`): once its result has waited the lease, the
    trial is dropped and its slot freed while the other trial trains on, and a late call of it is told so."""
    import time

    from tune_app.train.pack import PackServer

    monkeypatch.setattr(PackServer, "LEASE_S", 1.0)
    step = Pack.step

    def slow_step(self, slots=None):  # the good trial's epochs outlast the lease (0.1 s a step, 12 steps)
        if any(s.name == "good" for s in slots):
            time.sleep(0.1)
        return step(self, slots)

    monkeypatch.setattr(Pack, "step", slow_step)
    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=2, n_train=48, n_val=16, vocab=1000)
    configs = {"gone": make_config(**TRIALS["c"]), "good": make_config(**TRIALS["b"])}  # 3 steps, 12 steps
    server = serve(configs, ctx)
    results = [server.next_result("good"), server.next_result("good")]  # "gone" never asks for its result
    assert "trial gone did not take its result or ask for its next epoch in 1 s; its slot is free" \
        in capsys.readouterr().out
    assert "not in this pack (dropped after 1 s" in server.next_result("gone")["error"]
    with server.cond:
        assert list(server.trials) == ["good"] and "gone" not in server.pack.slots
    server.leave("good")
    assert not server.trials and not server.pack.slots
    assert [r["metrics"]["epoch"] for r in results] == [1, 2] and results[1]["last"]
    monkeypatch.undo()
    assert_result_as_solo(results[1], ctx, configs["good"])


def test_a_pack_without_trials_frees_its_base_and_loads_it_for_the_next(tiny_models, monkeypatch, capsys):
    """Once no trial has been in a pack for IDLE_RELEASE_S, its base (and on a GPU its memory) is freed, its
    training thread ends, and a trial joining later gets the base loaded again and trains its solo run."""
    import time

    from tune_app.train.pack import PackServer

    monkeypatch.setattr(PackServer, "IDLE_RELEASE_S", 0.5)
    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=1, n_train=48, n_val=16, vocab=1000)
    configs = {"first": make_config(**TRIALS["c"]), "later": make_config(**TRIALS["b"])}
    server = serve({"first": configs["first"]}, ctx)
    first = server.next_result("first")
    server.leave("first")
    assert server.pack is not None  # kept while a next trial may come soon
    deadline = time.monotonic() + 30
    while server.pack is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    with server.cond:  # the training thread frees the base and ends under the lock
        assert server.pack is None and server.thread is None
    assert "pack test-pack: no trial for 0 s, so its base is freed" in capsys.readouterr().out
    server.join("later", configs["later"])
    later = server.next_result("later")
    server.leave("later")
    assert later["metrics"]["model_load_s"] > 0 and not later["metrics"]["base_reused"]
    assert not later["metrics"]["joined_running_pack"]
    for name, result in (("first", first), ("later", later)):
        assert result["last"] and result["metrics"]["epoch"] == 1
        assert_result_as_solo(result, ctx, configs[name])


def test_a_trial_leaving_midway_changes_nothing_for_the_others(tiny_models):
    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=3, n_train=40, n_val=16, vocab=1000)
    configs = {name: make_config(**params) for name, params in TRIALS.items() if name != "c"}
    packed = run_pack(configs, ctx, stop_after={"b": 1})
    assert len(packed["b"]) == 1 and len(packed["a"]) == 3
    solo = solo_runs({"a": configs["a"]}, ctx)
    assert_same_training(solo["a"], packed["a"])


def test_trials_join_a_running_pack_and_leave_it_empty(tiny_models):
    """A trial that joins later starts as its solo run does (its init from the post-load random state), whatever the
    pack trained before; the last one to leave hands the base back as it was loaded, ready for the next."""
    from tune_app.train.model import trial_base

    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=1, n_train=24, n_val=8, vocab=1000)
    data = ctx.data_refs["toy"]
    torch.manual_seed(ctx.seed)
    base = trial_base(ctx.models["m"], ctx.label_names, precision="fp32")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    pack = Pack(base, train=data.train, epochs=1, class_weights=None, num_labels=2)
    params = {k: v for k, v in make_config(**TRIALS["a"]).items() if k != "model"}
    first = pack.join("first", params, 0)
    initial = {n.replace(".first.", "."): p.detach().clone() for n, p in pack.model.named_parameters()
               if ".first." in n}
    first.start_epoch(data.train, 0)
    pack.step()
    assert any(not torch.equal(p, initial[n.replace(".first.", ".")]) for n, p in pack.model.named_parameters()
               if ".first." in n)  # the first trial trained a step
    pack.join("late", params, 0)
    # Same hyperparameters, same seed: the late trial starts where the first one started, not where it is now.
    late = {n.replace(".late.", "."): p for n, p in pack.model.named_parameters() if ".late." in n}
    assert late.keys() == initial.keys()
    assert all(torch.equal(late[n], p) for n, p in initial.items())
    pack.leave("first")
    pack.leave("late")
    assert pack.model is None
    after = base.model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in base.model.parameters())


def test_a_trial_with_its_own_seed_trains_its_own_run_in_the_pack(tiny_models):
    """Confirmation trials carry their own seed: in a pack beside the pack's seed, the one with the pack's seed
    trains exactly its solo run, the other another run (its adapter, dropout and data order drawn from its seed),
    and each checkpoint records its seed and its validation predictions."""
    import json

    import numpy as np

    from tune_app.spec.rundir import VAL_PREDICTIONS

    ctx = make_context(tiny_models("bert", **DROPOUT), epochs=2, n_train=40, n_val=16, vocab=1000)
    same = make_config(**TRIALS["a"])
    configs = {"own": same, "other": {**same, "seed": ctx.seed + 1}}
    seen = {}

    def report(name, metrics, directory):
        seen[name] = (json.loads(open(os.path.join(directory, "metrics.json")).read()),
                      np.load(os.path.join(directory, VAL_PREDICTIONS)), sorted(os.listdir(directory)))

    packed = run_pack(configs, ctx)
    assert_same_training(solo_runs({"own": same}, ctx)["own"], packed["own"])
    assert packed["other"][-1][0]["train_loss"] != pytest.approx(packed["own"][-1][0]["train_loss"], rel=1e-6)
    memory.clear()
    fit_pack(configs, ctx, report=report, threads=1, device="cpu")
    assert seen["own"][0]["seed"] == ctx.seed and seen["other"][0]["seed"] == ctx.seed + 1
    for metrics, predictions, _ in seen.values():  # the predictions the epoch's metrics were computed from
        labels = ctx.data_refs["toy"].val.labels
        assert predictions.shape == (16,) and metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))


def gpu(test):
    """The `gpu` marker (tests/conftest.py skips it without a CUDA device), with this file's own reason."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="packed CUDA graphs need a GPU")(
        test))


@gpu
def test_a_pack_replaying_cuda_graphs_trains_what_it_trains_eagerly(tiny_models):
    """On a GPU, in fp32 and with nothing dropped out (so neither run draws): a pack whose step replays CUDA graphs
    (captured per set of trials, rows and padding bucket once such a step recurs) trains what the same pack trains
    eagerly, trial by trial, b leaving after its first epoch (its graphs go with it: they hold its parameters)."""
    import dataclasses

    checkpoint = tiny_models("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ctx = make_context(checkpoint, epochs=2, n_train=48, n_val=16, vocab=1000)
    configs = {name: make_config(**{**params, "lora_dropout": 0.0}) for name, params in TRIALS.items()}
    eager = run_pack(configs, ctx, stop_after={"b": 1}, device="cuda")
    graphed = run_pack(configs, dataclasses.replace(ctx, cuda_graphs=True), stop_after={"b": 1}, device="cuda")
    for name in configs:
        assert_same_training(eager[name], graphed[name], rtol=1e-4)  # padded to buckets: other matmul shapes
        assert all(metrics["cuda_graphs"] == 0 for metrics, _, _ in eager[name])
    assert max(metrics["cuda_graphs"] for runs in graphed.values() for metrics, _, _ in runs) > 0


@gpu
def test_each_trial_in_a_graphed_pack_draws_from_its_own_stream(tiny_models):
    """Dropout on, CUDA graphs replayed: two trials of one configuration and seed draw the same masks from streams of
    their own (each replay advances each), so they train alike; a third, of another seed, trains otherwise."""
    import dataclasses

    ctx = dataclasses.replace(make_context(tiny_models("bert", **DROPOUT), epochs=2, n_train=48, n_val=16,
                                           vocab=1000), cuda_graphs=True)
    twin = make_config(**TRIALS["a"])
    packed = run_pack({"one": twin, "two": twin, "other": {**twin, "seed": ctx.seed + 1}}, ctx, device="cuda")
    assert max(metrics["cuda_graphs"] for metrics, _, _ in packed["one"]) > 0
    assert_same_training(packed["one"], packed["two"], rtol=1e-6)
    assert packed["other"][-1][0]["train_loss"] != pytest.approx(packed["one"][-1][0]["train_loss"], rel=1e-6)


def test_trials_that_train_the_base_biases_are_not_packed():
    assert packable({"lora_bias": "none"}) and not packable({"lora_bias": "all"})
    assert not packable({"lora_bias": "lora_only"})


# --------------------------------------------------------------------------------------------- in a Ray study


def packed_study_raw(checkpoint: str, source, output_dir, pack) -> dict:
    return {
        "name": "pk",
        "data": {"source": str(source), "text": "text", "label": "target", "limit": 160, "max_length": 32},
        "models": {"m": {"checkpoint": checkpoint, "cpu": 1}},
        "space": {"lora_rank": {"choice": [2, 4]}, "learning_rate": {"loguniform": [1.0e-4, 5.0e-2]},
                  "lora_dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 16},
        "tune": {"num_samples": 4, "seed": 0, "max_concurrent": 2, "pack": pack, "metric": "eval_loss", "mode": "min",
                 "n_startup_trials": 4,  # seeded random proposals: TPE's would follow the results' order
                 "asha": {"grace_period": 1, "reduction_factor": 2}},
        "output_dir": str(output_dir), "wandb": {"mode": "disabled"},
    }


def asha_stops(run_dir) -> set[str]:
    """The trials ASHA's rule stops at model m's first rung, replayed in the order the rung recorded them (Ray's
    _Bracket.on_result: a result below the rf-percentile of the results recorded before it stops its trial)."""
    import pickle

    import numpy as np

    from tune_app.spec.rundir import SCHEDULER_STATE

    bracket = pickle.loads((run_dir / SCHEDULER_STATE).read_bytes())["m"]._brackets[0]
    (milestone, recorded), = [(m, r) for m, r in bracket._rungs if m == 1]
    stopped, before = set(), []
    for trial_id, value in recorded.items():  # insertion order: the order results arrived in
        if before and value < np.nanpercentile(before, (1 - 1 / bracket.rf) * 100):
            stopped.add(trial_id)
        before.append(value)
    return stopped


@pytest.mark.parametrize("local", [True, False])
def test_a_pack_registry_is_started_only_where_nodes_may_join(ray_session, tiny_models, monkeypatch, local):
    """A Ray the driver started on its own machine (tune-app run without an address) gains no nodes: its packs are
    started up front and no registry waits for late nodes. Elsewhere (a cluster, a caller's Ray) the registry
    runs beside the packs."""
    import ray

    from tune_app.study import cluster, packing

    monkeypatch.setattr(cluster._connection, "local", local)
    ctx = make_context(tiny_models("bert"), epochs=1)
    handles = packing.start(ctx, {"m": packing.PackPlan(2, on_gpu=False)}, {"m": {"cpu": 1.0, "gpu": 0.0}})
    try:
        names = set(ray.util.list_named_actors())
        assert any(name.startswith(ctx.packs["m"]) and name.endswith("-cpu") for name in names)  # the node's pack
        assert (ctx.pack_registry is None) == local
        assert (ctx.pack_registry in names) == (not local)
    finally:
        for handle in handles:
            ray.kill(handle)


PACK_PROCESS_IMPORTS = """
import json, sys
# What a pack's process loads before it can start: the classes of its actor (and the registry's) and of what it is
# given (the trial context, the progress board's handle inside it).
import tune_app.study.board, tune_app.study.packing, tune_app.train.pack, tune_app.train.trainable
heavy = ("ray.tune", "pandas", "torch", "transformers", "peft", "optuna")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_a_pack_process_loads_no_library_before_it_starts():
    """A pack's process starts its warm-up as soon as Ray hands it its arguments: unpickling them imports neither
    Ray Tune (seconds of a core: it imports pandas) nor torch (the warm-up's, in a thread of its own)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PACK_PROCESS_IMPORTS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("pack,cores,line", [
    ("off", 2, "packing: none (tune.pack off): each trial trains in its own process"),
    ("auto", 2, "packing: none (tune.pack auto, which packs only trials that share a GPU: none do here): each "
                "trial trains in its own process"),
    (2, 1, "packing: none (tune.pack 2: no GPU or node here holds two trials of a model): each trial trains in its "
           "own process"),
    (2, 2, "packing: m: up to 2 trials per node in one process over one base"),
])
def test_the_study_says_how_its_trials_are_packed_and_why_not(tiny_models, tweets_csv, tmp_path, pack, cores, line):
    """The study's packing line, on CPU nodes of `cores` cores for trials of 1 core: where nothing packs, it says
    why (auto packs only where trials share a GPU; N needs a device that holds two trials)."""
    from types import SimpleNamespace

    import yaml

    from tune_app.spec import config as config_mod
    from tune_app.study import packing, runner

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(packed_study_raw(tiny_models("bert"), tweets_csv, tmp_path / "runs", pack)))
    cfg = config_mod.load(path)
    plans = packing.plan(cfg, {"m": {"cpu": 1.0, "gpu": 0.0}}, cpus_per_node=cores)
    assert runner._packing_line(cfg, SimpleNamespace(packs=plans)) == line


@pytest.mark.slow
def test_a_packed_study_trains_what_the_same_study_trains_unpacked(ray_session, tiny_models, tweets_csv, tmp_path,
                                                                    capsys):
    """tune.pack: 2 on this 2-core machine: both running trials of the model train in one pack actor, each still an
    ordinary Tune trial (TPE proposes it, ASHA stops it, it reports per epoch with its own checkpoint), and every
    configuration trains the epochs it trains unpacked to the same metrics."""
    import json

    import yaml

    from tune_app.cli import main
    from tune_app.spec.rundir import SUMMARY

    checkpoint = tiny_models("bert", **DROPOUT)
    runs = {}
    for pack in ("off", 2):
        root = tmp_path / str(pack)
        root.mkdir()
        (root / "study.yaml").write_text(yaml.safe_dump(packed_study_raw(checkpoint, tweets_csv, root / "runs", pack)))
        assert main(["run", str(root / "study.yaml")]) == 0
        out = capsys.readouterr().out
        (run_dir,) = (root / "runs").iterdir()
        epochs = {}  # (rank, learning rate, epoch) -> that epoch's result
        for path in run_dir.glob("m_*/result.json"):
            for line in path.read_text().splitlines():
                result = json.loads(line)
                epochs[(result["config"]["lora_rank"], result["config"]["learning_rate"], result["epoch"])] = result
        runs[pack] = (out, epochs, json.loads((run_dir / SUMMARY).read_text()), run_dir)
    out, epochs, summary, run_dir = runs[2]
    assert "packing: m: up to 2 trials per node in one process over one base" in out
    assert "packing: none (tune.pack off)" in runs["off"][0]
    assert max(r["packed_trials"] for r in epochs.values()) == 2  # two trials trained in one pack at once
    assert summary["models"]["m"]["trials"] == 4 and summary["models"]["m"]["failed"] == 0
    # ASHA decides for packed trials as for any: its rule, replayed on the order their first epochs reached the
    # rung, gives exactly the trials that stopped there (which ones depends on that order, not on packing).
    assert asha_stops(run_dir) == {r["trial_id"] for r in csv.DictReader(open(run_dir / "trials.csv"))
                                   if r["status"] == "STOPPED_EARLY"}
    assert summary["best"] is not None
    # The same proposals (TPE seeded); every epoch both runs trained ended with the same metrics (which trials ASHA
    # stops depends on the order results arrive in, so a trial may reach its second epoch in one run only).
    unpacked = runs["off"][1]
    assert {k[:2] for k in epochs} == {k[:2] for k in unpacked}
    shared = epochs.keys() & unpacked.keys()
    assert len(shared) >= 4
    for key in shared:
        for metric in ("train_loss", "eval_loss", "f1", "accuracy"):
            assert epochs[key][metric] == pytest.approx(unpacked[key][metric], rel=1e-5, abs=1e-6), (key, metric)
