"""Values printed the way `print(tensor)` prints them, from a Preview alone.

Students recognise `tensor([[ 5.,  8., 11.], ...], grad_fn=<AddBackward0>)`;
this module reproduces torch's printer (precision 4, integer-valued floats as
`5.`, scientific notation for wide ranges, `...` for summarized dimensions)
without calling torch.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..data.trace import Preview, Record

PRECISION = 4
_DEFAULT_DTYPES = {"torch.float32", "torch.int64", "torch.bool", "torch.complex64"}


def _float_formatter(vals: np.ndarray):
    finite = vals[np.isfinite(vals)]
    nonzero = np.abs(finite[finite != 0])
    int_mode = bool(np.all(finite == np.ceil(finite)))
    sci = False
    if nonzero.size:
        lo, hi = float(nonzero.min()), float(nonzero.max())
        if int_mode:
            sci = hi / lo > 1000.0 or hi > 1e8
        else:
            sci = hi / lo > 1000.0 or hi > 1e8 or lo < 1e-4
    if sci:
        return lambda v: _special(v) or f"{v:.{PRECISION}e}"
    if int_mode:
        return lambda v: _special(v) or f"{v:.0f}."
    return lambda v: _special(v) or f"{v:.{PRECISION}f}"


def _special(v: float) -> Optional[str]:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return None


def _element_formatter(vals: np.ndarray):
    if vals.dtype == np.bool_:
        return lambda v: "True" if v else "False"
    if np.iscomplexobj(vals):
        return lambda v: f"{v.real:.{PRECISION}f}{v.imag:+.{PRECISION}f}j"
    if np.issubdtype(vals.dtype, np.integer):
        return lambda v: str(int(v))
    return _float_formatter(vals.astype(np.float64))


def format_values(p: Preview, indent: int = 7) -> str:
    """The bracketed body torch prints, e.g. `[[1., 2.],\\n        [3., 4.]]`."""
    if p.values is None:
        return f"<{p.note or 'no values'}>"
    vals = np.asarray(p.values)
    if p.flat_head:
        fmt = _element_formatter(vals)
        return "[" + ", ".join(fmt(v) for v in vals.reshape(-1)) + ", ...]"
    fmt = _element_formatter(vals)
    if vals.ndim == 0:
        return fmt(vals.item())
    cells = [fmt(v) for v in vals.reshape(-1)]
    width = max((len(c) for c in cells), default=0)
    it = iter(c.rjust(width) for c in cells)
    summarize = p.summarized

    def block(shape: tuple, full_shape: tuple, depth: int) -> str:
        n, full_n = shape[0], full_shape[0]
        cut = summarize and full_n > n  # only dims that were actually cut get "..."
        if len(shape) == 1:
            items = [next(it) for _ in range(n)]
            if cut:
                half = n // 2
                items = items[:half] + [" ..."] + items[half:]
            return "[" + ", ".join(items) + "]"
        parts = [block(shape[1:], full_shape[1:], depth + 1) for _ in range(n)]
        if cut:
            half = n // 2
            parts = parts[:half] + ["..."] + parts[half:]
        sep = "," + "\n" * (len(shape) - 1) + " " * (indent + depth + 1)
        return "[" + sep.join(parts) + "]"

    return block(vals.shape, p.shape, 0)


def format_tensor(p: Optional[Preview], grad_fn: Optional[str] = None, requires_grad: bool = False) -> str:
    """The whole `tensor(...)` line(s) as `print(tensor)` shows them."""
    if p is None:
        return "—"
    if p.note and p.values is None:
        return f"tensor(<{p.note}>, size={list(p.shape)})"
    body = format_values(p)
    suffix = []
    if p.numel == 0:
        body = "[]"
        suffix.append(f"size={tuple(p.shape)}")
    if p.dtype not in _DEFAULT_DTYPES:
        suffix.append(f"dtype={p.dtype}")
    if p.device != "cpu":
        suffix.append(f"device='{p.device}'")
    if grad_fn:
        suffix.append(f"grad_fn=<{grad_fn}>")
    elif requires_grad:
        suffix.append("requires_grad=True")
    return "tensor(" + body + "".join(", " + s for s in suffix) + ")"


def format_record_value(r: Record) -> str:
    return format_tensor(r.preview, r.grad_fn, r.requires_grad and r.grad_fn is None)


def format_short(p: Optional[Preview], limit: int = 48) -> str:
    """One line for tables and graph nodes: `63.`, `[10., 16., 22.]`, `[2x3] mean 4.5`."""
    if p is None:
        return "—"
    if p.values is None:
        return f"[{'x'.join(map(str, p.shape))}] {p.note or ''}".strip()
    text = " ".join(format_values(p, indent=0).split())
    if len(text) <= limit:
        return text
    dims = "x".join(map(str, p.shape))
    stats = f" mean {p.mean:.4g}" if p.mean is not None else ""
    return f"[{dims}]{stats}"


def format_shape(p: Optional[Preview]) -> str:
    if p is None:
        return ""
    return "(" + ", ".join(map(str, p.shape)) + ")" if p.shape else "()"


def format_stats(p: Optional[Preview]) -> str:
    if p is None:
        return ""
    parts = []
    for key in ("min", "max", "mean", "norm"):
        v = getattr(p, key)
        if v is not None:
            parts.append(f"{key} {v:.4g}")
    return "  ".join(parts)
