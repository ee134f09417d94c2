"""A training micro-step (forward + loss + backward) replayed as a CUDA graph, one graph per batch shape.

On short texts a step is bound by the CPU: Python and kernel launches take longer than the GPU's arithmetic (the
benchmark's reference recipe leaves an H100 mostly idle). Replaying a captured graph launches the whole forward
and backward as one unit, so a step costs about its GPU time, and trials sharing a GPU stop competing for CPU
cores. The optimizer step stays eager (fused AdamW and gradient clipping are a handful of launches).

What makes the replay train exactly like the eager step:
- every batch of one shape is copied into that shape's fixed input tensors (the padding buckets and the filler
  rows of `trial.collate` keep shapes few: one graph per bucket);
- the summed class weight of the effective batch is an input too, so a graph serves every step;
- gradients live in fixed tensors: created once, accumulated into in place by every replay, zeroed in place
  (`zero_grad(set_to_none=False)`), never set to None while graphs exist (`reset` first);
- dropout draws fresh random numbers on every replay (PyTorch advances the graph's RNG offset);
- nothing in the step reads a tensor on the host (`trial.mask_preparer`; `tests/test_families.py` checks it):
  such a read cannot be captured, and capture then fails, which `CaptureFailed` reports so the trial goes on eager.

All graphs of a trial share one memory pool: they run one after another on one stream, and each call's loss is
copied out before the next call, so one graph's temporaries may reuse another's.
"""

from __future__ import annotations

from typing import Callable

WARMUP_STEPS = 2
"""Eager runs of a new shape, on a side stream, before its capture (lazy library initialisation happens there)."""


class CaptureFailed(RuntimeError):
    """A shape's step could not be captured (it syncs, or uses an op graphs cannot hold): train it eagerly."""


class StepGraphs:
    """`step(ids, mask, labels, total_weight)` -> detached loss, with backward done, as CUDA graphs.

    `step` takes the total weight as a 0-dim device tensor. Calling this object with a Python float runs the
    graph of the batch's shape, capturing it first if the shape is new."""

    def __init__(self, step: Callable, params: list):
        self.step = step
        self.params = params
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def __len__(self) -> int:
        return len(self.graphs)

    def __call__(self, ids, mask, labels, total_weight: float):
        key = (tuple(ids.shape), tuple(mask.shape), tuple(labels.shape))
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, mask, labels, total_weight)
        graph, inputs, loss = self.graphs[key]
        for static, value in zip(inputs, (ids, mask, labels)):
            static.copy_(value, non_blocking=True)
        inputs[3].fill_(total_weight)
        graph.replay()
        return loss.clone()  # the next replay of any graph may overwrite it

    def reset(self) -> None:
        """Drop every graph and its memory (before gradients are freed, or after an out-of-memory error)."""
        self.graphs.clear()
        self.pool = None

    def _capture(self, ids, mask, labels, total_weight: float) -> tuple:
        import torch

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        kept = [p.grad.clone() for p in self.params]  # the current step's gradients: warm-up adds to them
        inputs = (ids.clone(), mask.clone(), labels.clone(), torch.full((), total_weight, device=ids.device))
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self.step(*inputs)
        except torch.OutOfMemoryError:
            raise  # the trial's own handling: a smaller micro-batch
        except Exception as error:  # noqa: BLE001 - anything else means this step cannot be a graph
            raise CaptureFailed(f"{type(error).__name__}: {error}") from error
        finally:
            for p, grad in zip(self.params, kept):
                p.grad.copy_(grad)
        return graph, inputs, loss
