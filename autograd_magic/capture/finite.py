"""Cheap checks for a loop's later runs, which `--limit` counts but does not record (issue 16).

Past the detail limit an op gets no preview. Two questions still matter for a training
cell and cost little to answer:

- forward: does this op's output hold a NaN or an Inf? (`holds_nonfinite`). One vector
  sum, no temporary: a sum of floats is finite exactly when every element is, unless the
  sum itself overflows, and only then is every element checked. Measured on the loop
  benchmark's tensors (128×64 float32): ~2 µs, a third of `torch.isfinite(t).all()`.
- backward: what did the pass put into the leaves, in total (`grad_norm_squared`)?
  The norm of each gradient an AccumulateGrad node receives, read by a pre-hook on those
  nodes only.

A device tensor is never read on the host here (that would wait for the device at every
op): its backward norms are reduced on the device and read back once when the run ends
(`DeferredScalars`); its forward check is skipped (the tracer says so once).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from . import preview as _preview  # its `_fused_stats` (the compiled one-pass statistics), read at each call
from .torch_compat import foreach_norms, no_torch_function

try:  # einsum without its Python wrapper: half the cost on a loop's small tensors (~1 µs, not 2)
    from numpy._core.multiarray import c_einsum as _einsum
except ImportError:  # numpy 1.x keeps it here
    try:
        from numpy.core.multiarray import c_einsum as _einsum
    except ImportError:
        _einsum = np.einsum

_CHECKED = {torch.float32, torch.float64, torch.float16}


def checkable(t) -> bool:
    """A CPU float tensor whose memory numpy can read as it is (the case `holds_nonfinite` answers)."""
    return (
        (type(t) is torch.Tensor or type(t) is torch.nn.Parameter)
        and t.dtype in _CHECKED
        and t.is_cpu
        and t.layout == torch.strided
        and not t.is_neg()
    )


def holds_nonfinite(t: torch.Tensor) -> bool:
    """True when the CPU float tensor `t` holds a NaN or an Inf (see `checkable`).

    einsum's sum runs in vector registers over any strides, makes no temporary and, unlike
    the ufunc reductions, raises no floating-point warning into the user's cell."""
    a = t.detach().numpy()
    if a.flags.c_contiguous:
        total = _einsum("i->", a.reshape(-1))
    else:
        axes = list(range(a.ndim))
        total = _einsum(a, axes, [])
    if math.isfinite(total):
        return False
    return not bool(np.isfinite(a).all())  # NaN/Inf, or finite values whose sum overflowed


def _squared_norm_now(g: torch.Tensor) -> float:
    """sum(g**2) of a CPU gradient: one vector loop in its own dtype over any strides (a weight's
    gradient arrives transposed), and in float64 only when that is not finite (an overflow of the
    squares, or a NaN/Inf, which float64 keeps). A dense float32/float64 block goes to the
    compiled pass when it is built: its squares summed in float64, ~1 µs on the loop's grads."""
    if checkable(g) and g.dtype != torch.float16:
        a = g.detach().numpy()
        fused = _preview._fused_stats
        if fused is not None and a.size:
            block = a if a.flags.c_contiguous else a.T if a.flags.f_contiguous else None
            found = fused(block.reshape(-1)) if block is not None else None
            if found is not None:  # None: a NaN, an Inf or squares near overflow (the paths below)
                return found[3]
        if a.flags.c_contiguous:
            flat = a.reshape(-1)
            sq = float(_einsum("i,i->", flat, flat))
        else:
            axes = list(range(a.ndim))
            sq = float(_einsum(a, axes, a, axes, []))
        if math.isfinite(sq):
            return sq
    n = float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64))
    return n * n


def _fused_squares(g: torch.Tensor, fused):
    """sum(g**2) of a dense CPU float32/float64 gradient in one compiled pass, the loop's common
    case read with the fewest calls (~2 us, a third of `_squared_norm_now`'s checks); None for
    anything else. numpy refuses what it cannot read as it is (a device, a gradient that itself
    requires grad, a conjugate or negative view, sparse), and the pass answers None for a NaN, an
    Inf, squares near overflow or another dtype."""
    if type(g) is not torch.Tensor:
        return None
    try:
        a = g.numpy()
        found = fused(a if a.flags.c_contiguous else a.T)  # a weight's gradient arrives transposed
    except (RuntimeError, TypeError, ValueError, BufferError):  # not dense either way: strided
        return None
    return None if found is None else found[3]


