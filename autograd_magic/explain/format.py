"""Values printed the way `print(tensor)` prints them, from a Preview alone.

Students recognise `tensor([[ 5.,  8., 11.], ...], grad_fn=<AddBackward0>)`;
this module reproduces torch's printer (torch/_tensor_str.py: precision 4,
integer-valued floats as `5.`, scientific notation for wide ranges, one width
per tensor, lines wrapped at 80 columns, `...` for summarized dimensions)
without calling torch. tests/test_format.py compares it with torch's own print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..data.trace import Preview, Record


@dataclass(frozen=True)
class PrintOptions:
    """The `torch.set_printoptions` settings a printout depends on (torch's defaults here).

    `threshold` and `edgeitems` are not among them: a Preview holds every element only up to
    `limits.PREVIEW_FULL` and otherwise torch's edge items (3 per long dimension), so a body
    is printed as torch prints it with `threshold=limits.PREVIEW_FULL` and `edgeitems=3`.
    """

    precision: int = 4
    sci_mode: Optional[bool] = None  # None: torch decides from the values
    linewidth: int = 80


DEFAULT_OPTIONS = PrintOptions()
PRECISION = DEFAULT_OPTIONS.precision
_DEFAULT_DTYPES = {"torch.float32", "torch.int64", "torch.bool", "torch.complex64"}


class _Formatter:
    """torch's `_Formatter` (torch/_tensor_str.py) over a numpy array: one width for all elements.

    The mode (integer-valued, scientific) and the width come from the nonzero finite values
    only, as torch's do; nan, inf and zeros are then padded to that width, or overflow it.
    The width is found without printing every value: a value's printed width grows with its
    magnitude on each side of zero (its integer digits, or its exponent's size away from 0),
    so the widest is among the largest and smallest magnitudes of each sign.
    """

    def __init__(self, vals: np.ndarray, opts: PrintOptions):
        self.opts = opts
        self.floating = vals.dtype.kind == "f"
        self.int_mode, self.sci_mode, self.max_width = True, False, 1
        flat = vals.reshape(-1)
        if not self.floating:
            if flat.size:
                extremes = (bool(flat.min()), bool(flat.max())) if flat.dtype.kind == "b" else (flat.min(), flat.max())
                self.max_width = max(len(self._plain(v)) for v in extremes)
            return
        flat = flat.astype(np.float64)
        with np.errstate(invalid="ignore"):
            finite = flat[np.isfinite(flat) & (flat != 0)]
        if finite.size == 0:
            return
        magnitude = np.abs(finite)
        lo, hi = float(magnitude.min()), float(magnitude.max())
        self.int_mode = bool(np.all(finite == np.ceil(finite)))
        auto = hi / lo > 1000.0 or hi > 1.0e8 or lo < 1.0e-4
        self.sci_mode = auto if opts.sci_mode is None else opts.sci_mode
        prec = opts.precision
        for side in (finite[finite > 0], finite[finite < 0]):
            if not side.size:
                continue
            for v in (float(side.min()), float(side.max())):
                if self.sci_mode:
                    width = len(f"{v:.{prec}e}")
                elif self.int_mode:
                    width = len(f"{v:.0f}") + 1
                else:
                    width = len(f"{v:.{prec}f}")
                self.max_width = max(self.max_width, width)

    @staticmethod
    def _plain(v) -> str:
        if isinstance(v, (bool, np.bool_)):
            return "True" if v else "False"
        return str(int(v))

    def format(self, v) -> str:
        if self.floating:
            v = float(v)
            prec = self.opts.precision
            if self.sci_mode:
                ret = f"{v:{self.max_width}.{prec}e}"
            elif self.int_mode:
                ret = f"{v:.0f}"
                if not (math.isinf(v) or math.isnan(v)):
                    ret += "."
            else:
                ret = f"{v:.{prec}f}"
        else:
            ret = self._plain(v)
        return (self.max_width - len(ret)) * " " + ret


def _element_formatter(vals: np.ndarray, opts: PrintOptions) -> tuple[Callable, int]:
    """How one element prints, and the element width torch wraps lines by."""
    if np.iscomplexobj(vals):
        real, imag = _Formatter(vals.real, opts), _Formatter(vals.imag, opts)

        def fmt(v) -> str:
            imag_str = (imag.format(v.imag) + "j").lstrip()
            return real.format(v.real) + ("" if imag_str[0] in "+-" else "+") + imag_str

        return fmt, real.max_width + 2 + imag.max_width + 1
    f = _Formatter(vals, opts)
    return f.format, f.max_width + 2


def format_values(p: Preview, indent: int = 7, options: PrintOptions = DEFAULT_OPTIONS) -> str:
    """The bracketed body torch prints, e.g. `[[1., 2.],\n        [3., 4.]]`.

    `indent` is the column the body starts at (7 after `tensor(`); lines wrap at
    `options.linewidth` as torch's do. A preview that kept only the first elements of a
    tensor too large even for its edge block (`flat_head`) prints them flat, then `...]`:
    torch's own printout of such a tensor cannot be rebuilt from them.
    """
    if p.values is None:
        return f"<{p.note or 'no values'}>"
    vals = np.asarray(p.values)
    fmt, element_width = _element_formatter(vals, options)
    if p.flat_head:
        return "[" + ", ".join(fmt(v) for v in vals.reshape(-1)) + ", ...]"
    if vals.ndim == 0:
        return fmt(vals.reshape(-1)[0])
    if vals.size == 0:
        return "[]"
    cells = iter([fmt(v) for v in vals.reshape(-1)])
    summarize = p.summarized

    def block(shape: tuple, full_shape: tuple, ind: int) -> str:
        n, full_n = shape[0], full_shape[0]
        cut = summarize and full_n > n  # only dims that were actually cut get "..."
        half = n // 2
        if len(shape) == 1:
            items = [next(cells) for _ in range(n)]
            if cut:
                items = items[:half] + [" ..."] + items[half:]
            per_line = max(1, math.floor((options.linewidth - ind) / element_width))
            lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
            return "[" + (",\n" + " " * (ind + 1)).join(lines) + "]"
        parts = [block(shape[1:], full_shape[1:], ind + 1) for _ in range(n)]
        if cut:
            parts = parts[:half] + ["..."] + parts[half:]
        sep = "," + "\n" * (len(shape) - 1) + " " * (ind + 1)
        return "[" + sep.join(parts) + "]"

    return block(vals.shape, p.shape, indent)


def _add_suffixes(body: str, suffixes: list[str], indent: int, linewidth: int) -> str:
    """torch's `_add_suffixes`: `, name=...` on the last line while it fits, else on a new one."""
    out = [body]
    last = len(body) - body.rfind("\n") + 1
    for suffix in suffixes:
        if last + len(suffix) + 2 > linewidth:
            out.append(",\n" + " " * indent + suffix)
            last = indent + len(suffix)
        else:
            out.append(", " + suffix)
            last += len(suffix) + 2
    return "".join(out) + ")"


def format_tensor(
    p: Optional[Preview],
    grad_fn: Optional[str] = None,
    requires_grad: bool = False,
    options: PrintOptions = DEFAULT_OPTIONS,
) -> str:
    """The whole `tensor(...)` line(s) as `print(tensor)` shows them.

    The default dtype is taken to be float32 (torch's own default): a Preview does not
    record `torch.get_default_dtype()`.
    """
    if p is None:
        return "—"
    if p.note and p.values is None:
        return f"tensor(<{p.note}>, size={list(p.shape)})"
    prefix = "tensor("
    suffix = []
    if p.device != "cpu":
        suffix.append(f"device='{p.device}'")
    if p.numel == 0:
        body = "[]"
        if len(p.shape) != 1:
            suffix.append(f"size={tuple(p.shape)}")
        if p.dtype != "torch.float32":
            suffix.append(f"dtype={p.dtype}")
    else:
        body = format_values(p, indent=len(prefix), options=options)
        if p.dtype not in _DEFAULT_DTYPES:
            suffix.append(f"dtype={p.dtype}")
    if grad_fn:
        suffix.append(f"grad_fn=<{grad_fn}>")
    elif requires_grad:
        suffix.append("requires_grad=True")
    return _add_suffixes(prefix + body, suffix, len(prefix), options.linewidth)


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
