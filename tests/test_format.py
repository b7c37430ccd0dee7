"""explain/format.py against torch's own printer: the same text from a bounded Preview.

Every case takes a Preview the way the tracer does (`capture.preview`) and
compares `format_tensor` with `str(tensor)`, under torch's default print options
and under `torch.set_printoptions(...)` (passed to the formatter as
`PrintOptions`; the options are restored after each test). The expected text is
always torch's, never a string copied from our output.

What a bounded Preview cannot reproduce, and is tested as documented instead:
- a tensor of more than `limits.PREVIEW_FULL` elements but at most torch's
  threshold (1000) keeps only its edge items, so it prints as torch prints it
  with `threshold=limits.PREVIEW_FULL`;
- a tensor whose edge block is itself larger than `limits.PREVIEW_EDGE_BLOCK`
  (4-d and up, every dim long) keeps only its first elements (`flat_head`):
  those print as torch prints them, flat, then `...]`.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autograd_magic import limits
from autograd_magic.capture.preview import preview, preview_quiet
from autograd_magic.explain.format import DEFAULT_OPTIONS, PrintOptions, format_tensor, format_values

TORCH_THRESHOLD = 1000  # torch's default print threshold


@contextlib.contextmanager
def printoptions(**kwargs):
    """`torch.set_printoptions(**kwargs)` inside, whatever was set before restored after."""
    opts = torch._tensor_str.PRINT_OPTS
    saved = {k: getattr(opts, k) for k in ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
    torch.set_printoptions(**kwargs)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(opts, k, v)


@pytest.fixture(autouse=True)
def _default_printoptions():
    with printoptions(profile="default"):
        yield


def ours(t: torch.Tensor, options: PrintOptions = DEFAULT_OPTIONS, quiet: bool = False) -> str:
    p = (preview_quiet if quiet else preview)(t)
    name = type(t.grad_fn).__name__ if t.grad_fn is not None else None
    return format_tensor(p, name, t.requires_grad and t.grad_fn is None, options=options)


def torchs(t: torch.Tensor) -> str:
    """torch's print, with the threshold a Preview can follow (see the module docstring)."""
    if limits.PREVIEW_FULL < t.numel() <= TORCH_THRESHOLD:
        opts = torch._tensor_str.PRINT_OPTS
        saved, opts.threshold = opts.threshold, limits.PREVIEW_FULL  # set_printoptions would reset sci_mode
        try:
            return str(t)
        finally:
            opts.threshold = saved
    return str(t)


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inf, nan = math.inf, math.nan
    c = {
        # shapes
        "0d": torch.tensor(3.5),
        "0d-int-valued": torch.tensor(63.0),
        "0d-neg": torch.tensor(-0.25),
        "1d": torch.tensor([1.0, 2.5, -3.25]),
        "2d": torch.tensor([[1.0, 2, 3], [3, 2, 1]]),
        "3d": torch.arange(24.0).reshape(2, 3, 4) / 3,
        "4d-small": torch.arange(16.0).reshape(2, 2, 2, 2),
        "empty-1d": torch.empty(0),
        "empty-2d": torch.empty(2, 0),
        "empty-int": torch.empty(0, dtype=torch.int64),
        "empty-f64": torch.empty(0, 3, dtype=torch.float64),
        "single": torch.tensor([7.0]),
        "column": torch.arange(5.0).reshape(5, 1),
        "row-64": torch.randn(64, generator=g),
        # values
        "ints-as-floats": torch.tensor([5.0, 8, 11, -2, 0]),
        "mixed-magnitudes": torch.tensor([1e-3, 1.0, 5000.0]),
        "int-valued-wide": torch.tensor([1.0, 2000.0]),
        "int-valued-huge": torch.tensor([1.0, 3e8]),
        "tiny": torch.tensor([1e-5, 2e-5]),
        "tiny-and-one": torch.tensor([1e-30, 1.0]),
        "huge": torch.tensor([1e30, -2e30]),
        "just-under-1e8": torch.tensor([9.9e7, 1.0e7]),
        "nan-inf": torch.tensor([nan, inf, -inf, 1.5]),
        "nan-inf-int-valued": torch.tensor([nan, inf, -inf, 2.0, 100.0]),
        "nan-inf-sci": torch.tensor([nan, 1e-6, 1.0]),
        "only-nan": torch.tensor([nan, nan]),
        "only-inf": torch.tensor([inf]),
        "zeros": torch.zeros(3),
        "neg-zero": torch.tensor([0.0, -0.0]),
        "neg-zero-and-values": torch.tensor([-0.0, 1.5, -2.25]),
        "neg-zero-0d": torch.tensor(-0.0),
        "randn-2d": torch.randn(4, 5, generator=g),
        "randn-scaled": torch.randn(3, 4, generator=g) * 1e5,
        "thirds": torch.full((3,), 1 / 3),
        "rounding": torch.tensor([0.00005, 0.99995, 2.5e-4]),
        # line wrapping: more elements than fit in 80 columns
        "wrap-1d": torch.arange(40.0) / 7,
        "wrap-1d-ints": torch.arange(60.0),
        "wrap-2d": torch.randn(3, 20, generator=g),
        "wrap-3d": torch.randn(2, 2, 16, generator=g),
        "wrap-sci": torch.logspace(-8, 8, 30),
        # large, summarized by torch itself (> 1000 elements)
        "large-1d": torch.randn(2000, generator=g),
        "large-2d": torch.randn(50, 50, generator=g),
        "large-2d-wide": torch.randn(3, 2000, generator=g),
        "large-2d-tall": torch.randn(2000, 3, generator=g),
        "large-3d": torch.randn(10, 20, 30, generator=g),
        "large-ints-as-floats": torch.arange(1_000_000.0).reshape(1000, 1000),
        "large-sci": torch.logspace(-10, 10, 5000),
        "large-nan": torch.cat([torch.tensor([nan]), torch.ones(1500)]),
        "large-transposed": torch.randn(40, 60, generator=g).t(),
        # between the preview's full copy and torch's threshold (documented: summarized at 64)
        "mid-1d": torch.randn(100, generator=g),
        "mid-2d": torch.randn(20, 20, generator=g),
        "mid-3d": torch.randn(5, 6, 7, generator=g),
        "non-contiguous": torch.randn(6, 8, generator=g)[:, ::2],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
    }
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        for key in ("1d", "2d", "mixed-magnitudes", "nan-inf", "randn-2d", "large-2d", "neg-zero", "wrap-1d"):
            c[f"{key}-{dtype}"] = c[key].to(dtype)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        c[f"int-{dtype}"] = torch.tensor([[1, 22, 3], [100, 5, 6]]).to(dtype)
        c[f"int-large-{dtype}"] = (torch.arange(3000) % 120).to(dtype)
    c["int-negative"] = torch.tensor([-5, 12345, 0])
    c["int-0d"] = torch.tensor(7)
    c["int-wrap"] = torch.arange(1000, 1050)
    c["bool"] = torch.tensor([True, False, True])
    c["bool-2d"] = torch.tensor([[True, False], [False, False]])
    c["bool-large"] = torch.arange(3000) % 3 == 0
    c["bool-0d"] = torch.tensor(False)
    c["complex64"] = torch.tensor([1 + 2j, 3.5 - 1j, -0.25 + 0j])
    c["complex64-int-valued"] = torch.tensor([1 + 2j, 3 - 1j])
    c["complex128"] = torch.tensor([1e-5 + 1j, 2 + 3e5j], dtype=torch.complex128)
    c["complex-0d"] = torch.tensor(2 - 3j)
    c["complex-2d"] = torch.randn(3, 3, dtype=torch.complex64, generator=g)
    c["complex-large"] = torch.randn(40, 40, dtype=torch.complex64, generator=g)
    c["complex-nan"] = torch.tensor([complex(math.nan, 1.0), 1 + 1j])
    return c