class DeferredScalars:
    """Scalars of device tensors, kept on the device until `read` copies them all at once."""

    def __init__(self):
        self._pending: list[tuple[torch.Tensor, Callable[[float], None]]] = []

    def later(self, t: torch.Tensor, fill: Callable[[float], None]) -> None:
        """Call `fill` with the value of the 0-dim (or one-element) device tensor `t` at `read`."""
        self._pending.append((t, fill))

    def read(self) -> None:
        """Fill every deferred value in: one transfer per device."""
        pending, self._pending = self._pending, []
        by_device: dict = {}
        for entry in pending:
            by_device.setdefault(entry[0].device, []).append(entry)
        with no_torch_function():
            for entries in by_device.values():
                values = torch.stack([t.detach().reshape(()).to(torch.float64) for t, _ in entries]).cpu().tolist()
                for (_, fill), v in zip(entries, values):
                    fill(v)


class LeafNorms:
    """The squared norms of the gradients one pass sent into leaves (or `autograd.grad` returned):
    a CPU gradient's summed now, a device gradient's reduced on its device and summed there."""

    def __init__(self):
        self.host = 0.0
        self.device: list[torch.Tensor] = []
        self.count = 0

    def add(self, g) -> None:
        if not isinstance(g, torch.Tensor):
            return
        self.count += 1
        if g.is_cpu:
            self.host += _squared_norm_now(g)
        else:
            self.device.append(torch.linalg.vector_norm(g.detach(), dtype=torch.float64))

    def add_all(self, grads: list) -> None:
        """`add` of each (a pass's leaves' `.grad`s): one compiled pass each where it is built,
        else the CPU float ones of one dtype in one call of torch's `_foreach_norm`."""
        grads = [g for g in grads if isinstance(g, torch.Tensor)]
        squares = _preview._fused_squares
        if squares is not None and _preview._fused_preview is not None:
            # all in one compiled call, each read in place (a loop's four grads: 2.6 us, against 4.6 one
            # by one through numpy, timeit); what it leaves (a NaN, an Inf, another dtype or layout) takes `add`'s paths
            total, count, rest = squares(grads)
            self.host += total
            self.count += count
            for g in rest:
                self.add(g)
            return
        fused = _preview._fused_stats
        if fused is not None:  # one compiled pass each beats torch's batched call on a loop's grads
            for g in grads:
                sq = _fused_squares(g, fused)
                if sq is None:
                    self.add(g)  # a NaN, an Inf, another dtype or layout, a device: the exact paths
                else:
                    self.host += sq
                    self.count += 1
            return
        batch = [g for g in grads if checkable(g) and g.dtype != torch.float16]
        if len(batch) < 2 or any(g.dtype != batch[0].dtype for g in batch):
            batch = []
        norms = foreach_norms(batch) if batch else None
        if norms is None:
            batch = []
        else:
            for g, n in zip(batch, norms):
                # in the gradient's own dtype a large finite gradient's norm overflows: float64 then
                self.host += n * n if math.isfinite(n) else _squared_norm_now(g)
            self.count += len(batch)
        done = {id(g) for g in batch}
        for g in grads:
            if id(g) not in done:
                self.add(g)

    def norm(self, deferred: DeferredScalars, fill: Callable[[float], None]) -> None:
        """Hand `fill` the total norm: now when every gradient was on the CPU, else at `deferred.read`."""
        if self.count == 0:
            return
        if not self.device:
            fill(math.sqrt(self.host))
            return
        host = self.host
        total = torch.stack(self.device).square().sum()
        deferred.later(total, lambda sq: fill(math.sqrt(sq + host)))


def loss_value(roots, deferred: DeferredScalars, fill: Callable[[float], None]) -> None:
    """The value of a single one-element root (a loss): now on the CPU, at `deferred.read` on a device."""
    if len(roots) != 1 or not isinstance(roots[0], torch.Tensor) or roots[0].numel() != 1:
        return
    d = roots[0]
    if d.is_complex() or d.is_meta:
        return
    if d.is_cpu:
        fill(d.item())
    else:
        d = d.detach()
        deferred.later(d.reshape(()).to(torch.float64, copy=True), fill)  # its value now, in stream order


#: ops whose output is leftover memory (as explain/wording.py's UNINITIALISED_OPS): never a NaN anyone made
UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "empty_permuted"})
