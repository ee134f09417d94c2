"""A training micro-step (forward + loss + backward) replayed as a CUDA graph, one graph per batch shape.

On short texts a step is bound by the CPU: Python and kernel launches take longer than the GPU's arithmetic (the
benchmark's reference recipe leaves an H100 mostly idle). Replaying a captured graph launches the whole forward
and backward as one unit, so a step costs about its GPU time, and trials sharing a GPU stop competing for CPU
cores. The optimizer step stays eager (fused AdamW and gradient clipping are a handful of launches).

What makes the replay train exactly like the eager step:
- every batch of one shape is copied into that shape's fixed input tensors (the padding buckets and the filler
  rows of `train.batching.collate` keep shapes few: one graph per bucket);
- the summed class weight of the effective batch is an input too, so a graph serves every step;
- gradients live in fixed tensors: created by the first warm-up that reaches their parameter, accumulated into
  in place by every replay, zeroed in place (`zero_grad(set_to_none=False)`), never set to None while graphs
  exist (`reset` first); a trainable parameter the step never reaches keeps no gradient, as in eager training;
- dropout draws fresh random numbers on every replay (PyTorch advances the graph's RNG offset);
- nothing in the step reads a tensor on the host (`train.model.mask_preparer`; `tests/test_families.py` checks it):
  such a read cannot be captured. Warm-up runs with host syncs refused (CUDA's sync debug mode: device-to-host
  copies and stream syncs; a device-wide `torch.cuda.synchronize()` is not among them), so a shape whose step
  syncs is mostly found before its capture and trains eagerly; a capture that fails anyway turns graphs off for
  the trial.

All graphs of a trial share one memory pool: they run one after another on one stream, and each call's loss is
copied out before the next call, so one graph's temporaries may reuse another's.

A pack of trials (`train.pack`) uses the same graphs for its packed step: the key then also names the trials in the
forward and their rows, the summed class weights are one per trial, each trial's random stream is a generator state
of its own registered with the graph (replays advance each one), and a key is captured only once it recurs
(`min_uses`: a set of trials seen once, while another trial pauses between epochs, trains eagerly).
"""

from __future__ import annotations

from collections.abc import Callable

WARMUP_STEPS = 2
"""Eager runs of a new shape on the capture stream before its capture (lazy library initialisation happens there,
and a host sync raises there, before any capture begins)."""


def _registers_generators() -> bool:
    """Whether this torch wants a CUDA graph's extra random streams registered before its capture (up to 2.13)."""
    import torch

    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version < (2, 14) and hasattr(torch.cuda.CUDAGraph, "register_generator_state")


class CaptureFailed(RuntimeError):
    """A step could not be captured: the trial drops its graphs and trains eagerly from here on."""