CASES = _cases()
OPTIONS = [
    {"precision": 2},
    {"precision": 6},
    {"precision": 0},
    {"sci_mode": True},
    {"sci_mode": False},
    {"linewidth": 40},
    {"linewidth": 120},
    {"precision": 3, "sci_mode": True, "linewidth": 50},
    {"linewidth": 10},
]


@pytest.mark.parametrize("name", list(CASES))
def test_format_tensor_is_torchs_print(name):
    t = CASES[name]
    assert ours(t) == torchs(t)


@pytest.mark.parametrize("name", ["1d", "2d", "large-2d", "nan-inf", "int-torch.int32", "complex64"])
def test_the_tracers_hot_path_preview_formats_the_same(name):
    t = CASES[name]
    assert ours(t, quiet=True) == torchs(t)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", [
    "0d", "1d", "2d", "3d", "ints-as-floats", "mixed-magnitudes", "tiny", "huge", "nan-inf", "zeros",
    "neg-zero-and-values", "randn-2d", "wrap-1d", "wrap-2d", "wrap-3d", "wrap-sci", "large-2d", "large-3d",
    "mid-2d", "int-torch.int64", "int-wrap", "bool", "complex64", "complex128", "1d-torch.float16",
    "large-2d-torch.bfloat16", "empty-2d",
])
def test_format_tensor_follows_torchs_print_options(name, opts):
    t = CASES[name]
    with printoptions(**opts):
        expected = torchs(t)
    assert ours(t, PrintOptions(**opts)) == expected


