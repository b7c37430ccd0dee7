"""Bounded previews of tensor values: the only place that reads tensor data.

A preview never keeps the tensor alive and never copies more than a few
hundred elements: small tensors are copied whole, large ones as the edge
items torch's own printer shows, plus exact min/max/mean/norm.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ._records import Preview

FULL_LIMIT = 64  # tensors up to this many elements are copied whole
EDGE = 3  # edge items per dimension for large tensors, as torch prints
EDGE_LIMIT = 512  # largest summarized block we keep before falling back to a flat head
STATS_LIMIT = 50_000_000  # above this, stats cost too much per op; say so instead


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


def _edge_block_np(a: np.ndarray) -> np.ndarray:
    for dim, size in enumerate(a.shape):
        if size > 2 * EDGE:
            head = [slice(None)] * a.ndim
            tail = [slice(None)] * a.ndim
            head[dim], tail[dim] = slice(0, EDGE), slice(size - EDGE, size)
            a = np.concatenate([a[tuple(head)], a[tuple(tail)]], axis=dim)
    return a


def _norm(a: np.ndarray) -> float:
    # Plain ufuncs, never BLAS: OpenBLAS's thread pool spinning next to
    # torch's OpenMP pool slowed the user's own ops several-fold.
    if a.size <= 1_000_000:
        return float(np.sqrt(np.einsum("i,i->", a, a)))  # a C loop, no BLAS, no temporary
    return float(torch.linalg.vector_norm(torch.from_numpy(np.ascontiguousarray(a)) if not a.flags.c_contiguous else torch.from_numpy(a)))


_CHUNK = 1 << 20


def _sums(a: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares in float64, one bounded chunk at a time.

    `a.flat[i:j]` copies just those elements, whatever the strides, so a
    non-contiguous view or an integer tensor never gets a full-size copy.
    """
    total = squares = 0.0
    for start in range(0, a.size, _CHUNK):
        chunk = a.flat[start : start + _CHUNK].astype(np.float64, copy=False)
        total += float(np.add.reduce(chunk))
        squares += float(np.einsum("i,i->", chunk, chunk))
    return total, squares


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int8, torch.int16, torch.int32,
                 torch.int64, torch.uint8, torch.bool}


def _numpy_preview(p: Preview, a: np.ndarray, with_stats: bool) -> None:
    """Values and stats from a zero-copy numpy view: one pass each, no torch kernels."""
    n = a.size
    if n <= FULL_LIMIT:
        p.values = a.copy()
    else:
        block = _edge_block_np(a)
        if block.size <= EDGE_LIMIT:
            p.values = np.array(block)
            p.summarized = True
        else:
            p.values = a.flat[:FULL_LIMIT]  # copies just these, whatever the strides
            p.flat_head = True
    if not with_stats or n == 0:
        return
    if n > STATS_LIMIT:
        p.note = "statistics skipped: tensor too large"
        return
    src = p.values if n <= FULL_LIMIT else a
    if src.dtype == np.bool_:
        count = int(np.count_nonzero(src))
        p.min, p.max, p.mean, p.norm = float(count == n), float(count > 0), count / n, float(np.sqrt(count))
        return
    p.min, p.max = float(src.min()), float(src.max())
    if src.dtype.kind != "f" or not (src.flags.c_contiguous or src.flags.f_contiguous):
        with np.errstate(all="ignore"):  # inf/nan: no RuntimeWarning in the user's cell
            total, squares = _sums(src)
        p.mean, p.norm = total / n, float(np.sqrt(squares))
    else:
        # numpy's pairwise float sum is accurate; the norm a plain C loop: no copies.
        # Memory order ('K') makes a transposed tensor (a weight's grad) a view too.
        flat = src.ravel(order="K")
        with np.errstate(all="ignore"):  # inf/nan: no RuntimeWarning in the user's cell
            p.mean = float(np.add.reduce(flat)) / n  # pairwise float sum: fast and accurate
            p.norm = _norm(flat)


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
        with torch._C.DisableTorchFunction():
            return fn(*args, **kwargs)

    return wrapper


@quietly
def preview(t: torch.Tensor, with_stats: bool = True) -> Preview:
    """A bounded, detached picture of `t` now. Never raises."""
    try:
        return _preview(t, with_stats)
    except Exception as exc:  # a preview must never break the user's cell
        shape = tuple(getattr(t, "shape", ()))
        return Preview(shape=shape, dtype=str(getattr(t, "dtype", "?")), note=f"no preview: {exc}")


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
    if True:  # detach() alone reads without recording anything; no_grad's setup cost 20 us a call
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
                v = p.values.astype(np.float64)
                if v.size:
                    with np.errstate(all="ignore"):  # inf/nan values: no RuntimeWarning in the user's cell
                        p.min, p.max, p.mean = float(v.min()), float(v.max()), float(v.mean())
                        p.norm = float(np.sqrt((v * v).sum()))
            else:
                p.min, p.max, p.mean, p.norm = _stat(d)
        elif with_stats:
            p.note = "statistics skipped: tensor too large"
    return p
