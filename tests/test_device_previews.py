"""The deferred preview path that device (CUDA) tensors take, exercised on the CPU.

A device tensor's preview is reduced on its device and read back with the
queue's next flush, so a traced op never waits for the device. Here the queue
is forced to take CPU tensors too (`preview.DEFER_CPU`): the previews it fills
must be the ones the immediate path takes, and no op reads tensor data on the
host; only the flushes do, one transfer per dtype each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autograd_magic as am
from autograd_magic.capture import preview as P

_READS = ("numpy", "item", "tolist", "cpu", "__float__")


def _mlp_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    with am.trace() as t:
        h = model(x)
        loss = (h.pow(2) + h.t().sum()).mean()
        loss.backward()
    return t, model, loss


def _all_previews(trace):
    for r in trace.records:
        yield f"record {r.id} ({r.op})", r.preview
        for i, g in sorted(r.grads.items()):
            yield f"record {r.id} grad of pass {i}", g
        yield f"record {r.id} .grad", r.attr_grad
    for p in trace.passes:
        for s in p.steps:
            for i, g in enumerate(s.grad_in):
                yield f"step {s.index} grad_in {i}", g
            for i, g in enumerate(s.grad_out or []):
                yield f"step {s.index} grad_out {i}", g


def _same(a, b, where):
    if a is None or b is None:
        assert a is None and b is None, where
        return
    assert (a.shape, a.dtype, a.device, a.layout, a.summarized, a.flat_head, a.note) == (
        b.shape, b.dtype, b.device, b.layout, b.summarized, b.flat_head, b.note), where
    if a.values is None:
        assert b.values is None, where
    else:
        assert a.values.dtype == b.values.dtype and a.values.shape == b.values.shape, where
        np.testing.assert_array_equal(a.values, b.values, err_msg=where)
    for field in ("min", "max"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or x == y or (np.isnan(x) and np.isnan(y)), (where, field, x, y)
    # the same elements, summed in another order (float32 there, float64 here: test_preview.py's
    # tolerance); the immediate path reduces a bfloat16 tensor in bfloat16 itself (3 digits)
    rel = 1e-2 if a.dtype == "torch.bfloat16" else 1e-5
    for field in ("mean", "norm"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None and y is None) or x == pytest.approx(y, rel=rel, abs=1e-6, nan_ok=True), (where, field, x, y)


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every read of tensor data on the host (numpy, item, tolist, cpu, float)."""
    counts = {"n": 0}
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_deferred_previews_equal_the_immediate_ones(monkeypatch):
    immediate, model_a, loss_a = _mlp_step()
    monkeypatch.setattr(P, "DEFER_CPU", True)
    deferred, model_b, loss_b = _mlp_step()
    assert torch.equal(loss_a, loss_b)  # the traced code ran the same either way
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    a, b = list(_all_previews(immediate)), list(_all_previews(deferred))
    assert [w for w, _ in a] == [w for w, _ in b]
    assert any(p is not None and p.values is not None for _, p in b)
    for (where, pa), (_, pb) in zip(a, b):
        _same(pa, pb, where)


def test_no_host_read_per_op_only_per_flush(monkeypatch, host_reads):
    monkeypatch.setattr(P, "DEFER_CPU", True)
    queues = []
    original = P.DeviceQueue.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        queues.append(self)

    monkeypatch.setattr(P.DeviceQueue, "__init__", keep)
    trace, _, _ = _mlp_step()
    (queue,) = queues
    previews = [p for _, p in _all_previews(trace) if p is not None]
    assert len(previews) > 20 and all(p.values is not None and p.norm is not None for p in previews)
    assert queue.flushes == 1  # at the end of the run: nothing was read while it ran
    assert queue.host_copies == 2  # the values (one dtype) and the statistics
    # each transfer is one `.cpu()` and one `.numpy()`; no other read of tensor data happened
    assert host_reads["n"] == 2 * queue.host_copies


def test_a_full_queue_flushes_early_and_fills_the_same_previews(monkeypatch):
    monkeypatch.setattr(P, "DEFER_CPU", True)
    queues = []
    original = P.DeviceQueue.__init__

    def small(self, include_cpu=False, limit=None):
        original(self, include_cpu, 3)
        queues.append(self)

    monkeypatch.setattr(P.DeviceQueue, "__init__", small)
    deferred, _, _ = _mlp_step()
    (queue,) = queues
    assert queue.flushes > 5  # every third preview, and once more at the end
    monkeypatch.setattr(P, "DEFER_CPU", False)
    immediate, _, _ = _mlp_step()
    for (where, pa), (_, pb) in zip(_all_previews(immediate), _all_previews(deferred)):
        _same(pa, pb, where)


def _odd_tensors():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 50, generator=g)
    yield "transposed", base.t()
    yield "sliced", base[::3, 5:45:2]
    yield "expanded", torch.randn(1, 80, generator=g).expand(30, 80)
    yield "small", torch.randn(3, 4, generator=g)
    yield "scalar", torch.tensor(2.5)
    yield "empty", torch.empty(0, 3)
    yield "float64", torch.randn(20, 30, generator=g, dtype=torch.float64)
    yield "float16", torch.randn(30, 30, generator=g).half()
    yield "bfloat16", torch.randn(30, 30, generator=g).bfloat16()
    yield "flat head", torch.randn(9, 9, 9, 9, generator=g)
    yield "non-finite", torch.tensor([1.0, float("inf"), -float("inf"), float("nan")] * 30)
    yield "parameter", torch.nn.Parameter(torch.randn(70, generator=g))


@pytest.mark.parametrize("label,t", list(_odd_tensors()), ids=[c[0] for c in _odd_tensors()])
def test_queue_matches_preview_on_every_layout_and_dtype(label, t):
    queue = P.DeviceQueue(include_cpu=True)
    assert queue.takes(t)
    with torch._C.DisableTorchFunction():
        deferred = queue.add(t, True)
    assert deferred.values is None  # nothing is read before the flush
    queue.flush()
    _same(P.preview(t), deferred, label)