@pytest.mark.parametrize("opts", [{}, {"linewidth": 40}, {"linewidth": 20}])
def test_suffixes_wrap_as_torchs_do(opts):
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    cases = [x, x * 2, (x * 2).sum(), x.to(torch.float16) + 1, torch.tensor([1.0, 2.0], requires_grad=True),
             torch.tensor(1.0, requires_grad=True) * 3, torch.empty(2, 0, dtype=torch.float64, requires_grad=True)]
    for t in cases:
        with printoptions(**opts):
            expected = str(t)
        assert ours(t, PrintOptions(**opts)) == expected


def test_format_values_is_the_body_at_any_indent():
    """The bracketed body alone: torch's print less `tensor(` and its suffixes, re-indented."""
    for name in ("2d", "3d", "wrap-2d", "large-3d", "complex-2d", "int-torch.int64"):
        t = CASES[name]
        body = str(t)[len("tensor(") : -1]
        assert format_values(preview(t)) == body
    t = CASES["3d"]  # no line long enough to wrap: indent 0 only moves the continuation lines left
    lines = str(t)[len("tensor(") : -1].splitlines()
    assert format_values(preview(t), indent=0).splitlines() == [lines[0]] + [
        line[len("tensor(") :] if line else line for line in lines[1:]
    ]


@pytest.mark.parametrize("name", ["mid-1d", "mid-2d", "mid-3d"])
def test_mid_sized_tensors_print_summarized_at_the_previews_limit(name):
    """Documented: between PREVIEW_FULL and torch's threshold a Preview keeps only edge items."""
    t = CASES[name]
    p = preview(t)
    assert p.summarized and limits.PREVIEW_FULL < t.numel() <= TORCH_THRESHOLD
    with printoptions(threshold=limits.PREVIEW_FULL):
        assert format_tensor(p) == str(t)
    assert format_tensor(p) != str(t)  # torch itself prints them whole