def _out_of_memory(error: BaseException | None):
    """The OutOfMemoryError behind an error, if any: a failed capture's own error hides it as its cause/context."""
    import torch

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class StepGraphs:
    """`step(ids, mask, labels, total_weight)` -> detached loss, with backward done, as CUDA graphs.

    Calling this object runs the graph of the batch's shape, capturing it first if the shape is new. A shape whose
    warm-up syncs with the host (e.g. a batch wider than a sliding attention window, whose mask transformers builds
    itself) runs eagerly from then on, with a log line; the other shapes keep their graphs. An out-of-memory error
    is raised as such (the trial halves its micro-batch); any other capture failure raises CaptureFailed."""

    def __init__(self, step: Callable, params: list, *, min_uses: int = 1):
        self.step = step
        self.params = params
        self.min_uses = min_uses
        """Calls of a key before it is captured (the earlier ones run eagerly)."""
        self.uses: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple] = {}
        self.eager_shapes: set[tuple] = set()
        self.pool = None
        self.stream = None
        """One stream for every warm-up and capture: a shared pool asks for it, and libraries' per-stream
        workspaces are then made once, during the first warm-up, outside any graph."""

    def __len__(self) -> int:
        return len(self.graphs)

    def __call__(self, ids, mask, labels, total_weight, *, key: tuple = (), params: list | None = None,
                 generators: tuple = ()):
        """`total_weight`: a float, or a tensor (a pack's, one per trial). A pack also gives `key` (its trials and
        their rows), `params` (their trainable parameters) and `generators` (their random streams' states)."""
        import torch

        key = (key, tuple(ids.shape), tuple(mask.shape), tuple(labels.shape))
        if key in self.eager_shapes:
            return self.step(ids, mask, labels, total_weight)
        if key not in self.graphs:
            self.uses[key] = self.uses.get(key, 0) + 1
            if self.uses[key] < self.min_uses:
                return self.step(ids, mask, labels, total_weight)
            try:
                self.graphs[key] = self._capture(ids, mask, labels, total_weight, params or self.params, generators)
            except _SyncInStep as error:
                self.eager_shapes.add(key)
                print(f"[tune_app] CUDA graphs: batches of shape {key[1]} train eagerly: {error}", flush=True)
                return self.step(ids, mask, labels, total_weight)
        graph, inputs, loss = self.graphs[key]
        for static, value in zip(inputs, (ids, mask, labels)):
            static.copy_(value, non_blocking=True)
        if torch.is_tensor(total_weight):
            inputs[3].copy_(total_weight, non_blocking=True)
        else:
            inputs[3].fill_(total_weight)
        graph.replay()
        return loss.clone()  # the next replay of any graph may overwrite it

    def forget(self, uses: Callable[[tuple], bool]) -> None:
        """Drop the graphs whose key `uses` names (a pack's, of a trial that left: they hold its parameters)."""
        for key in [k for k in self.graphs if uses(k[0])]:
            del self.graphs[key]
        self.uses = {k: n for k, n in self.uses.items() if not uses(k[0])}
        self.eager_shapes = {k for k in self.eager_shapes if not uses(k[0])}

    def reset(self) -> None:
        """Drop every graph and its memory (before gradients are freed, or after an out-of-memory error)."""
        self.graphs.clear()
        self.eager_shapes.clear()
        self.uses.clear()
        self.pool = None

    def _capture(self, ids, mask, labels, total_weight, params: list, generators: tuple = ()) -> tuple:
        import torch

        # The current step's gradients, which the warm-up adds to. A parameter without one yet gets it from the
        # warm-up's backward, and the graph then accumulates into that tensor; one the step never reaches keeps
        # None, so AdamW skips it (no weight decay) as it does in eager training.
        kept = [(p, p.grad.clone()) for p in params if p.grad is not None]
        fresh = [p for p in params if p.grad is None]
        weight = total_weight.to(ids.device) if torch.is_tensor(total_weight) else torch.full(
            (), total_weight, device=ids.device)
        inputs = (ids.clone(), mask.clone(), labels.clone(), weight.clone())
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=ids.device)
        caller = torch.cuda.current_stream(ids.device)
        # The warm-up's draws from the given streams (a pack's trials') are drawn again by the capture: a trial's
        # masks then do not depend on when its steps were captured.
        drawn_from = [(state, state.get_state()) for state in generators]
        try:
            self.stream.wait_stream(caller)
            self._warm_up(inputs)
            for state, where in drawn_from:
                state.set_state(where)
            graph = torch.cuda.CUDAGraph()
            # Each replay advances these streams by what the capture drew from them: registered before it, up to
            # torch 2.13 (2.14 registers a stream at its first draw in a capture, and warns at the call).
            if _registers_generators():
                for state in generators:
                    graph.register_generator_state(state)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    loss = self.step(*inputs)
            except Exception as error:
                if (oom := _out_of_memory(error)) is not None:
                    raise oom from None
                raise CaptureFailed(f"{type(error).__name__}: {error}") from error
        finally:
            torch.cuda.set_stream(caller)  # a failed capture leaves the capture stream current
            caller.wait_stream(self.stream)  # warm-up's gradient writes land before they are restored
            for p, grad in kept:
                p.grad.copy_(grad)
            for p in fresh:
                if p.grad is not None:
                    p.grad.zero_()
        return graph, inputs, loss

    def _warm_up(self, inputs: tuple) -> None:
        """Eager steps on the capture stream with host syncs refused: a step that syncs would break its capture
        (and, on some torch versions, the allocator's bookkeeping with it), so it is found here instead."""
        import warnings

        import torch

        mode = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings():  # torch calls the mode a prototype, once per process, in every trial's log
            warnings.filterwarnings("ignore", message="Synchronization debug mode")
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(self.stream):
                for _ in range(WARMUP_STEPS):
                    self.step(*inputs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            if "synchroniz" not in str(error):
                raise  # a real error of the step: eager training raises it too
            raise _SyncInStep(str(error).splitlines()[0]) from error
        finally:
            torch.cuda.set_sync_debug_mode(mode)


class _SyncInStep(Exception):
    """A shape's step reads a device value on the host: it cannot be captured, but trains eagerly."""
