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


_PYTHON_FLOATS = 48  # up to this many values (about where numpy gets faster), the formatter's figures are found with Python floats


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
        if flat.size <= _PYTHON_FLOATS and flat.dtype.itemsize <= 8:
            # a few values: the same figures from Python floats (each value exactly as a double),
            # without numpy's cost per call
            finite = [v for v in flat.tolist() if v != 0 and math.isfinite(v)]
            if not finite:
                return
            magnitude = [abs(v) for v in finite]
            lo, hi = min(magnitude), max(magnitude)
            self.int_mode = all(v.is_integer() for v in finite)
            sides = [(min(side), max(side)) for side in ([v for v in finite if v > 0], [v for v in finite if v < 0]) if side]
        else:
            flat = flat.astype(np.float64)
            with np.errstate(invalid="ignore"):
                finite = flat[np.isfinite(flat) & (flat != 0)]
            if finite.size == 0:
                return
            magnitude = np.abs(finite)
            lo, hi = float(magnitude.min()), float(magnitude.max())
            self.int_mode = bool(np.all(finite == np.ceil(finite)))
            sides = [(float(side.min()), float(side.max())) for side in (finite[finite > 0], finite[finite < 0]) if side.size]
        auto = hi / lo > 1000.0 or hi > 1.0e8 or lo < 1.0e-4
        self.sci_mode = auto if opts.sci_mode is None else opts.sci_mode
        prec = opts.precision
        for extremes in sides:
            for v in extremes:
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


# The table, the snapshot and the text view print the same previews: what only depends on a
# preview's values (the formatter) or on its shape and element width (the line layout) is kept,
# keyed by exactly what it depends on, so each is worked out once. Bounded, oldest dropped.
_MEMO_ENTRIES = 512
_MEMO_VALUE_BYTES = 4096  # previews hold at most PREVIEW_EDGE_BLOCK elements: all of them fit
_FORMATTERS: dict = {}
_LAYOUTS: dict = {}


def _remember(memo: dict, key, value):
    if len(memo) >= _MEMO_ENTRIES:
        del memo[next(iter(memo))]
    memo[key] = value
    return value


def _element_formatter(vals: np.ndarray, opts: PrintOptions) -> tuple[Callable, int, int]:
    """How one element prints, the element width torch wraps lines by, and the fewest
    characters one element prints in (every element but an overflowing nan, inf or zero
    prints in exactly that many when real). Depends on the values alone (not their shape)."""
    if vals.nbytes > _MEMO_VALUE_BYTES or vals.dtype.kind not in "biufc":  # numbers only: their bytes are their values
        return _new_element_formatter(vals, opts)
    key = (vals.dtype.str, vals.tobytes(), opts)
    found = _FORMATTERS.get(key)
    if found is None:
        found = _remember(_FORMATTERS, key, _new_element_formatter(vals, opts))
    return found


def _new_element_formatter(vals: np.ndarray, opts: PrintOptions) -> tuple[Callable, int, int]:
    if np.iscomplexobj(vals):
        real, imag = _Formatter(vals.real, opts), _Formatter(vals.imag, opts)

        def fmt(v) -> str:
            imag_str = (imag.format(v.imag) + "j").lstrip()
            return real.format(v.real) + ("" if imag_str[0] in "+-" else "+") + imag_str

        return fmt, real.max_width + 2 + imag.max_width + 1, real.max_width + 3  # real, sign, digit, "j"
    f = _Formatter(vals, opts)
    return f.format, f.max_width + 2, f.max_width


_SUMMARY_ITEM = " ..."  # torch's item for the cut middle of a summarized row (joined by ", ")


