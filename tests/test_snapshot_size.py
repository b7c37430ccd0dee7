"""The snapshot each traced cell writes into the notebook: bounded in bytes, and still right.

Through the magic as users run it (`%%autograd` cells in an IPython shell, the published
display_data captured). Sizes are deterministic: every seed cell's snapshot output (text/html +
text/plain) is at most 20 KB, the Transformer's and the unrolled LSTM's at most 150 KB (issue 14).
What it shows is compared with the same code run by plain PyTorch.
"""

from __future__ import annotations

import html
import re

import pytest
import torch
from IPython.utils.capture import capture_output

from autograd_magic import limits
from bench.bench_size import snapshot_bytes
from bench.cases import LSTM, LSTM_SETUP, TRANSFORMER_NAMED as TRANSFORMER, TRANSFORMER_SETUP

SEED_GOAL, MODEL_GOAL = 20_000, 150_000


def _snapshot(outputs) -> str:
    found = [o.data["text/html"] for o in outputs if "agm-snapshot" in o.data.get("text/html", "")]
    assert len(found) == 1, [list(o.data) for o in outputs]
    return found[0]


def _traced(shell, cell: str):
    with capture_output(display=True) as cap:
        result = shell.run_cell("%%autograd\n" + cell)
    return result, cap.outputs


def _plain(setup: str, cell: str) -> dict:
    ns: dict = {}
    exec(setup, ns)
    exec(cell, ns)
    return ns


def _row(snapshot: str, name: str) -> str:
    """The table row of the tensor named `name`."""
    m = re.search(r'<tr data-record="\d+"><td><b class="m">' + re.escape(html.escape(name)) + r"</b>.*?</tr>", snapshot, re.S)
    assert m, name
    return m.group(0)


def _stats_match(row: str, t: torch.Tensor, which: int) -> bool:
    """The `which`-th statistics line of `row` (0: value, 1: gradient) says torch's min, max, mean.

    min and max to the 4 digits shown; the mean to float32 summation's error (a gradient whose
    mean is ~0 shows rounding noise of its elements' size, 1e-6 of its largest)."""
    found = re.findall(r"min (\S+)  max (\S+)  mean (\S+)", row)
    if len(found) <= which:
        return False
    lo, hi, mean = (float(v) for v in found[which])
    t = t.detach().double()
    scale = t.abs().max().item()
    return (
        f"{lo:.4g}" == f"{t.min().item():.4g}" and f"{hi:.4g}" == f"{t.max().item():.4g}"
        and (f"{mean:.4g}" == f"{t.mean().item():.4g}" or abs(mean - t.mean().item()) <= 1e-6 * scale)
    )


@pytest.fixture(scope="module")
def models(_ipython):
    """The Transformer and the LSTM cell, each traced once: (published outputs, plain namespace)."""
    out = {}
    for name, setup, cell in (("transformer", TRANSFORMER_SETUP, TRANSFORMER), ("lstm", LSTM_SETUP, LSTM)):
        _ipython.reset(new_session=False)
        _ipython.run_cell(setup)
        result, outputs = _traced(_ipython, cell)
        assert result.success, result.error_in_exec
        out[name] = (outputs, _plain(setup, cell))
    _ipython.reset(new_session=False)
    return out


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_a_real_models_snapshot_stays_under_150_kb(models, name):
    outputs, _ = models[name]
    size = snapshot_bytes(outputs)
    assert 0 < size <= MODEL_GOAL, size
    assert "<script" not in _snapshot(outputs).lower()


def test_every_seed_cells_snapshot_stays_under_20_kb(shell, seeds):
    sizes = {}
    for nb, cells in seeds.NOTEBOOKS.items():
        shell.reset(new_session=False)
        torch.manual_seed(1234)
        for i, cell in enumerate(cells):
            _, outputs = _traced(shell, cell)
            sizes[(nb, i)] = snapshot_bytes(outputs)
    assert sum(1 for s in sizes.values() if s) >= 30  # the cells that make tensors publish one
    over = {k: s for k, s in sizes.items() if s > SEED_GOAL}
    assert not over, over


def test_the_transformers_six_layers_are_listed_once_with_a_line_saying_so(models):
    outputs, ns = models["transformer"]
    snap = _snapshot(outputs)
    assert "m.layers.0.linear1.weight" in snap and "m.layers.3.linear1.weight" not in snap
    assert "m.layers.1 … m.layers.5: 5 more blocks" in snap and "the live widget shows them all" in snap
    # the loss as torch prints it, and a parameter's gradient statistics as torch computes them
    assert html.escape(str(ns["loss"])) in snap
    w = ns["m"].layers[0].linear1.weight
    row = _row(snap, "m.layers.0.linear1.weight")
    assert _stats_match(row, w, 0) and _stats_match(row, w.grad, 1)
    first = str(w.detach()).splitlines()[0]  # the head of the value, as torch prints it
    assert html.escape(first) in row


