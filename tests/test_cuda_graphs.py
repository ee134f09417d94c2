"""StepGraphs: captured steps accumulate what eager steps accumulate; shapes that sync stay eager; a capture
failure that hides an out-of-memory error is reported as out of memory. A whole trial with graphs against an
eager one is in test_trial.py. All but the last test need a GPU."""

from __future__ import annotations

import pytest
import torch

from tune_app.train.cuda_graphs import StepGraphs, _out_of_memory


def gpu(test):
    """The `gpu` marker (tests/conftest.py skips it without a CUDA device), with this file's own reason."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")(test))


def _linear_step(layer, sync_width: int | None = None):
    """A toy micro-step: ids (as floats) through a linear layer; at `sync_width` it reads a value on the host."""

    def step(ids, mask, labels, total_weight):
        x = (ids * mask).float()[:, :4]
        if ids.shape[1] == sync_width:
            x = x * float(x.sum() > 0)  # a host read: cannot be captured
        loss = torch.nn.functional.cross_entropy(layer(x), labels, reduction="sum") / total_weight
        loss.backward()
        return loss.detach()

    return step


def _batches(widths, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for width in widths:
        ids = torch.randint(0, 5, (rows, width), generator=g)
        yield ids.cuda(), torch.ones_like(ids).cuda(), torch.randint(0, 2, (rows,), generator=g).cuda()


@gpu
def test_replayed_steps_accumulate_the_eager_gradients_and_losses():
    torch.manual_seed(0)
    eager_layer = torch.nn.Linear(4, 2).cuda()
    graph_layer = torch.nn.Linear(4, 2).cuda()
    graph_layer.load_state_dict(eager_layer.state_dict())
    graphs = StepGraphs(_linear_step(graph_layer, sync_width=8), list(graph_layer.parameters()))
    eager = _linear_step(eager_layer)
    widths = [4, 6, 4, 8, 6, 8, 4]
    for total_weight, batch in zip(range(1, 8), _batches(widths)):
        expected = eager(*batch, float(total_weight))
        torch.testing.assert_close(graphs(*batch, float(total_weight)), expected)
        for a, b in zip(graph_layer.parameters(), eager_layer.parameters()):
            torch.testing.assert_close(a.grad, b.grad)  # accumulated over every step, capture steps included
    assert len(graphs) == 2 and len(graphs.eager_shapes) == 1  # widths 4 and 6 replayed, 8 (syncs) eager


@gpu
def test_gradients_zeroed_in_place_between_steps_keep_the_graphs_valid():
    layer = torch.nn.Linear(4, 2).cuda()
    graphs = StepGraphs(_linear_step(layer), list(layer.parameters()))
    (batch,) = _batches([4])
    graphs(*batch, 3.0)
    grads = [p.grad for p in layer.parameters()]
    first = [g.clone() for g in grads]
    torch.optim.SGD(layer.parameters(), lr=0.0).zero_grad(set_to_none=False)
    graphs(*batch, 3.0)
    assert all(p.grad is g for p, g in zip(layer.parameters(), grads))  # same tensors the graph writes
    for g, f in zip(grads, first):
        torch.testing.assert_close(g, f)


@gpu
def test_a_trainable_parameter_the_step_never_reaches_keeps_no_gradient_and_no_weight_decay():
    layer = torch.nn.Linear(4, 2).cuda()
    unused = torch.nn.Parameter(torch.ones(3, device="cuda"))
    graphs = StepGraphs(_linear_step(layer), [*layer.parameters(), unused])
    optimizer = torch.optim.AdamW([*layer.parameters(), unused], lr=0.1, weight_decay=0.5)
    for batch in _batches([4, 4, 6]):
        optimizer.zero_grad(set_to_none=False)
        graphs(*batch, 3.0)
        optimizer.step()
    assert len(graphs) == 2 and layer.weight.grad is not None
    assert unused.grad is None  # a zero gradient instead would make AdamW decay it
    torch.testing.assert_close(unused.detach(), torch.ones(3, device="cuda"))


def test_an_out_of_memory_error_behind_a_capture_failure_is_found():
    oom = torch.OutOfMemoryError("CUDA out of memory")
    try:
        try:
            raise oom
        except torch.OutOfMemoryError:
            # The implicit __context__ (no `from`) is what a failed capture leaves: the point of this test.
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as capture_error:
        assert _out_of_memory(capture_error) is oom
    assert _out_of_memory(RuntimeError("operation not permitted when stream is capturing")) is None