class Printout:
    """A printed value laid out in lines before any element is formatted.

    Which elements go on which line depends only on the shape and on the one element width
    torch picks from all values (found cheaply, see `_Formatter`), so the number of lines and
    a lower bound on the characters are known at once, and `line(i)` formats only the
    elements of line i. `text()` is the whole printout (what `format_values` and
    `format_tensor` return), for a caller that needs everything; a caller that shows the
    first lines of a long value (the snapshot) or a summary of it (the widget's table) asks
    only for what it shows.

    Each line is `[prefix, items, suffix]`: items are indices into the flat values, None for
    torch's ` ...`, joined by ", ". `suffixes` (`grad_fn=<...>`, ...) are added to the last
    line as torch adds them, with the closing `)`, when `close` is set.
    """

    def __init__(self, lines: list, values: Optional[np.ndarray] = None, fmt: Optional[Callable] = None,
                 element_min: int = 0):
        self._lines = lines
        self._flat = values.reshape(-1) if values is not None else None
        self._fmt = fmt
        self._element_min = element_min
        self._suffixes: tuple = ()
        self._close = False
        self._indent, self._linewidth = 0, DEFAULT_OPTIONS.linewidth
        self._tail: Optional[list[str]] = None
        self.size = 0 if self._flat is None else int(self._flat.size)  # elements printed

    @classmethod
    def literal(cls, text: str) -> "Printout":
        return cls([[line, [], ""] for line in text.split("\n")])

    def wrap(self, prefix: str, suffixes: list[str], linewidth: int) -> "Printout":
        """`prefix` (`tensor(`) before the first line; `suffixes` and `)` after the last, as torch
        adds them (`_add_suffixes`, continuation lines indented by the prefix)."""
        self._lines[0][0] = prefix + self._lines[0][0]
        self._suffixes, self._close = tuple(suffixes), True
        self._indent, self._linewidth = len(prefix), linewidth
        self._tail = None
        return self

    @property
    def min_lines(self) -> int:
        """Lines of the printout, at least (exactly, when there are no suffixes to place)."""
        return len(self._lines)

    def min_line_chars(self, i: int) -> int:
        """Characters of line i at least (of the last line, before any suffix)."""
        prefix, items, suffix = self._lines[i]
        n = len(items)
        if not n:
            return len(prefix) + len(suffix)
        cut = sum(1 for j in items if j is None)
        return len(prefix) + len(suffix) + (n - cut) * self._element_min + cut * len(_SUMMARY_ITEM) + 2 * (n - 1)

    def min_chars(self) -> int:
        """Characters of the whole printout at least."""
        total = sum(self.min_line_chars(i) for i in range(len(self._lines))) + len(self._lines) - 1
        return total + sum(len(s) + 2 for s in self._suffixes) + (1 if self._close else 0)

    def _render(self, i: int, limit: Optional[int] = None) -> str:
        prefix, items, suffix = self._lines[i]
        if not items:
            return prefix + suffix
        flat, fmt = self._flat, self._fmt
        if limit is None:
            return prefix + ", ".join(_SUMMARY_ITEM if j is None else fmt(flat[j]) for j in items) + suffix
        out, size = [prefix], len(prefix)
        for k, j in enumerate(items):
            piece = (", " if k else "") + (_SUMMARY_ITEM if j is None else fmt(flat[j]))
            out.append(piece)
            size += len(piece)
            if size > limit:
                return "".join(out)
        return "".join(out) + suffix

    def _tail_lines(self) -> list[str]:
        if self._tail is None:
            last = self._render(len(self._lines) - 1)
            if self._close:
                last = _add_suffixes(last, list(self._suffixes), self._indent, self._linewidth)
            self._tail = last.split("\n")
        return self._tail

    def line(self, i: int, limit: Optional[int] = None) -> Optional[str]:
        """Line i of the printout exactly, or None past its end. With `limit`, a line longer
        than `limit` may come back cut short: its first characters, more than `limit` of them."""
        last = len(self._lines) - 1
        if i < last:
            return self._render(i, limit)
        if i == last and limit is not None:
            head = self._render(i, limit)
            if len(head) > limit:  # the suffixes only lengthen this line or follow it
                return head
        tail = self._tail_lines()
        return tail[i - last] if i - last < len(tail) else None

    def text(self) -> str:
        return "\n".join([self._render(i) for i in range(len(self._lines) - 1)] + self._tail_lines())


def _layout(shape: tuple, full_shape: tuple, summarize: bool, element_width: int, linewidth: int,
            indent: int) -> list:
    """torch's nested-bracket layout as Printout lines (see `Printout`), no element formatted:
    a new list of lines each time (`Printout.wrap` changes the first), their items shared."""
    key = (shape, tuple(full_shape), summarize, element_width, linewidth, indent)
    lines = _LAYOUTS.get(key)
    if lines is None:
        lines = _remember(_LAYOUTS, key, _new_layout(*key))
    return [list(line) for line in lines]


