"""A trial worker's memory: what one trial leaves for the next, and the one base model a worker keeps.

The rule, as an invariant: **after its first report a trial frees nothing; the next trial in the process frees
what the last one left.** Once Tune has a trial's report it may end the worker at any moment, without waiting for
the trial's thread (an ASHA stop, max_t, the end of the study); a thread that frees CUDA memory while the process
exits aborts it. So:

- `keep(...)` holds the running trial's model, optimizer and graphs from its first report on;
- a trial gives its base back (`Lease.give_back`) before its last report, and giving back frees no tensor: what
  it strips out stays referenced until the next `take`;
- `release_memory()`, called when the next trial starts (and by `take` when it drops a base of another model),
  drops all of it and returns the cached GPU blocks to the trials sharing the GPU.

The kept base (`tune.reuse_actors`): a worker that ran a trial of a model keeps that model's base (weights on the
device, tokenizer), stripped of the trial's LoRA layers and trained head copy, so its next trial of the same model
skips from_pretrained and the move to the GPU. That trial starts as a fresh load would: the same weights, every base
parameter the adapter trained (lora_bias) restored, and the CPU and CUDA random states as they were right after
the first load, so LoRA's init and dropout draw what they would have drawn. At most one base is kept; a base changed
in ways stripping does not undo (compiled blocks, gradient checkpointing after an OOM) is not kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from tune_app.train.model import activation_checkpointing

OOM_TEST_ENV = "TUNE_APP_TEST_OOM_ABOVE"
"""Fault injection for tests only: raise a CUDA-style OOM when a training forward (a trial's micro-batch, or a
pack's packed forward), or the widest evaluation batch, exceeds this many rows."""
_last_trial: list = []
"""The running or last trial's model, optimizer and graphs, held from its first report until this worker's next
trial starts (`release_memory`)."""


_kept: Lease | None = None
"""The base this process keeps for its next trial."""


@dataclass
class Lease:
    """A base lent to one trial: `base.model` is what the trial adapts; `give_back` strips and keeps it."""

    key: Hashable
    base: Any
    """What the loader returned; its `model` attribute is the transformers model."""
    random_state: tuple
    reused: bool = False
    _trained: list = field(default_factory=list)
    """(parameter, its data before training) of the base parameters the adapter trains."""
    _own: set = field(default_factory=set)
    """ids of the base's own parameters (PEFT adds its layers inside the base)."""
    _replaced: list = field(default_factory=list)
    """What give_back took out of the base (trained values, gradients), freed at the next `take`."""

    def __post_init__(self):
        self._own = {id(p) for p in self.base.model.parameters()}

    def adapted(self, peft_model) -> None:
        """Note which base parameters the trial's adapter trains (biases under lora_bias all / lora_only), with their
        values, dtype and device included, before the trial casts and trains them. Call once the adapted model is
        on its device."""
        self._trained = [(p, p.data.clone()) for p in peft_model.parameters() if p.requires_grad and id(p) in self._own]

    def give_back(self) -> bool:
        """The trial is over: strip the adapter from the base and keep it for the next trial. Returns whether it is
        kept (not when the trial compiled blocks or turned on gradient checkpointing). Never raises: it runs while
        Tune's stop (SystemExit) is on its way out, and a base it cannot strip is simply not kept."""
        global _kept
        model = self.base.model
        if not reusable(model):
            return False
        try:
            self._replaced = [(p.data, p.grad) for p in model.parameters()]
            strip_adapter(model)
            for parameter, data in self._trained:
                parameter.data = data
        except Exception as error:  # noqa: BLE001 - the next trial loads afresh instead
            print(f"[tune_app] base model not kept for the next trial: {type(error).__name__}: {error}", flush=True)
            return False
        self._trained = []
        _kept = self
        return True


def take(key: Hashable, load: Callable[[], Any]) -> Lease:
    """The base for `key`: the one this worker kept from its last trial if that was `key` (random state set to what
    it was after that load), else `load()`ed afresh once anything kept has been dropped. Call it right after
    seeding, as the load would be."""
    global _kept
    kept, _kept = _kept, None
    if kept is not None:
        kept._replaced = []
    if kept is not None and kept.key == key:
        set_random_state(kept.random_state)
        kept.reused = True
        return kept
    del kept
    release_memory()
    base = load()
    return Lease(key, base, random_state())


def clear() -> None:
    """Drop the kept base (the benchmark, between models it times from a cold start)."""
    global _kept
    _kept = None
    release_memory()


def reusable(model) -> bool:
    """Whether stripping the adapter gives back the base as loaded: not after regional compilation (the blocks stay
    compiled for the trial's modules) or gradient checkpointing (turned on by an OOM retry)."""
    if activation_checkpointing(model):
        return False
    return not any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def strip_adapter(model) -> None:
    """Undo get_peft_model on its base `model`, in place: each head wrapper (modules_to_save) back to the module it
    wrapped, untouched by training; each LoRA layer back to the layer it wrapped; every parameter frozen, without a
    gradient; the peft_config PEFT attached and the hooks of `precision.train_in_fp32` removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    from tune_app.train.precision import remove_hooks

    remove_hooks(model)  # a half-precision base's views of the biases it trained
    # Wrappers first: a wrapped head can hold LoRA layers of its own (a target name that matches inside it).
    for kind, inner in ((ModulesToSaveWrapper, lambda m: m.original_module),
                        (BaseTunerLayer, lambda m: m.get_base_layer())):
        for name, module in list(model.named_modules()):
            if isinstance(module, kind):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, inner(module))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None  # a trained bias's gradient: a fresh load has none
    model.__dict__.pop("peft_config", None)


def random_state() -> tuple:
    """The process's random state: the CPU generator's and every CUDA device's."""
    import torch

    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_random_state(state: tuple) -> None:
    """Set what `random_state` returned."""
    import torch

    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def keep(*objects: Any) -> None:
    """Hold the running trial's model, optimizer and graphs until the next trial starts (see the invariant above)."""
    _last_trial[:] = objects


def release_memory() -> None:
    """Free what the last trial left in this process (`keep`, and objects in reference cycles) and hand the GPU
    blocks cached for it back to the trials sharing the GPU."""
    import gc

    import torch

    _last_trial.clear()
    gc.collect()
    if torch.cuda.is_initialized():
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:  # per-stream cuBLAS workspaces, e.g. of a trial's CUDA-graph stream
            clear_workspaces()
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    """Whether an error is the device running out of memory (torch's type, or a library's message saying so)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def oom_test_limit() -> int:
    """Rows above which a batch raises a test OOM (OOM_TEST_ENV); 0 when off."""
    return int(os.environ.get(OOM_TEST_ENV, "0"))


def peak_memory_mb(on_gpu: bool) -> dict[str, float]:
    """Peak memory of the trial since its warm-up: on a GPU the most allocated at once (graphs' captures included,
    so eager and graphed trials compare) as peak_memory_mb, and the most the allocator reserved (what neighbours
    on a shared GPU could not use) as peak_reserved_mb; on CPU the process's peak RSS."""
    if on_gpu:
        import torch

        return {"peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
                "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    import resource

    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
