"""The snapshot's head path and the widget's cell against the full printout, cut afterwards.

`html_table.compact_printout` formats only the lines it shows when the layout proves a
value too long; it must give exactly `compact_value(format_tensor(...))` (the full printout,
which tests/test_format.py compares with torch's own print, then cut). Likewise
`format_short` and `payload.cell_value`, which skip formatting values that cannot fit, and
the element width found from each sign's extremes (torch takes the widest of all values).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autograd_magic.capture.preview import preview
from autograd_magic.explain.format import PrintOptions, _Formatter, format_tensor, format_values, format_short, tensor_printout
from autograd_magic.render.html_table import compact_printout, compact_value
from autograd_magic.render.payload import CELL_LINES, CELL_WIDTH, SHORT, cell_value

from test_format import CASES

special = st.sampled_from([0.0, -0.0, 1e-4, 1e8, 1e-150, 1e200, -1e-200, 1000.0, 0.5, math.nan, math.inf, -math.inf])
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6).map(float), special)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8,
                          torch.bool, torch.complex64])


def make(shape, seed, dtype) -> torch.Tensor:
    n = math.prod(shape)
    base = torch.tensor(seed, dtype=torch.float64)
    t = base.repeat(n // len(seed) + 1)[:n].reshape(shape)
    if n:
        t = t * torch.linspace(0.5, 3.0, n, dtype=torch.float64).reshape(shape)
    if dtype in (torch.int64, torch.uint8, torch.bool):
        t = torch.nan_to_num(t, 0.0, 0.0, 0.0).clamp(0 if dtype == torch.uint8 else -1e6, 1e6)
    return t.to(dtype)


def full_cut(p, grad_fn, requires_grad, opts) -> tuple[str, bool]:
    text = format_tensor(p, grad_fn, requires_grad, opts)
    short = compact_value(text)
    return short, short != text


def old_cell_value(p) -> str:
    """The widget cell's rule over the full printout: it whole if it fits, else one line or a summary."""
    if p is None or p.values is None:
        return format_short(p, SHORT)
    text = format_values(p, indent=0)
    lines = text.splitlines()
    if len(lines) <= CELL_LINES and all(len(line) <= CELL_WIDTH for line in lines):
        return text
    short = " ".join(text.split())
    if len(short) <= SHORT:
        return short
    return f"[{'x'.join(map(str, p.shape))}]" + (f" mean {p.mean:.4g}" if p.mean is not None else "")


def check(p, grad_fn=None, requires_grad=False, opts=PrintOptions()):
    assert compact_printout(tensor_printout(p, grad_fn, requires_grad, opts)) == full_cut(p, grad_fn, requires_grad, opts)
    assert tensor_printout(p, grad_fn, requires_grad, opts).text() == format_tensor(p, grad_fn, requires_grad, opts)
    if opts == PrintOptions():
        assert cell_value(p) == old_cell_value(p)
        for limit in (28, 48, 60):
            short = " ".join(format_values(p, indent=0).split()) if p.values is not None else None
            if short is not None and len(short) <= limit:
                assert format_short(p, limit) == short
            else:
                assert format_short(p, limit) != short


def test_every_case_of_test_format_cuts_as_the_full_printout():
    for t in CASES.values():
        for grad_fn, rg in ((None, False), ("AddBackward0", False), (None, True)):
            check(preview(t), grad_fn, rg)


@settings(max_examples=400, deadline=None)
@given(
    shape=st.lists(st.integers(0, 12), max_size=5),
    seed=st.lists(values, min_size=1, max_size=8),
    dtype=dtypes,
    precision=st.sampled_from([0, 2, 4, 7]),
    sci_mode=st.sampled_from([None, True, False]),
    linewidth=st.sampled_from([10, 40, 80, 200, 2000]),
    grad_fn=st.sampled_from([None, "MulBackward0", "A" * 90]),
    requires_grad=st.booleans(),
)
def test_head_path_is_the_full_printout_cut(shape, seed, dtype, precision, sci_mode, linewidth, grad_fn, requires_grad):
    with np.errstate(all="ignore"):
        t = make(shape, seed, dtype)
    check(preview(t), grad_fn, requires_grad, PrintOptions(precision, sci_mode, linewidth))
    check(preview(t), grad_fn, requires_grad)


@settings(max_examples=400, deadline=None)
@given(seed=st.lists(values, min_size=1, max_size=40), precision=st.sampled_from([0, 1, 4, 8]),
       sci_mode=st.sampled_from([None, True, False]), dtype=st.sampled_from([np.float64, np.float32, np.float16]))
def test_element_width_is_the_widest_of_all_values(seed, precision, sci_mode, dtype):
    """torch's width: the longest of every nonzero finite value printed in the chosen mode."""
    with np.errstate(all="ignore"):
        vals = np.asarray(seed, dtype=np.float64).astype(dtype)
    f = _Formatter(vals, PrintOptions(precision, sci_mode))
    finite = [v for v in vals.astype(np.float64).tolist() if math.isfinite(v) and v != 0]
    if f.sci_mode:
        widths = [len(f"{v:.{precision}e}") for v in finite]
    elif f.int_mode:
        widths = [len(f"{v:.0f}") + 1 for v in finite]
    else:
        widths = [len(f"{v:.{precision}f}") for v in finite]
    assert f.max_width == max(widths + [1])
