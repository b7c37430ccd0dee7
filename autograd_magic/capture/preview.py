"""Bounded previews of tensor values: the only place that reads tensor data.

A preview never keeps the tensor alive and never copies more than a few
hundred elements: small tensors are copied whole, large ones as the edge
items torch's own printer shows, plus exact min/max/mean/norm.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from typing import Optional

import numpy as np
import torch

from ..data.trace import Preview
from .torch_compat import no_torch_function, version_of
from .. import limits

FULL_LIMIT = limits.PREVIEW_FULL
EDGE = limits.PREVIEW_EDGE
EDGE_LIMIT = limits.PREVIEW_EDGE_BLOCK
STATS_LIMIT = limits.STATS_ELEMENTS
COPY_LIMIT = limits.PREVIEW_COPY_BYTES


def _stat(t: torch.Tensor) -> tuple:
    """min, max, mean, norm as Python floats (None where undefined)."""
    if t.numel() == 0:
        return None, None, None, None
    if t.dtype == torch.bool:
        n = int(t.count_nonzero())
        lo = 1.0 if n == t.numel() else 0.0
        return lo, 1.0 if n else 0.0, n / t.numel(), math.sqrt(n)
    if t.is_complex():
        a = t.abs()  # the modulus: the only ordering complex numbers have
        return float(a.min()), float(a.max()), None, float(torch.linalg.vector_norm(t))
    if not t.is_floating_point():
        lo, hi = t.aminmax()
        total = t.sum(dtype=torch.float64)
        sq = (t.to(torch.float64) ** 2).sum() if t.numel() <= FULL_LIMIT * 16 else None
        return float(lo), float(hi), float(total) / t.numel(), (math.sqrt(float(sq)) if sq is not None else None)
    lo, hi = t.aminmax()
    return float(lo), float(hi), float(t.mean()), float(torch.linalg.vector_norm(t))


def _edge_block(t: torch.Tensor) -> torch.Tensor:
    """The sub-tensor torch's printer shows: first/last EDGE items on each long dim."""
    for dim, size in enumerate(t.shape):
        if size > 2 * EDGE:
            t = torch.cat([t.narrow(dim, 0, EDGE), t.narrow(dim, size - EDGE, EDGE)], dim)
    return t


_EINSUM_LIMIT = 1_000_000  # einsum's vector sums keep a float32 total exact to ~1e-7 up to about here


try:  # np.einsum without its Python wrapper (~0.7 us a call); the same C loops
    from numpy._core.multiarray import c_einsum as _c_einsum
except ImportError:  # numpy 1.x
    try:
        from numpy.core.multiarray import c_einsum as _c_einsum
    except ImportError:
        _c_einsum = np.einsum


def _norm(a: np.ndarray) -> float:
    # Plain ufuncs, never BLAS: OpenBLAS's thread pool spinning next to
    # torch's OpenMP pool slowed the user's own ops several-fold.
    if a.size <= _EINSUM_LIMIT:
        return math.sqrt(float(_c_einsum("i,i->", a, a)))  # a C loop, no BLAS, no temporary
    return float(torch.linalg.vector_norm(torch.from_numpy(np.ascontiguousarray(a)) if not a.flags.c_contiguous else torch.from_numpy(a)))


def _sum(flat: np.ndarray) -> float:
    # einsum's sum runs in vector registers, twice as fast as the pairwise
    # ufunc sum and as accurate at these sizes; pairwise beyond them
    return float(_c_einsum("i->", flat) if flat.size <= _EINSUM_LIMIT else np.add.reduce(flat))