def test_the_first_backward_steps_are_shown_and_the_rest_counted(models, _ipython):
    outputs, ns = models["transformer"]
    snap = _snapshot(outputs)
    stepper = snap[snap.index("backward, step by step"):]
    rows = re.findall(r"<tr><td>(\d+)</td><td><code class=\"w\">(\w+)</code>", stepper)
    assert [int(i) for i, _ in rows[: limits.SNAPSHOT_STEPS_SHOWN]] == list(range(1, limits.SNAPSHOT_STEPS_SHOWN + 1))
    assert rows[0][1] == type(ns["loss"].grad_fn).__name__  # backward starts at the loss's node
    assert re.search(r"… \d+ more steps in this pass; the live widget has them all", stepper)


def test_the_lstms_values_and_grads_are_torchs(models):
    outputs, ns = models["lstm"]
    snap = _snapshot(outputs)
    cell = ns["cell"]
    for pname in ("weight_ih", "weight_hh"):
        p = getattr(cell, pname)
        row = _row(snap, f"cell.{pname}")
        assert _stats_match(row, p, 0) and _stats_match(row, p.grad, 1)
    assert "×50" in snap  # the unrolled loop: its 50 runs counted, a few kept


def test_small_values_and_grads_are_shown_whole_as_torch_prints_them(shell):
    cell = "x = torch.tensor([[1., 2, 3], [3, 2, 1]], requires_grad=True)\nout = (2 * (3 * x + 2) ** 2).mean()\nout.backward()"
    shell.run_cell("import torch")
    _, outputs = _traced(shell, cell)
    ns = _plain("import torch", cell)
    snap = _snapshot(outputs)
    assert html.escape(str(ns["x"].grad)) in snap and html.escape(str(ns["out"])) in snap


def test_first_steps_are_the_same_as_the_whole_stepper(models, _ipython):
    """The snapshot computes only the first steps of a pass: they equal the full computation's."""
    from autograd_magic.explain.stepper import steps
    from autograd_magic.render.teach_html import _first_steps

    _ipython.reset(new_session=False)
    _ipython.run_cell(LSTM_SETUP)
    with capture_output():
        _ipython.run_cell("%%autograd --quiet -o _t\n" + LSTM)
    t = _ipython.user_ns["_t"]
    full = steps(t, 0)
    first, total = _first_steps(t, 0, 6)
    assert total == len(full) > 6
    assert first == full[:6]


def test_a_compact_svg_draws_the_same_elements(shell):
    """compact_svg drops tooltips, ids, blank space and repeated attributes; shapes and texts stay."""
    from html.parser import HTMLParser

    from autograd_magic.render.layout import layout
    from autograd_magic.render.snapshot import compact_svg

    class Shapes(HTMLParser):
        def __init__(self):
            super().__init__()
            self.shapes, self.texts = [], []

        def handle_starttag(self, tag, attrs):
            if tag in ("polygon", "path", "ellipse", "polyline", "text"):
                self.shapes.append(tag)

        def handle_data(self, data):
            if data.strip() and self.lasttag == "text":
                self.texts.append(data)

    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)")
    with capture_output():
        shell.run_cell("%%autograd --quiet -o _t\ny = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()")
    svg = layout(shell.user_ns["_t"].to_dot()).svg
    if svg is None:
        pytest.skip("no Graphviz engine")
    small = compact_svg(svg)
    a, b = Shapes(), Shapes()
    a.feed(svg)
    b.feed(small)
    assert a.shapes == b.shapes and a.texts == b.texts and len(a.shapes) > 20
    assert len(small) < 0.8 * len(svg) and "<title>" not in small


def test_the_table_stops_at_its_byte_budget_and_says_how_many_are_left(shell):
    from autograd_magic.render.html import table

    shell.run_cell("import torch\nx = torch.randn(40, 40, requires_grad=True)")
    with capture_output():
        shell.run_cell("%%autograd --quiet -o _t\n" + "".join(f"y{i} = x * {i}\n" for i in range(60)))
    t = shell.user_ns["_t"]
    out = table(t, max_bytes=10_000)
    shown = out.count("data-record=")
    assert 0 < shown < len(t.records) and len(out) < 12_000
    assert f"{len(t.records) - shown} more tensors are not shown" in out