@pytest.mark.parametrize("shape", [(8, 8, 8, 8), (4, 5, 6, 7), (7, 7, 7, 7, 2)])
def test_flat_head_previews_print_their_first_elements_as_torch_does(shape):
    """Documented: a preview too large even for its edge block prints its first elements, then `...]`."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    p = preview(t)
    assert p.flat_head
    body = format_values(p)
    assert body.startswith("[") and body.endswith(", ...]") and "\n" not in body
    head = t.reshape(-1)[: p.values.size]
    with printoptions(linewidth=10**6):  # one line: the tokens torch prints for the same elements
        expected = str(head)[len("tensor([") : -len("])")]
    assert body[1 : -len(", ...]")].split() == expected.split()


finite = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            finite,
            st.integers(-10**6, 10**6).map(float),
            st.sampled_from([0.0, -0.0, 1e-4, 1e8, 1000.0, 0.5, math.nan, math.inf]),
        ),
        min_size=1, max_size=30,
    ),
    rows=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    precision=st.sampled_from([None, 0, 2, 4, 7]),
    sci_mode=st.sampled_from([None, True, False]),
    linewidth=st.sampled_from([None, 30, 80, 200]),
)
def test_random_values_print_as_torch_prints_them(values, rows, dtype, precision, sci_mode, linewidth):
    with np.errstate(all="ignore"):
        t = torch.tensor(values, dtype=torch.float64).to(dtype)
    if len(values) % rows == 0:
        t = t.reshape(rows, -1)
    opts = {k: v for k, v in (("precision", precision), ("linewidth", linewidth)) if v is not None}
    opts["sci_mode"] = sci_mode
    with printoptions(**opts):
        expected = str(t)
    assert ours(t, PrintOptions(**opts)) == expected


def test_printouts_kept_for_reuse_are_not_changed_by_their_users():
    """The formatter and line layout are kept by what they depend on (values; shape and width):
    a `tensor(` prefix, suffixes or another value of the same shape printed in between must not
    change what the next printout of the same preview says. Each text is torch's."""
    from autograd_magic.explain import format as fmt

    fmt._FORMATTERS.clear()
    fmt._LAYOUTS.clear()
    a = torch.arange(24.0).reshape(2, 3, 4) / 7
    b = -torch.arange(24.0).reshape(2, 3, 4) * 1000  # same shape, another width and mode
    c = (torch.arange(24.0).reshape(2, 3, 4) / 7).requires_grad_()  # a's values, with a suffix
    first = format_values(preview(a))
    for _ in range(2):
        assert ours(a) == torchs(a)
        assert ours(b) == torchs(b)
        assert ours(c) == torchs(c)
        assert format_values(preview(a)) == first
    assert fmt._FORMATTERS and fmt._LAYOUTS  # kept, not worked out anew each time
    body = torchs(a)[len("tensor("):-1]  # the body at its default indent, 7
    assert first == body


def test_the_text_table_keeps_a_rows_flags_whole(shell):
    """`--text`: a parameter from an earlier cell that the cell changes in place says so in full
    ("modified in place later" was cut after "from outside the c…")."""
    from IPython.utils.capture import capture_output

    shell.run_cell("import torch\nw = torch.ones(2, requires_grad=True)")
    with capture_output() as out:
        shell.run_cell("%%autograd --text\nwith torch.no_grad():\n    w.mul_(2)")
    row = next(line for line in out.stdout.splitlines() if line.lstrip().startswith("w "))
    assert "requires_grad, leaf, from outside the cell, modified in place later" in row, out.stdout


def test_the_text_table_shows_what_each_call_of_the_cell_returned(shell):
    """`y = lin(x)`: the ops inside Linear.forward fold into the call line, whose row shows what the
    call returned (it had no row at all: the text view skipped every op inside a call)."""
    from IPython.utils.capture import capture_output

    shell.run_cell("import torch\ntorch.manual_seed(0)\nlin = torch.nn.Linear(2, 2)\nx = torch.ones(1, 2)")
    with capture_output() as out:
        shell.run_cell("%%autograd --text\ny = lin(x)\nz = y.softmax(-1)")
    row = next((line for line in out.stdout.splitlines() if "y = lin(x)" in line), None)
    assert row is not None, out.stdout
    y = shell.user_ns["y"]
    assert f"{y[0, 0].item():.4f}" in row and "AddmmBackward0" in row and y.grad_fn.name() == "AddmmBackward0", row


def test_a_tensor_no_name_reaches_is_called_unnamed_not_by_the_records_op(shell):
    """An eval-mode TransformerEncoder built in one line deep-copies its layer: the copied layer's
    own parameters, read by the copy and bound to no name, were rows called `external`."""
    shell.run_cell("import torch")
    shell.run_cell("%%autograd --quiet -o _t\nenc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)")
    t = shell.user_ns["_t"]
    labels = [r.label for r in t.records]
    assert "external" not in labels and "unnamed tensor" in labels
    named = {n for n, _ in shell.user_ns["enc"].named_parameters()}
    assert all(label in {f"enc.{n}" for n in named} for label in labels if label.startswith("enc."))  # by their path