def _sums(a: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares in float64, with no full-size copy.

    Both reductions cast to float64 in the iterator's small buffers, whatever
    the strides, so a non-contiguous view or an integer tensor never gets a
    full-size copy.
    """
    axes = list(range(a.ndim))
    total = float(np.add.reduce(a, axis=None, dtype=np.float64))
    squares = float(np.einsum(a, axes, a, axes, [], dtype=np.float64))
    return total, squares


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.uint8, torch.bool}


def _numpy_preview(p: Preview, a: np.ndarray, with_stats: bool) -> None:
    """Values and stats from a zero-copy numpy view: one pass each, no torch kernels, no full copy."""
    n = a.size
    if n <= FULL_LIMIT:
        p.values = a.copy()
    else:
        index = _edge_index(a.shape)
        if index is not None:
            if a.flags.c_contiguous:  # most intermediates and gradients: one `take` of cached flat indices
                flat_index, block, _ = _flat_edge_index(a.shape, index)
                p.values = a.reshape(-1).take(flat_index).reshape(block)
            else:
                p.values = a[index]  # fancy indexing copies just the edge block
            p.summarized = True
        else:
            p.values = a.flat[:FULL_LIMIT]  # copies just these, whatever the strides
            p.flat_head = True
    if not with_stats or n == 0:
        return
    if n > STATS_LIMIT:
        p.note = "statistics skipped: tensor too large"
    elif a.dtype == np.bool_:
        count = int(np.count_nonzero(p.values if n <= FULL_LIMIT else a))
        p.min, p.max, p.mean, p.norm = float(count == n), float(count > 0), count / n, float(np.sqrt(count))
    elif n <= FULL_LIMIT:
        _small_stats(p, p.values)
    elif 0 in a.strides:
        _expanded_stats(p, a, n)
    else:
        _large_stats(p, a, n)


def _expanded_stats(p: Preview, a: np.ndarray, n: int) -> None:
    """An expanded tensor (stride 0: a loss's gradient out of mean/sum) repeats its base's
    elements, each as often: its statistics are the base's, the norm times sqrt(repeats)."""
    base = a[tuple(slice(0, 1) if st == 0 else slice(None) for st in a.strides)]
    m = base.size
    q = Preview(shape=base.shape, dtype=p.dtype)
    if m <= FULL_LIMIT:
        _small_stats(q, base.copy())
    else:
        _large_stats(q, base, m)
    p.min, p.max, p.mean = q.min, q.max, q.mean
    p.norm = q.norm * math.sqrt(n // m) if q.norm is not None else None
    # The base's sums are taken over m elements, torch's (and the dense path's) over all n in the
    # tensor's own dtype: where those overflow it shows inf, and so does this preview.
    top = _FLOAT_MAX.get(a.dtype.itemsize) if a.dtype.kind == "f" else None
    if top is not None:
        if p.mean is not None and math.isfinite(p.mean) and abs(p.mean) * n > top:
            p.mean = math.copysign(math.inf, p.mean)
        if p.norm is not None and math.isfinite(p.norm) and p.norm > math.sqrt(top):
            p.norm = math.inf


_FLOAT_MAX = {4: float(np.finfo(np.float32).max), 8: float(np.finfo(np.float64).max)}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16 or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.float32)
    return t.cpu().resolve_conj().resolve_neg().numpy().copy()


def quietly(fn):
    """Run `fn` with torch-function dispatch off.

    The tracer's own reads and previews happen inside our mode's handler,
    where a user's mode below ours (or a tensor subclass) would still see
    them: they are not the user's ops.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_torch_function():
            return fn(*args, **kwargs)

    return wrapper


@quietly
def preview(t: torch.Tensor, with_stats: bool = True) -> Preview:
    """A bounded, detached picture of `t` now. Never raises."""
    return preview_quiet(t, with_stats)


def preview_quiet(t: torch.Tensor, with_stats: bool = True) -> Preview:
    """`preview` for callers already inside `quietly` (the tracer's hot path).

    While a tracer has a `DeviceQueue` active, a device tensor's preview is
    taken on its device and comes back to the host with the queue's next
    flush (its fields are filled then); a CPU tensor's is taken now.
    """
    try:
        queue = _active_queue
        if queue is not None and (queue.include_cpu or not t.is_cpu) and queue.takes(t):  # a CPU tensor: not queued
            return queue.add(t, with_stats)
        kind = type(t)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            if _fused_preview is not None:  # the common case in one compiled call (capture/_fused.c)
                p = _fused_preview(t, with_stats)
                if p is not None:
                    return p
            name = _FAST_DTYPES.get(t.dtype)
            if name is not None and t.is_cpu and t.layout == torch.strided and not t.is_neg():
                # the common case, kept lean: a float tensor on the CPU
                a = t.detach().numpy()
                shape = a.shape
                if a.size > FULL_LIMIT:
                    # larger than a full copy and dense (C order, or F order: a weight's gradient as
                    # mm sends it): the same reductions as `_numpy_preview`, over memory order
                    if a.flags.c_contiguous:
                        edge = _FLAT_EDGE.get(shape) or _edge_of(shape)
                        if edge is not None:
                            flat = a.reshape(-1)
                            p = Preview(shape, name, values=flat.take(edge[0]).reshape(edge[1]), summarized=True)
                            if with_stats:
                                _flat_stats(p, flat, edge[2])
                            return p
                    elif a.flags.f_contiguous:
                        at = a.T  # C order: its edge block is the transpose of `a`'s
                        edge = _FLAT_EDGE.get(at.shape) or _edge_of(at.shape)
                        if edge is not None:
                            flat = at.reshape(-1)
                            values = np.ascontiguousarray(flat.take(edge[0]).reshape(edge[1]).T)
                            p = Preview(shape, name, values=values, summarized=True)
                            if with_stats:
                                _flat_stats(p, flat, edge[2])
                            return p
                p = Preview(shape=shape, dtype=name)
                _numpy_preview(p, a, with_stats)
                return p
        return _preview(t, with_stats)
    except Exception as exc:  # a preview must never break the user's cell
        return _unpreviewable(t, exc)


def _unpreviewable(t, exc: Exception) -> Preview:
    """What is shown of a tensor no preview reads: a nested tensor (its components' shapes differ: no
    one shape, no values), or one whose read failed (said why)."""
    try:
        if getattr(t, "is_nested", False):
            return Preview(shape=(t.size(0),), dtype=str(t.dtype), device=str(t.device), layout="nested",
                           note=f"a nested tensor of {t.size(0)} components of different shapes: values not shown")
        shape = tuple(getattr(t, "shape", ()))
    except Exception:  # not even its shape
        shape = ()
    return Preview(shape=shape, dtype=str(getattr(t, "dtype", "?")), note=f"no preview: {exc}")


_FAST_DTYPES = {torch.float32: "torch.float32", torch.float64: "torch.float64"}

try:  # the one compiled part (setup.py): min, max, sum and sum of squares of a dense block in one pass
    from . import _fused

    # None where no kernel of it runs on this CPU (not x86-64 with AVX2 or AVX-512)
    _fused_stats = _fused.stats if _fused.kernels() else None
except ImportError:  # not built (no C compiler at install): numpy's four passes, the same statistics
    _fused_stats = None

# A dense CPU float tensor's whole preview, read in place, where the kernels run: the same Preview
# the numpy path below makes, or None for what only that path handles (a NaN or an Inf among them)
_fused_preview = None
if _fused_stats is not None and hasattr(_fused, "preview"):
    _fused.configure_preview(Preview, np.empty, torch.float32, torch.float64, np.float32, np.float64,
                             "torch.float32", "torch.float64", torch.strided, torch.Tensor, torch.nn.Parameter,
                             FULL_LIMIT, EDGE, EDGE_LIMIT, STATS_LIMIT)
    _fused_preview = _fused.preview
# The squares of a pass's gradients past --limit, read in place the same way (finite.py's LeafNorms)
_fused_squares = _fused.squares if _fused_preview is not None and hasattr(_fused, "squares") else None


def _fused_filled(p: Preview, flat: np.ndarray, n: int) -> bool:
    """min/max/mean/norm of a C-contiguous float block in one pass; False (nothing set) for a
    NaN, an Inf, squares near the dtype's overflow or another dtype: numpy's exact path then."""
    found = _fused_stats(flat)
    if found is None:
        return False
    p.min, p.max, total, squares = found
    p.mean, p.norm = total / n, math.sqrt(squares)
    return True


# ---- device tensors: reduced where they live, read back in batches ----------------------

_DEFERRED_DTYPES = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
_active_queue: Optional["DeviceQueue"] = None
#: tests only: CPU float tensors take the deferred path too, so its logic runs without a GPU
DEFER_CPU = False


def activate(queue: Optional["DeviceQueue"]) -> Optional["DeviceQueue"]:
    """Make `queue` the one `preview_quiet` defers into; returns the one it replaces."""
    global _active_queue
    previous, _active_queue = _active_queue, queue
    return previous


class DeviceQueue:
    """Previews of device tensors taken with no host synchronisation per op.

    Reading a CUDA tensor's values or a statistic on the host waits for the
    device (a sync per op). Instead each op queues, on the tensor's own
    device and in stream order, a copy of the values a preview shows (at most
    PREVIEW_EDGE_BLOCK elements) and one float64 vector of its exact
    statistics (min, max, sum, sum of squares). `flush` concatenates what is
    queued and copies it to the host in one transfer per device and dtype,
    then fills the previews in. The tracer flushes when the queue holds
    PREVIEW_QUEUE previews and when its run ends; until then the queued
    previews' fields are empty (nothing reads them during a run). Float dtypes
    only; integer and bool device tensors are read at once.
    """

    def __init__(self, include_cpu: bool = False, limit: int = limits.PREVIEW_QUEUE):
        self.include_cpu = include_cpu or DEFER_CPU
        self.limit = limit
        self._pending: list[tuple] = []  # (preview, values block, stats or None)
        self.flushes = 0
        self.host_copies = 0  # device-to-host transfers made, all flushes together

    def takes(self, t) -> bool:
        if t.is_cpu and not self.include_cpu:
            return False
        return (
            (type(t) is torch.Tensor or type(t) is torch.nn.Parameter)
            and t.dtype in _DEFERRED_DTYPES
            and t.layout == torch.strided
            and not t.is_meta
            and not t.is_neg()
        )

    def add(self, t: torch.Tensor, with_stats: bool) -> Preview:
        d = t.detach()
        shape = tuple(d.shape)
        p = Preview(shape=shape, dtype=str(d.dtype), device=str(d.device), layout="strided")
        n = d.numel()
        if n <= FULL_LIMIT:
            block = d.clone()
        else:
            block = _edge_block(d)  # torch.cat: already a copy
            if block.numel() <= EDGE_LIMIT:
                p.summarized = True
            else:
                block = d.reshape(-1)[:FULL_LIMIT].clone()
                p.flat_head = True
        if d.dtype == torch.bfloat16:
            block = block.to(torch.float32)  # as `_to_numpy` shows it: numpy has no bfloat16
        stats = None
        if with_stats and n:
            if n > STATS_LIMIT:
                p.note = "statistics skipped: tensor too large"
            else:
                lo, hi = torch.aminmax(d)
                stats = torch.stack([
                    lo.to(torch.float64), hi.to(torch.float64), d.sum(dtype=torch.float64),
                    torch.linalg.vector_norm(d, dtype=torch.float64),
                ])
        self._pending.append((p, block, stats))
        if len(self._pending) >= self.limit:
            self.flush()
        return p

    def flush(self) -> None:
        """Copy every queued preview to the host (one transfer per device and dtype) and fill them in."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        self.flushes += 1
        try:
            self._fill(pending)
        except Exception as exc:  # a preview must never break the user's cell
            for p, _, _ in pending:
                if p.values is None:
                    p.note = f"no preview: {exc}"

    def _fill(self, pending: list) -> None:
        groups: dict[tuple, list] = {}
        for entry in pending:
            groups.setdefault((entry[1].device, entry[1].dtype), []).append(entry)
        for entries in groups.values():
            host = self._to_host(torch.cat([b.reshape(-1) for _, b, _ in entries]))
            at = 0
            for p, b, _ in entries:
                k = b.numel()
                p.values = host[at : at + k].reshape(tuple(b.shape))
                at += k
        with_stats = [(p, s) for p, _, s in pending if s is not None]
        by_device: dict = {}
        for p, s in with_stats:
            by_device.setdefault(s.device, []).append((p, s))
        for entries in by_device.values():
            host = self._to_host(torch.stack([s for _, s in entries]))
            for (p, _), (lo, hi, total, norm) in zip(entries, host.tolist()):
                p.min, p.max, p.mean, p.norm = lo, hi, total / p.numel, norm

    def _to_host(self, t: torch.Tensor) -> np.ndarray:
        self.host_copies += 1
        return t.cpu().numpy()
_minimum, _maximum = np.minimum.reduce, np.maximum.reduce


# shape -> (flat indices of the edge block, its shape, element count): filled by
# `_flat_edge_index` for shapes past PREVIEW_FULL whose edge block fits (the fast path's test)
_FLAT_EDGE: dict = {}


def _flat_edge_index(shape: tuple, index: tuple):
    """`index` (the edge block's) as positions in the flattened tensor, and the block's shape."""
    hit = _FLAT_EDGE.get(shape)
    if hit is None:
        grid = np.ravel_multi_index(np.broadcast_arrays(*index), shape)
        n = 1
        for s in shape:
            n *= s
        hit = (grid.reshape(-1), grid.shape, n)
        if len(_FLAT_EDGE) < 4096:
            _FLAT_EDGE[shape] = hit
    return hit


def _edge_of(shape: tuple):
    """`_flat_edge_index` of a shape past PREVIEW_FULL, or None when its edge block is too large."""
    index = _edge_index(shape)
    return _flat_edge_index(shape, index) if index is not None else None


def _flat_stats(p: Preview, flat: np.ndarray, n: int) -> None:
    """min/max/mean/norm of a contiguous float array, as `_numpy_preview` computes them."""
    if n > STATS_LIMIT or n > _EINSUM_LIMIT:
        if n > STATS_LIMIT:
            p.note = "statistics skipped: tensor too large"
        else:
            _large_stats(p, flat, n)
        return
    if _fused_stats is not None and _fused_filled(p, flat, n):
        return
    lo, hi = float(_minimum(flat)), float(_maximum(flat))
    p.min, p.max = lo, hi
    big = max(abs(lo), abs(hi))  # nan when any element is nan
    if big * big * n < _SAFE_SQUARES.get(flat.dtype.itemsize, 0.0):  # no inf/nan, no overflow
        p.mean = float(_c_einsum("i->", flat)) / n
        p.norm = math.sqrt(float(_c_einsum("i,i->", flat, flat)))
        return
    with np.errstate(all="ignore"):  # inf/nan/overflow: no RuntimeWarning in the user's cell
        _sum_and_norm(p, flat, n)


_EDGE_INDEX: dict = {}  # shape -> numpy index of the edge block, or None when too large


def _edge_index(shape: tuple):
    hit = _EDGE_INDEX.get(shape, False)
    if hit is not False:
        return hit
    axes, size = [], 1
    for s in shape:
        if s > 2 * EDGE:
            axes.append(np.r_[0:EDGE, s - EDGE : s])
            size *= 2 * EDGE
        else:
            axes.append(np.arange(s))
            size *= s
    index = np.ix_(*axes) if size <= EDGE_LIMIT else None
    if len(_EDGE_INDEX) < 4096:
        _EDGE_INDEX[shape] = index
    return index


def _small_stats(p: Preview, v: np.ndarray) -> None:
    # Up to PREVIEW_FULL elements: Python's own loops over one list beat five
    # numpy calls (each ~1 us of overhead on a few elements). A finite sum means
    # every element is finite; otherwise (inf, nan, an overflowing sum) numpy's
    # exact path below, which handles each of them.
    if _fused_stats is not None and v.dtype.kind == "f" and v.flags.c_contiguous and _fused_filled(p, v, v.size):
        return
    items = v.ravel().tolist()
    try:
        total = math.fsum(items)
    except (ValueError, OverflowError):  # inf - inf, or finite values whose sum overflows
        total = math.nan
    if math.isfinite(total):
        n = len(items)
        p.min, p.max, p.mean = float(min(items)), float(max(items)), total / n
        p.norm = math.sqrt(math.fsum(map(operator.mul, items, items)))
        if math.isfinite(p.norm):
            return
    # Finiteness is read before the float64 cast: casting a signaling NaN (e.g.
    # from uninitialized memory) warns "invalid value encountered in cast".
    if np.isfinite(v).all():
        v = v.astype(np.float64, copy=False)
        p.min, p.max, p.mean = float(v.min()), float(v.max()), float(v.mean())
        with np.errstate(over="ignore"):  # float64 values past 1e154: the squares overflow to inf, as torch's norm does
            p.norm = float(np.sqrt((v * v).sum()))
        return
    with np.errstate(all="ignore"):  # inf/nan values: no RuntimeWarning in the user's cell
        v = v.astype(np.float64, copy=False)
        p.min, p.max, p.mean = float(v.min()), float(v.max()), float(v.mean())
        p.norm = float(np.sqrt((v * v).sum()))


def _large_stats(p: Preview, a: np.ndarray, n: int) -> None:
    # numpy on one thread: torch's reductions wake its thread pool for each
    # call, which on a busy 2-core machine cost 2-5x more, erratically.
    if _fused_stats is not None and a.dtype.kind == "f" and a.dtype.itemsize >= 4 and (
        a.flags.c_contiguous or a.flags.f_contiguous or _dense_permutation(a.shape, [st // a.itemsize for st in a.strides])
    ) and _fused_filled(p, a.ravel(order="K"), n):  # dense in any axis order: one pass over its memory block
        return
    p.min, p.max = lo, hi = float(_minimum(a, axis=None)), float(_maximum(a, axis=None))  # the ufuncs: no wrapper
    big = max(abs(lo), abs(hi))  # nan when any element is nan
    if big * big * n < _SAFE_SQUARES.get(a.dtype.itemsize, 0.0):  # no inf/nan, no overflow: skip errstate (~2 us)
        _sum_and_norm(p, a, n)
        return
    with np.errstate(all="ignore"):  # inf/nan/overflow: no RuntimeWarning in the user's cell
        _sum_and_norm(p, a, n)


_SAFE_SQUARES = {4: 1e37, 8: 1e300}


def _sum_and_norm(p: Preview, a: np.ndarray, n: int) -> None:
    if a.dtype.kind == "f" and a.dtype.itemsize >= 4:
        if a.flags.c_contiguous or a.flags.f_contiguous or _dense_permutation(a.shape, [st // a.itemsize for st in a.strides]):
            # sum and norm each one vector C loop; memory order ('K') makes a transposed
            # or permuted tensor (a weight's grad, attention's heads) a view too, summed in
            # the order its contiguous base is, so both show the same statistics
            flat = a.ravel(order="K")
        elif a.nbytes <= COPY_LIMIT:
            # a strided view (attention's heads, a slice): one compact copy, then the
            # same vector loops; ten times faster than striding through it twice
            flat = np.ascontiguousarray(a).reshape(-1)
        else:
            total, squares = _sums(a)
            p.mean, p.norm = total / n, float(np.sqrt(squares))
            return
        p.mean = _sum(flat) / n
        p.norm = _norm(flat)
    else:  # integers, float16 (its own sums lose digits), sliced or expanded: float64 chunks, no full copy
        total, squares = _sums(a)
        p.mean, p.norm = total / n, float(np.sqrt(squares))


def _preview(t: torch.Tensor, with_stats: bool) -> Preview:
    shape = tuple(t.shape)
    p = Preview(shape=shape, dtype=str(t.dtype), device=str(t.device), layout=str(t.layout).replace("torch.", ""))
    if t.is_meta or t.device.type == "meta":
        p.note = "meta tensor: shape only, no data"
        return p
    if t.layout != torch.strided:
        p.note = f"{p.layout} tensor: values not shown"
        return p
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        t = t.as_subclass(torch.Tensor)  # subclasses: read the plain data
    # detach() alone reads without recording anything; no_grad's setup cost 20 us a call
    d = t.detach()
    if d.device.type == "cpu" and d.dtype in _NUMPY_DTYPES and not d.is_conj() and not d.is_neg():
        _numpy_preview(p, d.numpy(), with_stats)
        return p
    n = d.numel()
    if n <= FULL_LIMIT:
        p.values = _to_numpy(d)
    else:
        block = _edge_block(d)
        if block.numel() <= EDGE_LIMIT:
            p.values = _to_numpy(block)
            p.summarized = True
        else:
            p.values = _to_numpy(d.reshape(-1)[:FULL_LIMIT])
            p.flat_head = True
    if with_stats and n <= STATS_LIMIT:
        if n <= FULL_LIMIT and not d.is_complex():
            if p.values.size:
                _small_stats(p, p.values)
        else:
            p.min, p.max, p.mean, p.norm = _stat(d)
    elif with_stats:
        p.note = "statistics skipped: tensor too large"
    return p


def _dense_key(t: torch.Tensor) -> Optional[tuple]:
    """The memory block of a dense tensor in any axis order: a tensor and its transpose
    or permutation (attention's heads) hold the same elements, so the same statistics."""
    if not (t.is_contiguous() or _dense_permutation(t.shape, t.stride())):
        return None
    return (t.data_ptr(), t.numel(), t.dtype)


def _dense_permutation(shape, strides) -> bool:
    """The strides, sorted, are a contiguous tensor's: the elements fill one block of memory
    with no gaps and no overlaps (a transpose, permute, movedim of a contiguous tensor)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(strides, shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class PreviewCache:
    """Previews taken during one backward pass, shared so nothing is read twice.

    The same gradient object reaches the node that sent it and the node
    that receives it; a weight's gradient arrives transposed (TBackward). No user
    code runs between the hooks of one pass except the user's own hooks, so
    an entry is trusted only while its tensor is alive, at the same version
    and, for the memory-block entries, still at the same address.

    `get` is `_cached_preview` over this cache's two dicts, compiled where
    capture/_fused.c is built (`cache_get`: the hooks call it for every gradient).
    """

    def __init__(self):
        self._seen: dict[int, tuple] = {}  # id(t) -> (ref, preview, version)
        self._dense: dict[tuple, tuple] = {}  # (data_ptr, numel, dtype) -> (ref, (min, max, mean, norm), version)
        # `get(t)`: for callers already inside `quietly`. Never raises.
        self.get = functools.partial(_cache_get, self._seen, self._dense)

    @quietly  # reading `_version` is a property access a user's mode would see
    def __call__(self, t):
        return self.get(t)

    def many(self, tensors) -> list:
        return [self(t) for t in tensors]

    def version_seen(self, t) -> Optional[int]:
        """The version `t` had when this cache previewed it, if it did."""
        hit = self._seen.get(id(t))
        return hit[2] if hit is not None and hit[0]() is t else None


def _cached_preview(seen: dict, dense: dict, t):
    """`PreviewCache.get` over its dicts: `t`'s preview, read once per version. Never raises."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        version = version_of(t)
        if version is None:  # inference tensors: no version counter, so no way to trust a copy
            return preview_quiet(t)
        hit = seen.get(id(t))
        # the engine sums a node's incoming grads in place into the first one it got (version bumps)
        if hit is not None and hit[2] == version and hit[0]() is t:
            return hit[1]
        shown = _fresh(dense, t, version)
        seen[id(t)] = (weakref.ref(t), shown, version)
        return shown
    except Exception:  # e.g. functorch's wrapped tensors have no storage to point at
        return preview_quiet(t)


def _fresh(dense: dict, t: torch.Tensor, version: int) -> Preview:
    if type(t) is not torch.Tensor or t.numel() <= FULL_LIMIT or not t.is_cpu or t.layout != torch.strided:
        return preview_quiet(t)
    if t.is_neg() or t.is_conj():  # same memory, other values (`z.conj().imag` is a negative view)
        return preview_quiet(t)
    key = _dense_key(t)
    if key is None:
        return preview_quiet(t)
    hit = dense.get(key)
    if hit is not None and hit[2] == version:
        src = hit[0]()
        # alive (so its block cannot have been handed to another tensor) and still there
        if src is not None and version_of(src) == version and src.data_ptr() == key[0]:
            shown = preview_quiet(t, with_stats=False)  # the edge values differ; the statistics do not
            if shown.note is None:
                shown.min, shown.max, shown.mean, shown.norm = hit[1]
                return shown
    shown = preview_quiet(t)
    if shown.note is None and shown.norm is not None:
        dense[key] = (weakref.ref(t), (shown.min, shown.max, shown.mean, shown.norm), version)
    return shown


# PreviewCache.get: compiled where capture/_fused.c is built (its common case; the rest is
# `_cached_preview`'s), else `_cached_preview` itself
_cache_get = _cached_preview
if _fused_preview is not None and hasattr(_fused, "cache_get"):
    _fused.configure_cache(globals(), _cached_preview)
    _cache_get = _fused.cache_get
