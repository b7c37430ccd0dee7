"""Bounded previews of tensor values: the only place that reads tensor data.

A preview never keeps the tensor alive and never copies more than a few
hundred elements: small tensors are copied whole, large ones as the edge
items torch's own printer shows, plus exact min/max/mean/norm.
"""

from __future__ import annotations

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
            idx = torch.cat([torch.arange(EDGE), torch.arange(size - EDGE, size)])
            t = t.index_select(dim, idx)
    return t


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16 or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.to(torch.float32)
    return t.cpu().resolve_conj().resolve_neg().numpy().copy()


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
    with torch.no_grad():
        d = t.detach()
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
