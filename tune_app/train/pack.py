"""Adapter packing: trials of one model train in one process over one copy of the frozen base.

    pack = Pack(base, ...);  pack.join(name, params)  ...  pack.advance(slots)  ...  pack.leave(name)

Each packed step takes the next micro-batch of every trial in the pack, concatenates their rows, and runs the base's
layers once over all of them (one large matmul per layer instead of one small one per trial); on a CPU, where a
large matmul gains nothing, the trials step in one such group per core, each in a thread of its own and at its own
pace, and a trial's epoch-end evaluation runs beside the others' steps (`Pack.advance`). Each trial's rows see only
that trial's LoRA layers, head, loss weights and dropout; each trial then steps its own optimizer, schedule, loss
scale (fp16) and gradient clipping at its own effective batch size, over its own data order. On a GPU the packed
step replays CUDA graphs (`train.cuda_graphs.StepGraphs`, keyed by its trials, their rows and the padding bucket),
each trial's CUDA stream a generator state of its own that every replay advances.

Exact: a packed trial trains what it trains alone with the same seed (tests/test_pack.py). Its rows are padded for
the base to the pack's widest micro-batch, but every random draw of its rows (LoRA dropout, the base's hidden and
attention dropout) comes from its own random stream, in the order and shapes its solo run draws them (its own
widths; under CUDA graphs its rows take the forward's padding bucket, so on a GPU its draws have that shape), and
its attention sees only its own keys. Rows never interact in a transformer, so the shared base's
gradients reach each trial's parameters from its own rows alone.

The trials are PEFT adapters of one PeftModel (one named adapter per trial, each with its own LoraConfig: rank,
alpha, rsLoRA, dropout, targets, and its own copy of the classification head), so each trial's checkpoint is the
adapter a solo trial saves, and export/predict read it unchanged. Trials that train base biases (lora_bias other
than none) cannot share a base and are not packed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tune_app.spec.families import modules_to_save
from tune_app.spec.space import resolve_alpha
from tune_app.train import checkpoint
from tune_app.train.batching import bucket_widths, collate, length_grouped_batches
from tune_app.train.cuda_graphs import CaptureFailed, StepGraphs
from tune_app.train.evaluation import eval_batch_size
from tune_app.train.heartbeat import Heartbeat
from tune_app.train.memory import is_oom, oom_test_limit, peak_memory_mb, random_state, set_random_state
from tune_app.train.step import clip_and_step, loss_scaler, share_of_loss, step_mode
from tune_app.train.tokens import TokenizedSplit, fetch

ATTENTION = "tune_app_packed"
"""The attention implementation of a packed base whose attention drops out probabilities: per trial, each with its
own random stream and keys (registered with transformers' AttentionInterface)."""


GRAPH_MIN_USES = 3
"""A packed step's key (its trials, their rows, its bucket) is captured as a CUDA graph at its third use: one seen
less often (its set of trials changes as trials pause between epochs, join and leave) trains eagerly."""


def packable(params: dict[str, Any]) -> bool:
    """Whether a trial can share its base: not when it trains the base's biases (lora_bias all or lora_only)."""
    return params.get("lora_bias", "none") == "none"


# --------------------------------------------------------------------------------------------- who owns which rows


@dataclass
class _Rows:
    """One trial's rows in the packed batch: `start:stop`, the width its solo run pads them to, and whether they
    train (dropout on) or are evaluated. A packed model stays in training mode: its rows, not the modules' mode,
    say what drops out, so one trial can be evaluated while others train."""

    slot: Slot
    start: int
    stop: int
    width: int
    training: bool = True


@dataclass
class _Work:
    """A step of some trials, or one trial's evaluation, under way in a CPU pack's thread (`Pack.advance`)."""

    slots: list[Slot]
    cores: int
    evaluation: bool = False


def _run_now(task: Callable[[Slot, int], Any], slot: Slot, cores: int):
    """The task run here and now, its outcome (value or exception) as a finished future, as a thread's would be."""
    from concurrent.futures import Future

    future: Future = Future()
    try:
        future.set_result(task(slot, cores))
    except Exception as error:  # noqa: BLE001 - the caller takes it from the future, as from a thread's
        future.set_exception(error)
    return future


_process_random = threading.Lock()
"""Held while a trial's streams are the process's (`Slot.random`)."""


class _Layout(threading.local):
    rows: list[_Rows] | None = None
    """While a packed forward runs: whose rows are where (None outside a packed forward)."""


_layout = _Layout()


@contextlib.contextmanager
def _rows_of(layout: list[_Rows]):
    _layout.rows = layout
    try:
        yield
    finally:
        _layout.rows = None


# --------------------------------------------------------------------------------------------- one trial


@dataclass
class Slot:
    """One trial in a pack: its adapter's name, hyperparameters, optimizer and schedule, data order and progress."""

    name: str
    params: dict[str, Any]
    seed: int
    random_state: Any
    """The trial's own random streams (CPU and CUDA, `memory.random_state`) where it joined: its dropout draws, as in
    its solo run. From there on its CPU stream is `generator`, its CUDA stream `cuda_generator`."""
    trainable: list = field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    """Its own loss scaler under fp16 (`train.step.loss_scaler`): its loss is scaled by its own scale in the packed
    backward, and an overflow in its gradients skips its step alone."""
    epoch: int = 0
    predictions: np.ndarray | None = None
    """Its last evaluation's predicted class of every validation row (for its checkpoint)."""
    batches: list[np.ndarray] = field(default_factory=list)
    batch_index: int = 0
    micro_start: int = 0
    micro_batch: int = 0
    """Rows of its micro-batches: its batch size (0 given: set so), halved by each out-of-memory error of its own
    (`halve`), its effective batch unchanged (gradient accumulation, as a solo trial's step does)."""
    step_loss: Any = None
    loss_sum: Any = None
    tried_work: int = 0
    """The work (`next_work`) of its part of the packed forward tried last."""
    generator: Any = None
    """Its CPU stream, a torch.Generator of its own: its CPU draws need not touch the process's (`dropout`)."""
    cuda_generator: Any = None
    """In a GPU pack, its CUDA stream: a generator state of its own (`Generator.clone_state`), swapped into the
    device's generator for its draws in a way CUDA graphs can capture (`graphsafe_set_state`); None on a CPU."""
    batch_random: Any = None
    """Its streams where its current effective batch began (`restart_batch`)."""
    fixed_grads: bool = False
    """Its gradients live in fixed tensors (the pack captures CUDA graphs): zeroed in place, never set to None."""
    steps: int = 0
    """Packed micro-steps it has taken since it joined."""
    epoch_ended: float = 0.0
    """When (time.perf_counter) its current epoch's last step ended."""
    evaluation: Any = None
    """Once its epoch is done: its evaluation's outcome, a finished future (`Pack.advance`); None before, and again
    once its caller took it."""

    def __post_init__(self) -> None:
        import torch

        self.micro_batch = self.micro_batch or self.batch_size
        self.generator = torch.Generator()
        self.generator.set_state(self.random_state[0])

    @property
    def batch_size(self) -> int:
        return int(self.params["batch_size"])

    @contextlib.contextmanager
    def random(self):
        """Run with this trial's random streams as the process's (swapped in, and their advance kept). One trial at a
        time: the trials of a CPU pack step in parallel threads (`Pack.advance`)."""
        import torch

        with _process_random:
            saved = torch.get_rng_state()
            torch.set_rng_state(self.generator.get_state())
            if self.cuda_generator is not None:
                device = _device_generator(self.cuda_generator.device)
                saved_cuda = device.graphsafe_get_state()
                device.graphsafe_set_state(self.cuda_generator)
            try:
                yield
            finally:
                self.generator.set_state(torch.get_rng_state())
                torch.set_rng_state(saved)
                if self.cuda_generator is not None:
                    device.graphsafe_set_state(saved_cuda)

    def dropout(self, x, p: float):
        """torch.nn.functional.dropout in training, drawn from this trial's streams: the mask its solo run draws.
        On a CPU from its own generator (what dropout does there: a Bernoulli draw of x's shape, scaled by 1/(1-p)),
        so the threads of a CPU pack need not take turns; on a GPU, whose dropout is one fused kernel of its own,
        with its streams swapped in."""
        import torch

        if p == 0 or x.numel() == 0:
            return x
        if x.device.type != "cpu":
            with self.random():
                return torch.nn.functional.dropout(x, p, True)
        if p >= 1:
            return x * torch.zeros((), dtype=x.dtype)
        noise = torch.empty_like(x).bernoulli_(1 - p, generator=self.generator)
        return x * noise.div_(1 - p)

    def start_epoch(self, train: TokenizedSplit, epoch: int, device=None) -> None:
        """The epoch's batches, drawn as the solo trial draws them (seed and epoch), and a fresh loss sum."""
        import torch

        self.epoch, self.batch_index, self.micro_start = epoch, 0, 0
        self.batches = length_grouped_batches(train.lengths, self.batch_size, np.random.default_rng([self.seed, epoch]))
        self.loss_sum = torch.zeros((), device=device)

    def restart_batch(self) -> None:
        """Take the current effective batch again from its first micro-batch (after a packed step raised), with the
        random streams it started with: what a try that failed drew is drawn again, so a trial trains the same
        whichever forwards of its pack ran out of memory."""
        self.optimizer.zero_grad(set_to_none=not self.fixed_grads)
        self.step_loss, self.micro_start = None, 0
        if self.batch_random is not None:
            cpu, cuda = self.batch_random
            self.generator.set_state(cpu)
            if cuda is not None:
                self.cuda_generator.set_state(cuda)

    @property
    def epoch_done(self) -> bool:
        return self.batch_index >= len(self.batches)

    def halve(self) -> bool:
        """After an out-of-memory error of this trial's own: the current effective batch again, in micro-batches of
        half the rows; False when they are single rows already."""
        if self.micro_batch <= 1:
            return False
        self.micro_batch = max(1, self.micro_batch // 2)
        self.restart_batch()
        print(f"[tune_app] {self.name}: out of memory in its pack: micro-batch -> {self.micro_batch}, gradient "
              f"accumulation -> {-(-self.batch_size // self.micro_batch)} (effective batch {self.batch_size} "
              f"unchanged)", flush=True)
        return True

    def next_work(self, train: TokenizedSplit) -> int:
        """Rows x padded width of its next micro-batch: what its share of a packed step costs, roughly."""
        rows = self.batches[self.batch_index][self.micro_start:self.micro_start + self.micro_batch]
        return len(rows) * int(train.lengths[rows].max())

    def next_part(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """The next micro-batch's rows, its effective batch's rows, and whether it ends that batch."""
        rows = self.batches[self.batch_index]
        if self.micro_start == 0:
            self.batch_random = (self.generator.get_state(),
                                 None if self.cuda_generator is None else self.cuda_generator.get_state())
        part = rows[self.micro_start:self.micro_start + self.micro_batch]
        self.micro_start += len(part)
        return part, rows, self.micro_start >= len(rows)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the trial's training, as a solo trial's step keeps it."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro_batch = min(int(state.get("micro_batch") or self.batch_size), self.batch_size)

    def optimizer_step(self) -> None:
        """Clip, step, schedule, clear: what the solo step does after its batch's last micro-batch (gradients zeroed
        in place while the pack has CUDA graphs: they accumulate into fixed tensors)."""
        clip_and_step(self.trainable, self.optimizer, self.scheduler, self.scaler, float(self.params["max_grad_norm"]))
        self.optimizer.zero_grad(set_to_none=not self.fixed_grads)
        self.loss_sum += self.step_loss
        self.step_loss = None
        self.batch_index += 1
        self.micro_start = 0


# --------------------------------------------------------------------------------------------- the pack


class Pack:
    """One frozen base and the trials that train on it (see the module docstring)."""

    def __init__(self, base, *, train: TokenizedSplit, epochs: int, class_weights: np.ndarray | None,
                 num_labels: int, target_modules: tuple[str, ...] | None = None, autocast=contextlib.nullcontext,
                 precision: str = "fp32", seed: int = 0, threads: int = 1, widths: tuple[int, ...] | None = None,
                 cuda_graphs: bool = False):
        import torch

        self.base = base
        """The loaded base (train.model.Base) on its device: model, family, pad_id, loading info."""
        self.device = next(base.model.parameters()).device
        self.train, self.epochs, self.autocast, self.precision = train, epochs, autocast, precision
        self.row_weights = class_weights if class_weights is not None else np.ones(num_labels, np.float32)
        self.loss_weight = torch.tensor(self.row_weights, device=self.device)
        self.target_modules = target_modules
        self.model = None
        """The PeftModel holding every trial's adapter (None while the pack is empty)."""
        self.prepare_mask: Callable | None = None
        """What a packed forward gets as its attention mask (train.model.mask_preparer, made with the model)."""
        self.slots: dict[str, Slot] = {}
        self.seed = seed
        """The seed the base was loaded with (torch.manual_seed right before the load)."""
        self.random_state = random_state()
        """The random state right after the base's load: where each trial's own stream starts, as in its solo run."""
        self._attention_dropout = _attention_dropout(base.model.config)
        self.test_limit = oom_test_limit()
        """memory.OOM_TEST_ENV: a packed forward of more rows raises a test OOM (0: off)."""
        self.threads = threads if self.device.type == "cpu" else 1
        """The CPU cores a pack on a CPU trains with: up to that many groups of its trials step at once (`advance`)."""
        self._workers = None
        self._work: dict[Any, _Work] = {}
        """A CPU pack's steps and evaluations under way (`advance`), by their futures."""
        self.work_limit: int | None = None
        """Rows x tokens one packed forward may take, set by an out-of-memory error (`advance`); None: no limit."""
        self.graphs = StepGraphs(self._forward_backward, [], min_uses=GRAPH_MIN_USES) \
            if cuda_graphs and self.device.type == "cuda" else None
        """The packed step's CUDA graphs (train.cuda_graphs), keyed by its trials, their rows and the padding
        bucket; None: eager."""
        self.widths = widths if self.graphs is not None else None
        """The padding buckets (train.batching.bucket_widths) under graphs: few shapes to capture."""

    def free_cached_memory(self) -> None:
        """After an out-of-memory error: give the allocator's cached blocks back before the next try."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------- joining and leaving

    def join(self, name: str, params: dict[str, Any], seed: int) -> Slot:
        """Add a trial: its LoRA adapter and head copy, initialised from the post-load random state as its solo run
        initialises them, its optimizer and schedule, and its own random stream from there on. A trial with another
        seed than the pack's (a confirmation trial) draws its adapter and stream from its own seed; its head starts
        as the pack's base loaded it, where its solo run would draw the head from its seed too."""
        import torch
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import get_scheduler

        from tune_app.train.model import mask_preparer
        from tune_app.train.precision import train_in_fp32

        self.settle()
        if not packable(params):
            raise ValueError(f"trial {name}: lora_bias={params['lora_bias']} trains the base's biases; it cannot "
                             f"share a base and trains alone")
        family = self.base.family
        targets: Any = list(self.target_modules) if self.target_modules else family.target_modules(
            params["target_modules"])
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=int(params["lora_rank"]), lora_alpha=resolve_alpha(params),
            lora_dropout=float(params["lora_dropout"]), bias="none", use_rslora=bool(params["use_rslora"]),
            target_modules=targets, fan_in_fan_out=bool(family and family.fan_in_fan_out),
            modules_to_save=modules_to_save(family, self.base.loading))
        if seed == self.seed:
            set_random_state(self.random_state)
        else:
            torch.manual_seed(seed)
        if self.model is None:
            self.model = get_peft_model(self.base.model, lora, adapter_name=name)
            self.prepare_mask = mask_preparer(self.model, self.base.family, self.precision)
        else:
            self.model.add_adapter(name, lora)
        _install(self.model, self._attention_dropout)  # the layers this adapter added too
        self.model.train()  # for good: each forward's layout says whether its rows train (`_Rows.training`)
        slot = Slot(name, params, seed, random_state(), fixed_grads=self.graphs is not None)
        if self.device.type == "cuda":
            slot.cuda_generator = _device_generator(self.device).clone_state()
        self.slots[name] = slot
        self._mark_trainable()
        train_in_fp32(self.model, family)  # this trial's adapter and head in fp32, as a solo trial's
        slot.trainable = [p for n, p in self.model.named_parameters() if _owned_by(n, name)]
        total_steps = int(np.ceil(len(self.train) / slot.batch_size)) * self.epochs
        slot.optimizer = torch.optim.AdamW(slot.trainable, lr=float(params["learning_rate"]),
                                           weight_decay=float(params["weight_decay"]), fused=self.device.type == "cuda")
        slot.scheduler = get_scheduler(params["lr_scheduler"], slot.optimizer,
                                       num_warmup_steps=int(float(params["warmup_ratio"]) * total_steps),
                                       num_training_steps=total_steps)
        slot.scaler = loss_scaler(self.device, self.precision)
        return slot

    def leave(self, name: str) -> None:
        """Remove a trial (finished, stopped or failed): its adapter and head copy go, the others train on."""
        from tune_app.train.memory import strip_adapter

        self.settle()
        self.slots.pop(name)
        if self.graphs is not None:  # those holding its parameters and stream
            self.graphs.forget(lambda trials: any(trial == name for trial, _ in trials))
        if self.slots:
            with warnings.catch_warnings():  # "Adapter x was active which is now deleted": none is active here
                warnings.simplefilter("ignore", UserWarning)
                self.model.delete_adapter(name)
            self._mark_trainable()
        else:  # the last one: the base as loaded again, for the next trial to join
            strip_adapter(self.base.model)
            _uninstall(self.base.model)
            self.model = None

    def sizes(self, name: str) -> dict[str, int]:
        """A trial's trainable parameters, and the parameters of its model as a solo run counts them (the base and
        its own adapter and head copy)."""
        own = sum(p.numel() for p in self.slots[name].trainable)
        base = sum(p.numel() for n, p in self.model.named_parameters()
                   if not any(_owned_by(n, other) for other in self.slots))
        return {"trainable_params": own, "total_params": base + own}

    def _mark_trainable(self) -> None:
        """Every trial's adapter and head copy trains, nothing else (PEFT marks only its active adapter)."""
        for n, p in self.model.named_parameters():
            p.requires_grad_(any(_owned_by(n, name) for name in self.slots))

    # ----------------------------------------------------------------------------------------- training

    def advance(self, slots: list[Slot], evaluate: Callable[[Slot, int], Any] | None = None,
                waiting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, str]:
        """Train these trials on: step those with work left in their epoch and, with `evaluate`, evaluate those
        whose epoch is done (`evaluate(slot, cores)`, on that many CPU cores: `Pack.evaluate` takes them; its
        outcome then in `slot.evaluation`, a finished future).
        Returns the trials that failed on their own (name -> traceback): the others train on. On a CPU of several
        cores, `advance` waits for its threads' work inside `waiting()` (a pack server releases its lock there, so
        trials' calls go on meanwhile; what changes the model waits for the work, `settle`).

        On a GPU (or one CPU core) this is the evaluations, then one packed micro-step of every trial to step, in
        one packed forward.

        On a CPU of T cores the trials step in up to T groups, each a packed forward of its own in a thread of its
        own on its share of the cores, and no group waits for another: a trial of batch 8 steps on while one of
        batch 32 takes its longer step, as each would in a process of its own (a step for all, in lockstep, would
        hold every trial to the slowest one's pace). A trial's evaluation, too, runs in a thread of its own while
        the others step, as in a process of its own. `advance` starts the evaluations due and a step for every
        group it can form of the trials with nothing under way, on the cores that are free, and returns once some
        of that work has ended (a trial is `in_flight` until then). A CPU core runs a small matmul near its peak
        already, so one large matmul gains little there, while T threads of one process running ops of one thread
        each use T cores about as fully as T processes would. The base and the libraries stay one copy. What
        changes the model (a join, a leave, a load) first waits for the work under way (`settle`).

        A packed forward that raises is taken again trial by trial (`step_each`). One that runs out of memory with
        several trials in it also lowers `work_limit`: from then on the trials step in as many forwards as keep
        each under it (`_groups`), so a pack too full for its device packs fewer trials per forward instead of
        failing every step."""
        slots = [s for s in slots if s.name in self.slots]
        due = [s for s in slots if evaluate and s.epoch_done and s.evaluation is None and not self.in_flight(s)]
        to_step = [s for s in slots if not s.epoch_done]
        if self.threads == 1:
            for slot in due:
                slot.evaluation = _run_now(evaluate, slot, 1)
            failed = {}
            for group in self._groups(to_step, 1):
                failed.update(self._after_step(group, self._try_step(group, 1)))
            return failed
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        if self._workers is None:
            self._workers = ThreadPoolExecutor(self.threads, thread_name_prefix="tune_app-pack-step")
        idle = [s for s in to_step if not self.in_flight(s)]
        free = self.threads - sum(work.cores for work in self._work.values())
        for slot in due[:max(free, 0)]:  # first: its trial's result waits for it
            cores = free if len(due) == 1 and not idle and not self._work else 1
            self._work[self._workers.submit(evaluate, slot, cores)] = _Work([slot], cores, evaluation=True)
            free -= cores
        if idle and free > 0:
            groups = self._groups(idle, free)
            cores = max(1, free // len(groups))
            for group in groups:
                self._work[self._workers.submit(self._try_step, group, cores)] = _Work(group, cores)
        if not self._work:
            return {}
        with waiting():
            done, _ = wait(list(self._work), return_when=FIRST_COMPLETED)
        failed = {}
        for future in done:
            work = self._work.pop(future)
            if work.evaluation:
                work.slots[0].evaluation = future
            else:
                failed.update(self._after_step(work.slots, future.result()))
        return failed

    def in_flight(self, slot: Slot) -> bool:
        """Whether the trial has a step or an evaluation under way (`advance`, on a CPU of several cores)."""
        return any(s is slot for work in self._work.values() for s in work.slots)

    @property
    def busy(self) -> bool:
        """Whether any work is under way, or ended with its outcome not yet taken by `advance`."""
        return bool(self._work)

    def settle(self) -> None:
        """Wait for the work under way: what changes the model (joins, leaves, loads) comes after it. Its outcomes
        stay for `advance` to take."""
        if self._work:
            from concurrent.futures import wait

            wait(list(self._work))

    def _after_step(self, group: list[Slot], error: BaseException | None) -> dict[str, str]:
        """A step's outcome: nothing when it went well; otherwise its trials (those still in the pack) each step
        alone (`step_each`), after an out-of-memory error with fewer trials per forward from then on."""
        if error is None:
            return {}
        group = [s for s in group if s.name in self.slots]
        if is_oom(error):
            self.drop_graphs()  # their memory
            if len(group) > 1:
                self._lower_work_limit(group)
        return self.step_each(group)

    def _intra_op_threads(self, n: int) -> None:
        """On a CPU, torch's intra-op threads for the ops the calling thread runs (OpenMP's count is that thread's
        own); a GPU pack leaves them as set."""
        import torch

        if self.device.type == "cpu" and torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def close(self) -> None:
        """End the step threads (a CPU pack's), once their steps are done; the pack can still train, and starts
        them again."""
        self.settle()
        if self._workers is not None:
            self._workers.shutdown()
            self._workers = None

    def _groups(self, slots: list[Slot], threads: int) -> list[list[Slot]]:
        """The trials in groups of about equal work (rows x padded width of their next micro-batch), each group one
        packed forward: as many groups as `threads` (one on a GPU), and more where `work_limit` asks."""
        work = {s.name: s.next_work(self.train) for s in slots}
        n = min(threads, len(slots))
        if self.work_limit:
            n = max(n, -(-sum(work.values()) // self.work_limit))
        n = min(n, len(slots))
        if n <= 1:
            return [slots] if slots else []
        groups: list[list[Slot]] = [[] for _ in range(n)]
        load = [0] * n
        for slot in sorted(slots, key=lambda s: -work[s.name]):
            i = load.index(min(load))
            groups[i].append(slot)
            load[i] += work[slot.name]
        return groups

    def _lower_work_limit(self, group: list[Slot]) -> None:
        """A packed forward of several trials ran out of memory: later forwards take at most half its work."""
        work = sum(s.tried_work for s in group)
        limit = max(1, work // 2)
        if self.work_limit is None or limit < self.work_limit:
            self.work_limit = limit
            print(f"[tune_app] pack: out of memory with {len(group)} trials in one forward ({work} rows x tokens); "
                  f"its trials now step in forwards of at most {limit}", flush=True)

    def _try_step(self, group: list[Slot], threads: int) -> BaseException | None:
        self._intra_op_threads(threads)
        for slot in group:
            slot.tried_work = slot.next_work(self.train)
        try:
            self.step(group)
        except Exception as error:  # noqa: BLE001 - sorted out trial by trial (step_each)
            return error
        return None

    def step(self, slots: list[Slot] | None = None) -> None:
        """One packed micro-step: the next micro-batch of each given trial (default: every trial with work left in
        its epoch), forward and backward together; a trial whose effective batch is complete steps its optimizer."""
        import torch

        slots = [s for s in (slots or self.slots.values()) if not s.epoch_done]
        if not slots:
            return
        parts = [s.next_part() for s in slots]
        if self.test_limit and (rows := sum(len(part) for part, _, _ in parts)) > self.test_limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {rows} rows in one forward > {self.test_limit})")
        graphs = self.graphs is not None
        batches = [collate(self.train, part, self.base.pad_id, widths=self.widths,
                           num_rows=slot.micro_batch if graphs else None) for slot, (part, _, _) in zip(slots, parts)]
        width = max(ids.shape[1] for ids, _, _ in batches)
        layout, start = [], 0
        for slot, (ids, _, _) in zip(slots, batches):
            # Under graphs a trial's rows take the forward's bucket (its draws that shape): fewer graphs to capture.
            layout.append(_Rows(slot, start, start + len(ids), width if graphs else ids.shape[1]))
            start += len(ids)
        ids = torch.cat([_pad(ids, width, self.base.pad_id) for ids, _, _ in batches])
        mask = torch.cat([_pad(mask, width, 0) for _, mask, _ in batches])
        labels = torch.cat([labels for _, _, labels in batches])
        # Each effective batch's summed class weight, on the host from its labels, as the solo step takes it.
        weights = [float(self.row_weights[self.train.labels[batch]].sum()) for _, batch, _ in parts]
        ids, mask, labels = (t.pin_memory().to(self.device, non_blocking=True) if graphs else t.to(self.device)
                             for t in (ids, mask, labels))
        with _rows_of(layout):
            losses = None
            if graphs:
                try:
                    losses = self.graphs(ids, mask, labels, torch.tensor(weights).pin_memory(),
                                         key=tuple((s.name, r.stop - r.start) for s, r in zip(slots, layout)),
                                         params=[p for s in slots for p in s.trainable],
                                         generators=tuple(s.cuda_generator for s in slots))
                except CaptureFailed as error:
                    self.drop_graphs(str(error))
            if losses is None:
                losses = self._forward_backward(ids, mask, labels, weights)
        for slot, loss, (_, _, last) in zip(slots, losses, parts):
            slot.step_loss = loss if slot.step_loss is None else slot.step_loss + loss
            if last:
                slot.optimizer_step()
                if slot.epoch_done:
                    slot.epoch_ended = time.perf_counter()
            slot.steps += 1

    def _forward_backward(self, ids, mask, labels, weights):
        """The packed forward and backward over the current layout: each trial's share of its effective batch's
        loss (`weights`: its summed class weights, floats or a tensor); returns them, detached, one per trial."""
        import torch

        layout = _layout.rows
        with self.autocast():
            logits = self.model(input_ids=ids, attention_mask=self.prepare_mask(mask)).logits
        losses = torch.stack([share_of_loss(logits[rows.start:rows.stop], labels[rows.start:rows.stop],
                                            self.loss_weight, weights[i]) for i, rows in enumerate(layout)])
        scalers = [rows.slot.scaler for rows in layout]
        if any(scaler is not None for scaler in scalers):  # fp16: each trial's loss times its own scale (rows never
            # mix, so only its gradients carry its scale, and an overflow shows in its gradients alone)
            sum(scaler.scale(loss) if scaler is not None else loss for scaler, loss in zip(scalers, losses)).backward()
        else:
            losses.sum().backward()
        return losses.detach()

    def drop_graphs(self, why: str | None = None) -> None:
        """Free the captured graphs (captured again as their keys recur: after an out-of-memory error); with `why`,
        graphs stay off for the pack, and the log says why."""
        if self.graphs is None:
            return
        self.graphs.reset()
        if why:
            print(f"[tune_app] pack: CUDA graphs off, its trials train eagerly: {why}", flush=True)
            self.graphs, self.widths = None, None
            for slot in self.slots.values():
                slot.fixed_grads = False
            self._fresh_cuda_streams()

    def _fresh_cuda_streams(self) -> None:
        """After a capture that failed: every CUDA stream the pack draws from (each trial's, and the device's own)
        as a new generator state where the old one was, since a capture that never ended leaves its streams marked
        as capturing, and an eager draw from them then raises."""
        import torch

        def fresh(state):
            new = torch.Generator(device=self.device)
            new.set_state(state.get_state())
            return new

        for slot in self.slots.values():
            slot.cuda_generator = fresh(slot.cuda_generator)
        device = _device_generator(self.device)
        device.graphsafe_set_state(fresh(device.graphsafe_get_state()))

    def step_each(self, slots: list[Slot]) -> dict[str, str]:
        """After a packed step raised: each trial's effective batch again from its start, each trial on its own. A
        trial that runs out of memory alone takes it again in micro-batches of half the rows (down to single rows).
        Returns the trials whose own step raised otherwise (name -> traceback): they fail, the others train on."""
        import traceback

        failed = {}
        for slot in slots:
            slot.restart_batch()
        for slot in slots:
            while True:
                try:
                    self.step([slot])
                    break
                except Exception as e:  # noqa: BLE001 - this trial's own failure: it fails alone
                    if is_oom(e) and slot.halve():
                        self.drop_graphs()  # their memory, and that of the micro-batch they were captured for
                        self.free_cached_memory()
                        continue
                    failed[slot.name] = traceback.format_exc()
                    break
        return failed

    def evaluate(self, name: str, val: TokenizedSplit, batch_size: int, class_weights: np.ndarray | None,
                 cores: int | None = None):
        """One trial's validation metrics, as its solo run evaluates (alone, eagerly, at the pack's autocast; on
        `cores` of a CPU, default all the pack's), while the pack's other trials may step; its predictions are kept
        for its checkpoint. A pack compiles nothing, so it needs no `evaluation.eager()`: that sets the process's
        compile stance, which evaluations in threads of their own would leave stuck at force_eager."""
        from tune_app.train.evaluation import evaluate

        self._intra_op_threads(cores or self.threads)
        with self.alone(name):
            metrics, self.slots[name].predictions = evaluate(self.model, val, self.base.pad_id, batch_size,
                                                             self.device, self.autocast, class_weights,
                                                             modes_kept=True)
        return metrics

    def checkpoint(self, name: str, folder: str | Path, *, metrics: dict[str, Any], model_name: str,
                   train_seconds: float) -> None:
        """A trial's checkpoint, the one its solo run writes: adapter and head, training state, metrics,
        predictions."""
        from tune_app.spec.space import MODEL_KEY, SEED_KEY

        slot = self.slots[name]
        self.save(name, folder)
        checkpoint.write(folder, state=slot.state_dict(), epoch=metrics["epoch"], train_seconds=train_seconds,
                         metrics=metrics, identity={"config": slot.params, MODEL_KEY: model_name, SEED_KEY: slot.seed},
                         predictions=slot.predictions)

    @contextlib.contextmanager
    def alone(self, name: str):
        """Forwards of one trial alone, evaluated: every row of any batch is that trial's, at the batch's own width,
        and nothing drops out (its layout says so; the model stays in training mode for the others' steps)."""
        with _rows_of([_Rows(self.slots[name], 0, -1, -1, training=False)]):
            yield

    def save(self, name: str, folder: str | Path) -> None:
        """The trial's adapter and head, as its solo run saves them (adapter_config.json,
        adapter_model.safetensors): read while the pack's other trials may step (the trial itself has nothing
        under way)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[name])
            saved = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
            for file in saved.iterdir():
                if file.is_file():
                    shutil.copy2(file, Path(folder) / file.name)

    def load(self, name: str, folder: str | Path) -> None:
        """A resumed trial's adapter and head from its checkpoint."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        self.settle()
        set_peft_model_state_dict(self.model, load_file(str(Path(folder) / "adapter_model.safetensors")),
                                  adapter_name=name)


def _device_generator(device):
    """The process's random generator of a CUDA device (the current one when `device` names no index)."""
    import torch

    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def _owned_by(parameter: str, name: str) -> bool:
    """Whether a parameter of the PeftModel is trial `name`'s (its LoRA layers or its head copy)."""
    return f".{name}." in parameter or parameter.endswith(f".{name}")


def _pad(tensor, width: int, value: int):
    import torch

    if tensor.shape[1] == width:
        return tensor
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _attention_dropout(config) -> float:
    return float(getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0)
                 or 0.0)


# --------------------------------------------------------------------------------------------- packed forwards


def _join(parts: list):
    """The trials' parts of a packed forward's tensor, back in one (one trial's part as it is: no copy)."""
    import torch

    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _own_rows(layout: list[_Rows], n: int) -> list[_Rows]:
    """The layout of a forward: a trial alone (`Pack.alone`) owns all `n` rows at their full width."""
    if len(layout) == 1 and layout[0].stop == -1:
        return [_Rows(layout[0].slot, 0, n, -1, layout[0].training)]
    return layout


def _width_slice(x, rows: _Rows):
    """A trial's rows of `x`, cut to its own width where `x` has a sequence axis (3D: [batch, seq, hidden];
    4D: [batch, heads, seq, seq]), so that its random draws have its solo run's shapes."""
    part = x[rows.start:rows.stop]
    if rows.width < 0:
        return part, part.shape
    if part.dim() == 3:
        return part[:, :rows.width], part.shape
    if part.dim() == 4:
        return part[:, :, :rows.width, :rows.width], part.shape
    return part, part.shape


def _restore_width(part, shape):
    """A trial's rows back at the packed width (the positions past its own width are padding nobody reads)."""
    import torch

    if tuple(part.shape) == tuple(shape):
        return part
    out = torch.zeros(shape, dtype=part.dtype, device=part.device)
    if part.dim() == 3:
        out[:, :part.shape[1]] = part
    else:
        out[:, :, :part.shape[2], :part.shape[3]] = part
    return out


def _dropout_forward(module, x):
    """nn.Dropout in a packed forward: each trial's rows dropped with its own random stream, at its own width."""

    layout = _layout.rows
    if layout is None:
        return module._packed_original(x)
    if module.p == 0 or not any(rows.training for rows in layout):
        return x
    parts = []
    for rows in _own_rows(layout, x.shape[0]):
        if not rows.training:
            parts.append(x[rows.start:rows.stop])
            continue
        part, shape = _width_slice(x, rows)
        parts.append(_restore_width(rows.slot.dropout(part, module.p), shape))
    return _join(parts)


def _lora_forward(layer, x, *args, **kwargs):
    """A LoRA layer in a packed forward: the base layer once over every row, then each trial's own LoRA on its rows
    (rows of trials that do not adapt this layer pass through)."""
    import torch

    layout = _layout.rows
    if layout is None:
        return layer._packed_original(x, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    parts = []
    for rows in _own_rows(layout, x.shape[0]):
        name, out = rows.slot.name, result[rows.start:rows.stop]
        if name in layer.lora_A:
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            inputs, shape = _width_slice(x, rows)
            inputs = inputs.to(lora_a.weight.dtype)
            dropout = layer.lora_dropout[name]
            if isinstance(dropout, torch.nn.Dropout) and rows.training:
                inputs = rows.slot.dropout(inputs, dropout.p)
            delta = lora_b(lora_a(inputs)) * layer.scaling[name]
            delta = _restore_width(delta, (*shape[:-1], delta.shape[-1])) if delta.dim() == 3 else delta
            out = (out + delta).to(dtype)
        parts.append(out)
    return _join(parts)


def _head_forward(wrapper, x, *args, **kwargs):
    """The classification head in a packed forward: each trial's own trained copy on its rows."""

    layout = _layout.rows
    if layout is None:
        return wrapper._packed_original(x, *args, **kwargs)
    return _join([wrapper.modules_to_save[rows.slot.name](x[rows.start:rows.stop], *args, **kwargs)
                  for rows in _own_rows(layout, x.shape[0])])


def _attention(module, query, key, value, attention_mask, *, dropout: float = 0.0, **kwargs):
    """Attention of a packed forward whose probabilities drop out: per trial, over its own keys (its solo width),
    with its own random stream; otherwise the base's own attention over every row at once."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    layout = _layout.rows
    if layout is not None and not any(rows.training for rows in layout):
        dropout = 0.0  # evaluated rows
    if layout is None or dropout == 0:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    outputs = []
    for rows in _own_rows(layout, query.shape[0]):
        w = rows.width if rows.width > 0 else query.shape[2]
        q, k, v = (t[rows.start:rows.stop, :, :w] for t in (query, key, value))
        mask = None if attention_mask is None else attention_mask[rows.start:rows.stop, :, :w, :w] \
            if attention_mask.shape[2] > 1 else attention_mask[rows.start:rows.stop, :, :, :w]
        extra = {k_: (t[rows.start:rows.stop, :w] if torch.is_tensor(t) and t.dim() == 2 else t)
                 for k_, t in kwargs.items()}
        with rows.slot.random():
            out, _ = sdpa(module, q, k, v, mask, dropout=dropout if rows.training else 0.0, **extra)
        if w < query.shape[2]:
            out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, query.shape[2] - w))
        outputs.append(out)
    return _join(outputs), None


def _install(model, attention_dropout: float) -> None:
    """Route the model's dropout, LoRA layers and head wrappers through the packed forwards (and its attention, if
    its probabilities drop out)."""
    import types

    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    for module in model.modules():
        kind = _lora_forward if isinstance(module, LoraLayer) else _head_forward if isinstance(
            module, ModulesToSaveWrapper) else _dropout_forward if type(module) is torch.nn.Dropout else None
        if kind is not None and not hasattr(module, "_packed_original"):
            module._packed_original = module.forward
            module.forward = types.MethodType(kind, module)
    base = model.get_base_model()
    if attention_dropout > 0 and not hasattr(base, "_packed_attention"):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(ATTENTION, _attention)
        # Its masks are sdpa's, which it computes with: a 2D padding mask (an evaluation's) becomes what sdpa takes.
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        base._packed_attention = base.config._attn_implementation
        base.set_attn_implementation(ATTENTION)


def _uninstall(model) -> None:
    """The base as it was: its own forwards and attention."""
    for module in model.modules():
        if hasattr(module, "_packed_original"):
            module.forward = module._packed_original
            del module._packed_original
    if (previous := getattr(model, "_packed_attention", None)) is not None:
        model.set_attn_implementation(previous)
        del model._packed_attention


# --------------------------------------------------------------------------------------------- in one process


def load_pack(ctx, model: str, device, threads: int) -> tuple[Pack, Any, np.ndarray | None]:
    """A pack for `model`'s trials on `device`, its base loaded as a solo trial loads it (the study's seed set
    first, at ctx.precision; CUDA graphs as ctx.cuda_graphs says); with the model's tokenized data and the class
    weights of its loss (None: unweighted)."""
    import torch

    from tune_app.train.model import trial_base
    from tune_app.train.precision import autocast_factory

    spec = ctx.models[model]
    torch.manual_seed(ctx.seed)
    data = fetch(ctx.data_refs[spec.data_key])
    weights = np.asarray(ctx.class_weights, dtype=np.float32) if ctx.weighted_loss else None
    autocast, precision = autocast_factory(device, ctx.precision)
    on_gpu = device.type == "cuda"
    base = trial_base(spec, ctx.label_names, on_gpu=on_gpu, precision=precision)
    base.model.to(device)
    pack = Pack(base, train=data.train, epochs=ctx.epochs, class_weights=weights, num_labels=len(ctx.label_names),
                target_modules=spec.target_modules, autocast=autocast, precision=precision, seed=ctx.seed,
                threads=threads, widths=bucket_widths(ctx.max_length),
                cuda_graphs=step_mode(ctx, on_gpu, precision)[1])
    return pack, data, weights


def fit_pack(configs: dict[str, dict[str, Any]], ctx, *, report: Callable[[str, dict[str, Any], str], bool | None],
             threads: int | None = None, device: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Train several trials of one model packed in this process for ctx.epochs epochs each (`fit`'s packed twin: on
    `device`, default the GPU when there is one, at ctx.precision, with CUDA graphs as ctx.cuda_graphs says).

    After each of a trial's epochs, `report(name, metrics, checkpoint_dir)` gets what `fit` reports (the same
    checkpoint files); returning False ends that trial there (an early stop) and the others train on. Returns every
    trial's epoch metrics."""
    import torch

    from tune_app.spec.space import HYPERPARAMETERS, MODEL_KEY, SEED_KEY
    from tune_app.train.memory import release_memory
    from tune_app.train.model import quiet_libraries

    quiet_libraries()
    release_memory()
    models = {config[MODEL_KEY] for config in configs.values()}
    if len(models) != 1:
        raise ValueError(f"a pack trains trials of one model, got {sorted(models)}")
    torch.set_num_threads(threads or 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pack, data, weights = load_pack(ctx, models.pop(), device, threads or 1)
    history: dict[str, list[dict[str, Any]]] = {}
    started: dict[str, float] = {}
    for name, config in configs.items():
        slot = pack.join(name, {k: config[k] for k in HYPERPARAMETERS}, config.get(SEED_KEY, ctx.seed))
        slot.start_epoch(data.train, 0, device)
        history[name], started[name] = [], time.perf_counter()

    def evaluate(slot: Slot, cores: int) -> dict[str, Any]:
        return pack.evaluate(slot.name, data.val, eval_batch_size(ctx.eval_batch_size, slot.batch_size), weights,
                             cores)

    while pack.slots:
        for slot in [s for s in pack.slots.values() if s.evaluation is not None]:
            name, epoch_seconds = slot.name, slot.epoch_ended - started[slot.name]
            train_loss = float(slot.loss_sum) / len(slot.batches)
            try:
                metrics = slot.evaluation.result()
            except Exception:
                pack.close()
                raise
            slot.evaluation = None
            metrics.update(epoch=slot.epoch + 1, train_loss=train_loss, epoch_time_s=epoch_seconds,
                           train_samples_per_s=len(data.train) / epoch_seconds, micro_batch_size=slot.micro_batch,
                           **pack.sizes(name), packed_trials=len(pack.slots), device=device.type,
                           cuda_graphs=len(pack.graphs or ()))
            history[name].append(metrics)
            with tempfile.TemporaryDirectory() as tmp:
                pack.checkpoint(name, tmp, metrics=metrics, model_name=configs[name][MODEL_KEY],
                                train_seconds=sum(m["epoch_time_s"] for m in history[name]))
                go_on = report(name, metrics, tmp) is not False
            if not go_on or slot.epoch + 1 >= ctx.epochs:
                pack.leave(name)
            else:
                slot.start_epoch(data.train, slot.epoch + 1, device)
                started[name] = time.perf_counter()
        if pack.slots and (failed := pack.advance(list(pack.slots.values()), evaluate)):
            pack.close()
            name, error = next(iter(failed.items()))
            raise RuntimeError(f"trial {name} failed in its pack:\n{error}")
    pack.close()
    return history


# --------------------------------------------------------------------------------------------- as a Ray actor


def pack_name(prefix: str, node_id: str, device: str) -> str:
    """The Ray actor name of the pack of a study's model on one node's device ('cpu', or a GPU's Ray id)."""
    return f"{prefix}-{node_id[:12]}-{device}"


@dataclass
class _Trial:
    """A Tune trial's state in a pack server: its results waiting to be collected, and its lease."""

    result: dict[str, Any] | None = None
    paused: bool = False
    """Its result was collected: it trains on only once the trial asks for the next."""
    paused_since: float = 0.0
    """When its last result was held for it (the lease counts from there)."""
    waiting: bool = False
    """Its call for its next result is waiting (`PackServer.next_result`)."""
    checkpoint: str | None = None
    setup: dict[str, Any] = field(default_factory=dict)
    """Its setup's timings, as a solo trial reports them (the base loads once, for the pack's first trial)."""
    joined: float = 0.0
    first_step_s: float | None = None
    """From its join call to the end of its first packed step: a trial joining a running pack loads nothing."""
    epochs_done: int = 0
    heartbeat: Any = None
    """Tells the progress board where the trial is inside its epoch (train.heartbeat)."""
    started: float = 0.0
    train_seconds: float = 0.0


class PackServer:
    """The body of a pack's Ray actor: one per model and device, created by the driver (an actor dies with its
    creator, and the driver outlives every trial); thin Tune trials join it, collect one result per epoch, and
    leave. It trains in its own thread while any joined trial has work.

    A trial that Tune ends without a word (ray.kill skips `finally`) stops asking for results: once its result
    has waited LEASE_S seconds, the trial is dropped and its slot is free. A packed step that raises is taken again
    trial by trial; a trial whose own step raises, or whose loss is not finite, fails alone.

    A pack that has held no trial for IDLE_RELEASE_S seconds frees its base and the device memory it held (its
    model's trials are over, while the study's other models train on), and the next trial to join loads it again.
    """

    LEASE_S = 600.0
    IDLE_RELEASE_S = 60.0

    def __init__(self, ctx, model: str, device: str, threads: int, name: str = ""):
        self.ctx, self.model_name, self.device_id, self.threads, self.name = ctx, model, device, threads, name
        self.cond = threading.Condition()
        self.trials: dict[str, _Trial] = {}
        self.pack: Pack | None = None
        self.thread: threading.Thread | None = None
        self.callers = 0
        """Trials' calls waiting for the lock: the training thread lets them in between two steps."""
        self._callers_lock = threading.Lock()
        # The driver starts the packs before Tune starts any trial: the libraries and the data come in meanwhile, so
        # the first trial to join waits for the base alone (which is loaded then, onto a device some trial holds).
        self._warming = threading.Thread(target=self._warm_up, name="tune_app-pack-warm-up", daemon=True)
        self._warming.start()

    @contextlib.contextmanager
    def _turn(self):
        """The lock, for a trial's call: the training thread, which would take it again at once after every step
        (a lock is not fair), waits for such calls between its steps, so a joining trial steps within a step."""
        with self._callers_lock:
            self.callers += 1
        with self.cond:
            with self._callers_lock:
                self.callers -= 1
            yield

    # ----------------------------------------------------------------------------------------- called by trials

    def join(self, trial_id: str, config: dict[str, Any], resume_dir: str | None = None) -> None:
        from tune_app.spec.space import HYPERPARAMETERS, SEED_KEY

        t0 = time.perf_counter()
        running = self.pack is not None  # before the lock: a trial that waits for another's load joins no running pack
        with self._turn():
            loaded = self.pack is None
            if loaded:  # the pack's first trial, or the first since an idle pack freed its base
                running = False
                self._load()
            t_load = time.perf_counter()
            slot = self.pack.join(trial_id, {k: config[k] for k in HYPERPARAMETERS},
                                  config.get(SEED_KEY, self.ctx.seed))
            trial = self.trials[trial_id] = _Trial(started=time.perf_counter(), joined=t0,
                                                   heartbeat=Heartbeat(self.ctx.progress, trial_id))
            trial.setup = dict(setup_time_s=trial.started - t0, imports_s=0.0, data_fetch_s=0.0,
                               model_load_s=t_load - t0 if loaded else 0.0, base_reused=not loaded, compile_time_s=0.0,
                               joined_running_pack=running)
            start_epoch = 0
            if resume_dir:
                self.pack.load(trial_id, resume_dir)
                state = checkpoint.read_state(resume_dir, self.device)
                slot.load_state_dict(state)
                start_epoch, trial.train_seconds = state["epoch"], state["train_seconds"]
            trial.epochs_done = start_epoch
            if start_epoch >= self.ctx.epochs:  # resumed after its last epoch: nothing to train or report
                trial.result = {"last": True, "metrics": None}
                self.pack.leave(trial_id)
            else:
                slot.start_epoch(self.data.train, start_epoch, self.device)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="tune_app-pack", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def next_result(self, trial_id: str) -> dict[str, Any]:
        """The trial's next epoch result ({metrics, checkpoint, last} or {error}); asking for it means the trial
        goes on (Tune took the previous report), so a paused trial trains its next epoch."""

        with self._turn():
            trial = self.trials.get(trial_id)
            if trial is None:
                return {"error": f"trial {trial_id} is not in this pack (dropped after {self.LEASE_S:.0f} s without "
                                 f"asking for its result)"}
            if trial.paused:
                self._discard_checkpoint(trial)
                trial.paused = False
                self.cond.notify_all()
            trial.waiting = True
            try:
                while trial.result is None:
                    self.cond.wait(timeout=5.0)
            finally:
                trial.waiting = False
            result, trial.result = trial.result, None
            if result.get("error"):
                self.trials.pop(trial_id, None)
            else:  # its checkpoint stays until the trial asks again or leaves (it reports from that folder)
                trial.paused, trial.paused_since = True, time.monotonic()
            return result

    def leave(self, trial_id: str) -> None:
        """A trial ends (stopped by Tune, or failed in its own process): its slot is free."""
        with self._turn():
            trial = self.trials.pop(trial_id, None)
            if trial is not None:
                self._discard_checkpoint(trial)
            if self.pack is not None and trial_id in self.pack.slots:
                self.pack.leave(trial_id)
            self.cond.notify_all()

    # ----------------------------------------------------------------------------------------- the training thread

    def _warm_up(self) -> None:
        """Import what training needs and map the model's tokenized data in, before any trial asks."""
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401
            from transformers import AutoModelForSequenceClassification  # noqa: F401

            from tune_app.train.model import quiet_libraries

            quiet_libraries()
            fetch(self.ctx.data_refs[self.ctx.models[self.model_name].data_key])
        except Exception:  # noqa: BLE001 - _load does it all again, and a failure there fails the joining trial
            pass

    def _load(self) -> None:
        import os

        import torch

        from tune_app.train.model import quiet_libraries

        self._warming.join()
        quiet_libraries()
        torch.set_num_threads(self.threads)
        if self.device_id == "cpu":
            self.device = torch.device("cpu")
        else:  # Ray's GPU id, as listed in this node's CUDA_VISIBLE_DEVICES when that is set
            visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            index = visible.index(self.device_id) if self.device_id in visible else int(self.device_id)
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        self.pack, self.data, self.weights = load_pack(self.ctx, self.model_name, self.device, self.threads)

    def _run(self) -> None:
        import torch

        if self.device.type == "cuda":  # the current device is per thread, and this thread's own starts at 0
            torch.cuda.set_device(self.device)
        idle_since = None
        while True:
            with self.cond:
                self._drop_expired()
                self._leave_finished()
                for slot in [s for s in self.pack.slots.values() if s.evaluation is not None]:
                    self._finish_epoch(slot)
                # A trial trains on only once Tune took its last result and asked for the next: a result waiting
                # for its trial (or a paused trial) holds the slot, so no epoch result is ever overwritten unseen
                # and ASHA decides on an epoch before the next one trains. (Active: stepping, or evaluated at its
                # epoch's end.)
                active = [s for s in self.pack.slots.values()
                          if not self.trials[s.name].paused and self.trials[s.name].result is None]
                if not active and not self.pack.busy:
                    if not self.trials:  # nobody left: after a while the base goes, and the thread ends
                        idle_since = idle_since or time.monotonic()
                        idle = time.monotonic() - idle_since
                        if idle >= self.IDLE_RELEASE_S:
                            self._release()
                            self.thread = None  # the next join starts another, which loads the base again
                            return
                        self.cond.wait(timeout=min(5.0, self.IDLE_RELEASE_S - idle))
                        continue
                    idle_since = None
                    self.cond.wait(timeout=5.0)
                    continue
                idle_since = None
                for name, error in self.pack.advance(active, self._evaluate, self._unlocked).items():
                    self._fail(name, error)
                now = time.perf_counter()
                for slot in active:
                    if (trial := self.trials.get(slot.name)) is None:
                        continue
                    if trial.first_step_s is None and slot.steps:
                        trial.first_step_s = now - trial.joined
                    trial.heartbeat(slot.epoch + 1, slot.batch_index, len(slot.batches),
                                    slot.batch_index * slot.batch_size, now - trial.started)
                while self.callers or self._undelivered():  # trials' calls first (wait releases the lock)
                    self.cond.wait(timeout=0.01)

    def _release(self) -> None:
        """Free the base, the data and the device memory they held; the log says so."""
        from tune_app.train.memory import release_memory

        self.pack.close()
        self.pack.drop_graphs()
        self.pack = self.data = self.weights = None
        release_memory()
        print(f"[tune_app] pack {self.name}: no trial for {self.IDLE_RELEASE_S:.0f} s, so its base is freed (the next "
              f"trial to join loads it again)", flush=True)

    def _undelivered(self) -> bool:
        """Whether a result waits for a trial whose call for it waits for the lock: the training thread, which
        would take the lock again at once after every step, lets that call in first."""
        return any(t.waiting and t.result is not None for t in self.trials.values())

    @contextlib.contextmanager
    def _unlocked(self):
        """The lock released, while the training thread waits for a CPU pack's threads (`Pack.advance`)."""
        self.cond.release()
        try:
            yield
        finally:
            self.cond.acquire()

    def _fail(self, name: str, error: str) -> None:
        trial = self.trials.get(name)
        if name in self.pack.slots:
            self.pack.leave(name)
        if trial is not None:
            trial.result = {"error": error}
        self.cond.notify_all()

    def _evaluate(self, slot: Slot, cores: int) -> dict[str, Any]:
        """A trial's epoch-end evaluation, beside the pack's other trials' steps (`Pack.advance`): its validation
        metrics, its epoch's training loss and the evaluation's time; a loss that is not finite (a trial that
        diverged) is not evaluated."""
        import math

        train_loss = float(slot.loss_sum) / len(slot.batches)
        if not math.isfinite(train_loss):
            return {"train_loss": train_loss}
        t0 = time.perf_counter()
        metrics = self.pack.evaluate(slot.name, self.data.val, eval_batch_size(self.ctx.eval_batch_size,
                                                                               slot.batch_size), self.weights, cores)
        return {**metrics, "train_loss": train_loss, "eval_time_s": time.perf_counter() - t0}

    def _finish_epoch(self, slot: Slot) -> None:
        """Once the trial is evaluated: write its checkpoint as a solo trial does, and hold its result for it."""
        import math
        import traceback

        trial, name = self.trials[slot.name], slot.name
        evaluation, slot.evaluation = slot.evaluation, None
        if (error := evaluation.exception()) is not None:
            self._fail(name, "".join(traceback.format_exception(error)))
            return
        metrics = evaluation.result()
        if not math.isfinite(train_loss := metrics["train_loss"]):
            self._fail(name, f"the training loss of epoch {slot.epoch + 1} is {train_loss}: this trial diverged "
                             f"(lower its learning rate); the other trials of its pack train on")
            return
        epoch_seconds = slot.epoch_ended - trial.started
        trial.train_seconds += epoch_seconds
        metrics.update(epoch=slot.epoch + 1, train_time_s=trial.train_seconds, epoch_time_s=epoch_seconds,
                       **trial.setup, train_samples_per_s=len(self.data.train) / epoch_seconds,
                       **self.pack.sizes(name), micro_batch_size=slot.micro_batch, autocast=self.pack.precision,
                       compiled=False, compiled_graphs=0, cuda_graphs=len(self.pack.graphs or ()),
                       device=self.device.type, threads=self.threads, packed_trials=len(self.pack.slots),
                       pack=self.name, first_step_s=trial.first_step_s, **peak_memory_mb(self.device.type == "cuda"))
        folder = tempfile.mkdtemp(prefix="tune_app-pack-")
        self.pack.checkpoint(name, folder, metrics=metrics, model_name=self.model_name,
                             train_seconds=trial.train_seconds)
        last = slot.epoch + 1 >= self.ctx.epochs
        trial.checkpoint, trial.epochs_done = folder, slot.epoch + 1
        trial.result = {"metrics": metrics, "checkpoint": folder, "last": last}
        trial.paused_since = time.monotonic()
        if not last:  # after its last, the slot goes once its result is delivered (`_leave_finished`)
            slot.start_epoch(self.data.train, slot.epoch + 1, self.device)
            trial.started = time.perf_counter()
        self.cond.notify_all()

    def _leave_finished(self) -> None:
        """Free the slots of trials that took their last result. (Leaving waits for the steps under way, so it
        comes after the result reached its trial, not before.)"""
        for name, trial in self.trials.items():
            if trial.paused and trial.epochs_done >= self.ctx.epochs and name in self.pack.slots:
                self.pack.leave(name)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for name, trial in list(self.trials.items()):
            if (trial.paused or trial.result is not None) and now - trial.paused_since > self.LEASE_S:
                print(f"[tune_app] pack: trial {name} did not take its result or ask for its next epoch in "
                      f"{self.LEASE_S:.0f} s; its slot is free", flush=True)
                self.trials.pop(name)
                self._discard_checkpoint(trial)
                if name in self.pack.slots:
                    self.pack.leave(name)

    @staticmethod
    def _discard_checkpoint(trial: _Trial) -> None:
        if trial.checkpoint:
            shutil.rmtree(trial.checkpoint, ignore_errors=True)
            trial.checkpoint = None