def _new_layout(shape: tuple, full_shape: tuple, summarize: bool, element_width: int, linewidth: int,
                indent: int) -> list:
    position = 0

    def block(shape: tuple, full_shape: tuple, ind: int) -> list:
        nonlocal position
        n, full_n = shape[0], full_shape[0]
        cut = summarize and full_n > n  # only dims that were actually cut get "..."
        half = n // 2
        if len(shape) == 1:
            items: list = list(range(position, position + n))
            position += n
            if cut:
                items = items[:half] + [None] + items[half:]
            per_line = max(1, math.floor((linewidth - ind) / element_width))
            pad = " " * (ind + 1)
            lines = [[pad, items[i : i + per_line], ","] for i in range(0, len(items), per_line)]
            lines[0][0] = "["
            lines[-1][2] = "]"
            return lines
        parts = [block(shape[1:], full_shape[1:], ind + 1) for _ in range(n)]
        if cut:
            parts = parts[:half] + [[["...", [], ""]]] + parts[half:]
        pad, blank = " " * (ind + 1), len(shape) - 2  # torch's separator: "," then newlines, then the indent
        lines = []
        for k, part in enumerate(parts):
            if k:
                part[0][0] = pad + part[0][0]
                lines.extend(["", [], ""] for _ in range(blank))
            if k < len(parts) - 1:
                part[-1][2] += ","
            lines.extend(part)
        lines[0][0] = "[" + lines[0][0]
        lines[-1][2] += "]"
        return lines

    return block(shape, full_shape, indent)


def values_printout(p: Preview, indent: int = 7, options: PrintOptions = DEFAULT_OPTIONS) -> Printout:
    """`format_values`'s printout, laid out and not yet formatted."""
    if p.values is None:
        return Printout.literal(f"<{p.note or 'no values'}>")
    vals = np.asarray(p.values)
    fmt, element_width, element_min = _element_formatter(vals, options)
    if p.flat_head:
        lines = [["[", list(range(vals.size)), ", ...]"]]
    elif vals.ndim == 0:
        lines = [["", [0], ""]]
    elif vals.size == 0:
        return Printout.literal("[]")
    else:
        lines = _layout(vals.shape, p.shape, p.summarized, element_width, options.linewidth, indent)
    return Printout(lines, vals, fmt, element_min)


def format_values(p: Preview, indent: int = 7, options: PrintOptions = DEFAULT_OPTIONS) -> str:
    """The bracketed body torch prints, e.g. `[[1., 2.],\n        [3., 4.]]`.

    `indent` is the column the body starts at (7 after `tensor(`); lines wrap at
    `options.linewidth` as torch's do. A preview that kept only the first elements of a
    tensor too large even for its edge block (`flat_head`) prints them flat, then `...]`:
    torch's own printout of such a tensor cannot be rebuilt from them.
    """
    return values_printout(p, indent, options).text()


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


def tensor_printout(
    p: Optional[Preview],
    grad_fn: Optional[str] = None,
    requires_grad: bool = False,
    options: PrintOptions = DEFAULT_OPTIONS,
) -> Printout:
    """`format_tensor`'s printout, laid out and not yet formatted."""
    if p is None:
        return Printout.literal("—")
    if p.note and p.values is None:
        return Printout.literal(f"tensor(<{p.note}>, size={list(p.shape)})")
    prefix = "tensor("
    suffix = []
    if p.device != "cpu":
        suffix.append(f"device='{p.device}'")
    if p.numel == 0:
        body = Printout.literal("[]")
        if len(p.shape) != 1:
            suffix.append(f"size={tuple(p.shape)}")
        if p.dtype != "torch.float32":
            suffix.append(f"dtype={p.dtype}")
    else:
        body = values_printout(p, indent=len(prefix), options=options)
        if p.dtype not in _DEFAULT_DTYPES:
            suffix.append(f"dtype={p.dtype}")
    if grad_fn:
        suffix.append(f"grad_fn=<{grad_fn}>")
    elif requires_grad:
        suffix.append("requires_grad=True")
    return body.wrap(prefix, suffix, options.linewidth)


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
    return tensor_printout(p, grad_fn, requires_grad, options).text()


def record_printout(r: Record) -> Printout:
    return tensor_printout(r.preview, r.grad_fn, r.requires_grad and r.grad_fn is None)


def format_record_value(r: Record) -> str:
    return record_printout(r).text()


def format_short(p: Optional[Preview], limit: int = 48) -> str:
    """One line for tables and graph nodes: `63.`, `[10., 16., 22.]`, `[2x3] mean 4.5`."""
    if p is None:
        return "—"
    if p.values is None:
        return f"[{'x'.join(map(str, p.shape))}] {p.note or ''}".strip()
    vals = np.asarray(p.values)
    # n values print in at least 3n characters on one line ("[" and "]" or ", " around each):
    # past the limit the summary follows without formatting them
    if vals.ndim == 0 or 3 * vals.size <= limit:
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
