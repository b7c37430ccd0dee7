"""The explorer's views without a browser: the curve's SVG, the Jacobian, the snapshot's section,
and the widget's side of the sliders (what the page may send, what Python re-runs, what it answers).

Reference numbers come from plain PyTorch: the polynomial's value and its gradient at each x,
the Jacobian of a small function (torch.autograd.functional.jacobian) and `.grad` after
`backward(v)`. Explorations are built by hand from those numbers (the engine that computes
them in the sandbox has its own tests); the widget is given a small session whose re-runs run
the cell with the input set, as the sandbox does.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields

import pytest
import torch

from autograd_magic import limits
from autograd_magic.data.explore import Curve, Exploration, Jacobian, ScalarInput
from autograd_magic.render import explore as rx
from autograd_magic.render.snapshot import snapshot_html
from autograd_magic.run.execute import execute
from autograd_magic.variants.interventions import Toggles

from test_svg_security import ALLOWED_ATTRS, ALLOWED_ELEMENTS

SVG_NS = "{http://www.w3.org/2000/svg}"
POLY_SETUP = "import torch\nx = torch.tensor(2.0, requires_grad=True)"
POLY_CELL = "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()"


def poly(x):
    return 2 * x**4 + x**3 + 3 * x**2 + 5 * x + 1


def torch_point(x0: float) -> tuple[float, float]:
    """The polynomial's value and autograd's gradient at x0, in float32 as the cell computes them."""
    x = torch.tensor(x0, requires_grad=True)
    y = poly(x)
    y.backward()
    return y.item(), x.grad.item()


def poly_curve(x0: float = 2.0, lo: float = 1.0, hi: float = 3.0, n: int = 41, h: float = 0.1, **kw) -> Curve:
    xs = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    ys = [torch_point(x)[0] for x in xs]
    y0, slope = torch_point(x0)
    secant = (poly(torch.tensor(x0 + h, dtype=torch.float64)) - poly(torch.tensor(x0 - h, dtype=torch.float64))).item() / (2 * h)
    args = dict(input=0, input_label="x", output=1, output_label="y", xs=xs, ys=ys, x0=x0, y0=y0, slope=slope, secant=secant, h=h)
    args.update(kw)
    return Curve(**args)


def points(svg: str) -> list[list[tuple[float, float]]]:
    """The curve path's pieces, each a list of pixel points."""
    (d,) = re.findall(r'<path class="agm-curve" d="([^"]*)"', svg)
    return [[tuple(map(float, p.split(","))) for p in piece.split()] for piece in d.split("M") if piece.strip()]


# ---- the curve -----------------------------------------------------------------------------


def test_the_curve_s_pixels_follow_its_values_in_order():
    curve = poly_curve()
    (piece,) = points(rx.curve_svg(curve))
    assert len(piece) == len(curve.xs)
    for (px_a, py_a), (px_b, py_b), ya, yb in zip(piece, piece[1:], curve.ys, curve.ys[1:]):
        assert px_b > px_a  # xs grow left to right
        assert (py_b < py_a) == (yb > ya) or abs(py_b - py_a) <= 0.1  # larger values are drawn higher
    # the point shown sits on the curve where x = 2 (the middle sample)
    cx, cy = (float(v) for v in re.search(r'<circle class="agm-point" cx="([\d.]+)" cy="([\d.]+)"', rx.curve_svg(curve)).groups())
    assert (cx, cy) == pytest.approx(piece[20], abs=0.11)


def test_the_caption_says_the_slope_torch_computed():
    y0, slope = torch_point(2.0)
    assert slope == 93.0
    svg = rx.curve_html(poly_curve(2.0))  # the caption is text beside the drawing
    assert "slope 93 at x = 2" in svg
    # the polynomial at x = 1: torch's gradient there is 22, and the view says so
    _, slope1 = torch_point(1.0)
    assert slope1 == 22.0 and "slope 22 at x = 1" in rx.curve_html(poly_curve(1.0))
    # the secant beside it, with its h: the central difference of the same polynomial
    exact = (poly(2.1) - poly(1.9)) / 0.2
    assert f"secant (h = 0.1): {exact:.4g}" in svg and f"{exact:.4g}" == "93.17"
    # whatever slope is passed in is the one shown, not one the drawing works out itself
    assert "slope 7.5 at x = 2" in rx.curve_html(poly_curve(2.0, slope=7.5))


def test_tangent_has_the_slope_given():
    curve = poly_curve(2.0)
    svg = rx.curve_svg(curve)
    x1, y1, x2, y2 = (float(v) for v in re.search(r'<line class="agm-tangent" x1="([-\d.]+)" y1="([-\d.]+)" x2="([-\d.]+)" y2="([-\d.]+)"', svg).groups())
    (piece,) = points(svg)
    # pixels per unit, from the curve's own first and last points
    sx = (piece[-1][0] - piece[0][0]) / (curve.xs[-1] - curve.xs[0])
    sy = (piece[-1][1] - piece[0][1]) / (curve.ys[-1] - curve.ys[0])
    assert ((y2 - y1) / sy) / ((x2 - x1) / sx) == pytest.approx(93.0, rel=0.02)


@pytest.mark.parametrize("value", [93.0, 22.0, 0.5, 1.2e-05, -0.0, 93.17, 1234567.0, None, float("nan")])
def test_numbers_are_compact(value):
    expected = {93.0: "93", 22.0: "22", 0.5: "0.5", 1.2e-05: "1.2e-05", -0.0: "0", 93.17: "93.17", 1234567.0: "1.235e+06", None: "—"}
    assert rx.number(value) == expected.get(value, "nan")


def test_points_that_are_none_break_the_line():
    curve = poly_curve()
    curve.ys[10] = None
    curve.ys[11] = None
    curve.ys[30] = float("inf")
    pieces = points(rx.curve_svg(curve))
    assert [len(p) for p in pieces] == [10, 18, 10]
    empty = Curve(0, "x", 1, "y", xs=[0.0, 1.0, 2.0], ys=[None, None, None], x0=1.0, y0=None)
    assert 'class="agm-curve"' not in rx.curve_svg(empty) and "no gradient at x = 1" in rx.curve_html(empty)


def test_labels_are_escaped_in_the_svg_and_the_html():
    hostile = '<x onload="alert(1)">'
    curve = poly_curve(input_label=hostile, output_label="<y>")
    svg = rx.curve_svg(curve)
    ET.fromstring(svg)  # well-formed: the label is text, not markup
    assert "<x " not in svg and "<y>" not in svg and "&lt;x" in svg
    jac = Jacobian(0, "<out>", 1, hostile, out_shape=(2,), in_shape=(2,), rows=[[1.0, 0.0], [0.0, 1.0]], grad=[1.0, 1.0], agrees=True, note="<b>n</b>")
    out = rx.jacobian_html(jac) + rx.explore_html(Exploration(curves=[curve], jacobian=jac, note="<i>x</i>"))
    assert "<x " not in out and "<out>" not in out and "<b>n</b>" not in out and "<i>x</i>" not in out
    assert "&lt;out&gt;" in out and "&lt;b&gt;n&lt;/b&gt;" in out


def _assert_allowlisted(svg: str) -> None:
    """The rules tests/test_svg_security.py applies to what the page's sanitizer lets through."""
    root = ET.fromstring(svg)
    for el in root.iter():
        assert el.tag.startswith(SVG_NS), el.tag
        name = el.tag[len(SVG_NS):]
        assert name in ALLOWED_ELEMENTS, name
        for attr, value in el.attrib.items():
            assert attr in ALLOWED_ATTRS and not attr.lower().startswith("on"), (name, attr)
            flat = re.sub(r"\s", "", value).lower()
            assert not re.search(r"javascript:|vbscript:|data:|expression\(|@import|\\|url\(", flat), (name, attr, value)
            assert attr != "href" and attr != "id", (name, attr)


def test_the_svg_uses_only_what_the_sanitizer_keeps():
    curve = poly_curve()
    curve.ys[5] = None
    for c in (curve, poly_curve(input_label="javascript:alert(1)"), Curve(0, "x", 1, "y")):
        svg = rx.curve_svg(c)
        _assert_allowlisted(svg)
        assert "<script" not in svg.lower() and "style" not in svg


def test_the_drawing_stays_small():
    assert len(rx.curve_svg(poly_curve()).encode()) <= 2_500
    # the worst case for its bytes: values with every digit, long names, negative coordinates
    gen = torch.Generator().manual_seed(0)
    ys = (torch.randn(41, generator=gen, dtype=torch.float64) * 1e5).tolist()
    worst = Curve(0, "a_long_input_name_" * 3, 1, "a_long_output_name_" * 3, xs=[-1.234567 + i * 0.0617 for i in range(41)],
                  ys=ys, x0=-0.1234567, y0=ys[18], slope=-123456.789, secant=-123457.891, h=0.0123456)
    assert len(rx.curve_svg(worst).encode()) <= 2_500


# ---- the Jacobian --------------------------------------------------------------------------


def _torch_jacobian(v: list[float]) -> Jacobian:
    """f(x) = (x0 * x1, x0 + 3 x1, sin x1) at x = (2, 3): J by torch, and x.grad after backward(v)."""
    f = lambda x: torch.stack([x[0] * x[1], x[0] + 3 * x[1], torch.sin(x[1])])
    x0 = torch.tensor([2.0, 3.0])
    J = torch.autograd.functional.jacobian(f, x0)
    x = x0.clone().requires_grad_(True)
    f(x).backward(torch.tensor(v))
    vj = (torch.tensor(v) @ J).tolist()
    agrees = torch.allclose(torch.tensor(vj), x.grad)
    return Jacobian(0, "out", 1, "x", out_shape=(3,), in_shape=(2,), rows=J.tolist(), v=v, vj=vj, grad=x.grad.tolist(), agrees=agrees)


def test_the_jacobian_shows_v_j_beside_the_grad_torch_computed():
    jac = _torch_jacobian([1.0, 0.5, 2.0])
    out = rx.jacobian_html(jac)
    grid = re.findall(r"<tr>(.*?)</tr>", out)
    cells = [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in grid]
    assert [c[0] for c in cells] == ["1", "0.5", "2", "v·J", "x.grad"]  # rows led by v's entries
    shown = [float(v) for row in cells[:3] for v in row[1:]]
    assert shown == pytest.approx([v for row in jac.rows for v in row], rel=1e-3, abs=1e-4)
    assert [float(v) for v in cells[4][1:]] == pytest.approx(jac.grad, rel=1e-3)
    assert [float(v) for v in cells[3][1:]] == pytest.approx([float(v) for v in cells[4][1:]])
    assert "v·J equals x.grad ✓" in out and "3 × 2" in out
    # when they differ (a grad accumulated over two backward calls), the view says so
    jac.grad = [2 * g for g in jac.grad]
    jac.agrees = False
    assert "v·J differs from x.grad ✗" in rx.jacobian_html(jac)


def test_a_big_jacobian_is_cut_with_its_shape_said():
    rows = [[float(i * 12 + j) for j in range(12)] for i in range(10)]
    parts = rx.jacobian_parts(Jacobian(0, "out", 1, "w", out_shape=(10,), in_shape=(3, 4), rows=rows, grad=[0.0] * 12))
    n = limits.EXPLORE_JACOBIAN_SHOWN
    assert len(parts["rows"]) == n + 1 and all(len(r["cells"]) == n + 1 for r in parts["rows"])
    assert parts["rows"][0]["cells"][-1] == "…" and parts["rows"][-1]["cells"][0] == "⋮"
    assert "10 × 12" in parts["title"] and f"first {n} × {n} shown" in parts["title"]
    assert parts["grad"][-1] == "…" and len(parts["grad"]) == n + 1
    too_big = Jacobian(0, "out", 1, "w", note="too big: 300 × 300 > 4096 entries")
    html = rx.jacobian_html(too_big)
    assert "too big: 300 × 300 &gt; 4096 entries" in html and "<table" not in html


def test_the_section_keeps_to_its_budget_and_says_what_it_left_out():
    curves = [poly_curve(input=i, input_label=f"x{i}") for i in range(6)]
    jac = _torch_jacobian([1.0, 1.0, 1.0])
    body = rx.explore_html(Exploration(curves=curves, jacobian=jac), budget=5_000)
    assert len(body) <= 5_000
    assert "The Jacobian left out" in body and "curves left out" in body
    assert body.count("slope 93 at x") == body.count("<svg") > 0  # each curve kept whole: its drawing and its caption
    whole = rx.explore_html(Exploration(curves=curves[:1], jacobian=jac))
    assert "The Jacobian left out" not in whole and "v·J equals x.grad ✓" in whole


# ---- the snapshot --------------------------------------------------------------------------


def _poly_trace(shell):
    shell.run_cell(POLY_SETUP)
    return execute(shell, POLY_CELL, first_line=2, display=False, capture=True).trace


def _poly_exploration(trace, x0: float = 2.0) -> Exploration:
    x = trace.last("x")
    y = trace.last("y")
    curve = poly_curve(x0, input=x.id, output=y.id)
    return Exploration(inputs=[ScalarInput(x.id, "x", 2.0, 1.0, 3.0, 0.05, external=True)], output=y.id, output_label="y", curves=[curve])


def test_the_snapshot_shows_the_curve_at_the_cell_s_values(shell):
    trace = _poly_trace(shell)
    without = snapshot_html(trace, graph=False)
    assert "<b>explore</b>" not in without
    trace.exploration = Exploration(note="nothing to explore")  # empty: no section
    assert snapshot_html(trace, graph=False) == without
    trace.exploration = _poly_exploration(trace)
    snap = snapshot_html(trace, graph=False)
    assert "<details open><summary><b>explore</b></summary>" in snap
    assert "slope 93 at x = 2" in snap and "secant (h = 0.1): 93.17" in snap
    assert '<img src="data:image/svg+xml,' in snap and "<script" not in snap.lower()
    assert len(snap) - len(without) <= limits.EXPLORE_SNAPSHOT_BYTES + 200
    # a variant with values of its own shows its point; without, the real run's
    variant = _poly_trace(shell)
    plain = snapshot_html(trace, variant=variant, graph=False)
    assert "slope 93 at x = 2" in plain and rx.VARIANT_WITHOUT_EXPLORATION.replace("'", "&#x27;") in plain
    variant.exploration = _poly_exploration(trace, 1.0)
    assert "slope 22 at x = 1" in snapshot_html(trace, variant=variant, graph=False)


# ---- the widget ----------------------------------------------------------------------------


def _toggles_class():
    """Toggles with `values` (the engine adds it; until then a stand-in of the same shape)."""
    if "values" in {f.name for f in fields(Toggles)}:
        return Toggles

    @dataclass(frozen=True)
    class ValueToggles(Toggles):
        values: tuple = ()

        @property
        def any(self) -> bool:
            return bool(super().any or self.values)

    return ValueToggles


class FakeSession:
    """The polynomial cell, its exploration by torch, and re-runs that set x and run the cell again."""

    def __init__(self, shell):
        self.shell = shell
        self.trace = _poly_trace(shell)
        self.x_id = self.trace.last("x").id
        self.calls: list = []
        self.fail = None
        self.can_rerun = True
        self.rerun_blocked = ""

    def exploration(self) -> Exploration:
        self.trace.exploration = _poly_exploration(self.trace)
        return self.trace.exploration

    def rerun(self, toggles):
        self.calls.append(toggles)
        if not toggles.any:
            return None
        if self.fail:
            raise self.fail
        x0 = dict(getattr(toggles, "values", ())).get(self.x_id, 2.0)
        self.shell.user_ns["x"] = torch.tensor(x0, requires_grad=True)
        trace = execute(self.shell, POLY_CELL, first_line=2, display=False, capture=True).trace
        explored = _poly_exploration(self.trace, x0)
        explored.curves[0].xs = explored.curves[0].ys = []  # as the engine sends them: the range is the real run's
        trace.exploration = explored
        return trace

    def close(self):
        pass

    def on_replaced(self, callback):
        pass


@pytest.fixture
def explorer(shell, monkeypatch):
    import autograd_magic.notebook.widget as widget

    monkeypatch.setattr(widget, "Toggles", _toggles_class())
    session = FakeSession(shell)
    view = widget.AutogradView(session, graph=False)
    log: list = []
    view.observe(lambda change: log.append(("payload", change["new"]["version"])), names=["payload"])
    view.send = lambda content, buffers=None: log.append(("sent", content))

    def explore(values, seq=1):
        view._handle_msg({"content": {"data": {"method": "custom", "content": {"type": "explore", "values": values, "seq": seq}}}, "buffers": []})
        sent = [c for kind, c in log if kind == "sent"]
        return sent[-1] if sent else None

    return view, session, explore, log


def test_a_slider_step_leaves_the_graph_until_the_page_asks_again(shell, monkeypatch):
    """A Graphviz layout per slider step would cost more than the step: the answer says the graph is
    stale, and the page's next graph question gets the graph of the run now shown."""
    import autograd_magic.notebook.widget as widget

    monkeypatch.setattr(widget, "Toggles", _toggles_class())
    session = FakeSession(shell)
    view = widget.AutogradView(session, graph=True)
    laid_out: list = []
    monkeypatch.setattr(view, "_graph", lambda: laid_out.append(view.shown) or f"<svg>{len(laid_out)}</svg>")
    sent: list = []
    view.send = lambda content, buffers=None: sent.append(content)
    page = lambda content: view._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})
    page({"type": "graph"})
    assert laid_out == [session.trace] and sent[-1]["type"] == "graph"
    page({"type": "explore", "values": {str(session.x_id): 2.5}, "seq": 1})
    assert len(laid_out) == 1  # not laid out for the step
    assert sent[-1]["type"] == "explored" and sent[-1]["graph_stale"] is True
    page({"type": "graph"})
    assert laid_out[-1] is view.variant and view.variant is not None
    assert sent[-1] == {"type": "graph", "svg": "<svg>2</svg>", "version": view.payload["version"]}


def _row(payload, label):
    rows = [r for g in payload["lines"] for r in g["rows"] + [x for c in g["folded"] for x in c["rows"]]]
    return [r for r in rows if r["label"] == label][-1]


def test_the_payload_carries_the_controls_and_the_curve(explorer):
    view, session, _explore, _log = explorer
    ex = view.payload["explore"]
    (control,) = ex["inputs"]
    assert control == {"record": session.x_id, "label": "x", "value": 2.0, "current": 2.0, "lo": 1.0, "hi": 3.0, "step": 0.05, "external": True}
    (curve,) = ex["curves"]
    assert curve["caption"] == "slope 93 at x = 2" and curve["slope"] == 93.0
    assert curve["svg"] == rx.curve_svg(session.trace.exploration.curves[0])  # the snapshot's drawing, the same text
    json.dumps(view.get_state(), allow_nan=False)  # JSON the page can parse (no NaN)
    assert len(json.dumps(view.get_state())) < limits.WIDGET_STATE_BYTES


def test_a_slider_step_reruns_with_the_value_and_answers_after_the_payload(explorer):
    view, session, explore, log = explorer
    answer = explore({str(session.x_id): 2.5}, seq=7)
    (toggles,) = session.calls
    assert toggles.values == ((session.x_id, 2.5),) and toggles.no_grad is False and toggles.detach_ids == ()
    assert answer == {"type": "explored", "seq": 7, "version": view.payload["version"], "ok": True, "graph_stale": False}
    kinds = [kind for kind, _ in log]
    assert kinds.index("payload") < kinds.index("sent")  # the new view is set before the answer goes
    y, grad = torch_point(2.5)
    p = view.payload
    assert p["explore"]["inputs"][0]["current"] == 2.5
    (curve,) = p["explore"]["curves"]
    assert curve["caption"] == f"slope {rx.number(grad)} at x = 2.5" and curve["slope"] == pytest.approx(grad)
    assert len(points(curve["svg"])[0]) == 41  # drawn over the real run's range
    # the rows that changed from the run shown before are marked: y's value, x's value and gradient
    assert _row(p, "y")["moved"] == ["value"] and _row(p, "x")["moved"] == ["grad", "value"]
    assert float(_row(p, "y")["value"].strip("tensor()")) == pytest.approx(y, rel=1e-4)
    # the same value again: nothing re-runs, and it is still answered
    assert explore({str(session.x_id): 2.5}, seq=8)["seq"] == 8 and len(session.calls) == 1
    # a second step marks only what changed since the first
    explore({str(session.x_id): 2.55}, seq=9)
    assert _row(view.payload, "y")["moved"] == ["value"]


def test_back_at_the_cell_s_value_there_is_no_values_toggle(explorer):
    view, session, explore, _log = explorer
    explore({str(session.x_id): 1.5}, seq=1)
    assert view.variant is not None
    # a slider lands on 2 by float steps (1 + 20 * 0.05 is not exactly 2.0)
    explore({str(session.x_id): 1.0 + 20 * 0.05}, seq=2)
    assert session.calls[-1].values == () and not session.calls[-1].any
    assert view.variant is None and view.payload["explore"]["inputs"][0]["current"] == 2.0
    assert view.payload["explore"]["curves"][0]["caption"] == "slope 93 at x = 2"


def test_values_compose_with_the_other_toggles(explorer):
    view, session, explore, _log = explorer
    explore({str(session.x_id): 2.5}, seq=1)
    view.no_grad = True
    assert session.calls[-1].no_grad is True and session.calls[-1].values == ((session.x_id, 2.5),)
    view.no_grad = False
    assert session.calls[-1].no_grad is False and session.calls[-1].values == ((session.x_id, 2.5),)


BAD_VALUES = [
    {"999": 1.0},
    {"abc": 1.0},
    {"-1": 1.0},
    {"1" * 400: 1.0},
    {"{id}": float("nan")},
    {"{id}": float("inf")},
    {"{id}": "2.5"},
    {"{id}": True},
    {"{id}": None},
    {"{id}": [2.5]},
    {"{id}": 10**400},
    {"{id}": 1e300},
    {"{id}": 2.5, "0": 1.0, "1": 1.0},
    [2.5],
    "2.5",
    None,
]


def test_junk_from_the_page_is_ignored_with_a_status(explorer, shell, monkeypatch):
    view, session, explore, log = explorer
    tracebacks = []
    monkeypatch.setattr(shell, "showtraceback", lambda *a, **k: tracebacks.append(a))
    before = view.payload
    for i, junk in enumerate(BAD_VALUES):
        if isinstance(junk, dict):
            junk = {k.replace("{id}", str(session.x_id)): v for k, v in junk.items()}
        view.status = ""
        answer = explore(junk, seq=100 + i)
        assert answer == {"type": "explored", "seq": 100 + i, "version": before["version"], "ok": False, "graph_stale": False}, junk
        assert view.status.startswith("Ignored a request from the explorer") and "\n" not in view.status, junk
    for seq in (None, "1", -1, 1.5, 2**60, True):
        n = len(log)
        view.status = ""
        explore({str(session.x_id): 2.5}, seq=seq)
        assert len(log) == n and view.status, seq  # no answer to a request without a valid number
    assert session.calls == [] and view.variant is None and view.payload == before and tracebacks == []


def test_a_failing_rerun_says_so_in_one_line_and_keeps_the_view(explorer):
    view, session, explore, _log = explorer
    session.fail = RuntimeError("the sandbox broke\nsecond line of detail")
    before = view.payload
    answer = explore({str(session.x_id): 2.5}, seq=4)
    assert answer["ok"] is False and answer["seq"] == 4
    assert view.status == "Could not re-run the cell with that value: RuntimeError: the sandbox broke"
    assert view.variant is None and view.payload["explore"]["inputs"][0]["current"] == 2.0
    assert view.payload["lines"] == before["lines"]
    session.fail = None
    explore({str(session.x_id): 2.5}, seq=5)
    assert view.status == "" and view.variant is not None


def test_without_an_exploration_the_payload_has_none(shell):
    from autograd_magic.notebook.session import CellSession
    from autograd_magic.notebook.widget import make_view

    trace = _poly_trace(shell)
    session = CellSession(shell, POLY_CELL, trace, None)
    view = make_view(session, graph=False)
    if not hasattr(session, "exploration"):
        assert view.payload["explore"] is None
    sent = []
    view.send = lambda content, buffers=None: sent.append(content)
    view._handle_msg({"content": {"data": {"method": "custom", "content": {"type": "explore", "values": {"0": 1.0}, "seq": 1}}}, "buffers": []})
    assert sent[-1]["ok"] is False and view.status.startswith("Ignored a request from the explorer")


def test_the_front_end_has_the_explorer_s_hooks():
    """What the browser tests find (classes, data attributes) and the one-in-flight rule, in the module."""
    from pathlib import Path

    js = (Path(__file__).resolve().parent.parent / "autograd_magic" / "notebook" / "widget.js").read_text()
    for hook in ('"agm-explore-slider"', '"agm-explore-number"', '"agm-explore-slope"', '"data-record"', '"data-ms"', 'type: "explore"', '"explored"'):
        assert hook in js, hook
    assert "safeSvg(curve.svg)" in js  # the curve goes through the same allowlist as the graph
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML", js)


# ---- the page's side, in Node on a stand-in DOM (tests/explore_page.mjs) ---------------------


def _page_run(steps: list) -> list:
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js to run the front end's module")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [node, str(root / "tests" / "explore_page.mjs"), str(root / "autograd_magic" / "notebook" / "widget.js")],
        input=json.dumps(steps), capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_page_keeps_one_request_in_flight_and_sends_only_the_latest(explorer):
    view, session, explore, log = explorer
    first = json.loads(json.dumps(view.payload))
    rid = session.x_id
    # Python's payloads for the two values the page will send, made by the view itself
    explore({str(rid): 2.1}, seq=1)
    at_21 = json.loads(json.dumps(view.payload))
    explore({str(rid): 2.3}, seq=2)
    at_23 = json.loads(json.dumps(view.payload))
    steps = [
        {"payload": first},
        {"slide": [rid, 2.1]},
        {"slide": [rid, 2.2]},
        {"slide": [rid, 2.3]},
        {"payload": at_21},  # Python shows 2.1 ...
        {"answer": {"type": "explored", "seq": 1, "version": at_21["version"], "ok": True}},  # ... then answers
        {"answer": {"type": "explored", "seq": 1, "version": at_21["version"], "ok": True}},  # a repeat: ignored
        {"answer": {"type": "explored", "seq": 2, "version": at_23["version"], "ok": True}},  # before its payload
        {"payload": at_23},
        {"type": [rid, 2.75]},
        {"dead": True},
    ]
    out = _page_run(steps)
    shown = out[0]
    assert shown["hidden"] is False and shown["slope"] == ["slope 93 at x = 2"]
    assert shown["sliders"] == [{"record": str(rid), "value": "2", "disabled": False, "min": 1, "max": 3}]
    # the first step goes at once; the next two wait, and only the latest of them is kept
    assert [m["values"] for m in out[1]["sent"]] == [{str(rid): 2.1}]
    assert out[3]["sent"] == out[1]["sent"]
    # Python's payload for 2.1 arrives while the slider is at 2.3: the slider is not pulled back
    assert out[4]["sliders"][0]["value"] == "2.3" and out[4]["slope"] == [at_21["explore"]["curves"][0]["caption"]]
    assert out[4]["moved"]  # the rows the step changed are flagged
    # the answer: the time is recorded and the latest position (2.3, never 2.2) is sent
    assert out[5]["ms"] is not None and json.loads(out[5]["ms"])[-1] >= 0
    assert [(m["seq"], m["values"]) for m in out[5]["sent"]] == [(1, {str(rid): 2.1}), (2, {str(rid): 2.3})]
    assert len(out[6]["sent"]) == 2  # a stale or repeated answer sends nothing
    # an answer that overtakes its payload (ipywidgets applies state later): done once it is drawn
    assert out[7]["seq"] == "1" and out[8]["seq"] == "2" and out[8]["ms"] is not None
    assert len(out[8]["sent"]) == 2 and out[8]["slope"] == [f"slope {rx.number(torch_point(2.3)[1])} at x = 2.3"]
    assert out[8]["sliders"][0]["value"] == "2.3" and out[8]["numbers"] == ["2.3"]
    # the number box sends its exact value
    assert out[9]["sent"][-1] == {"type": "explore", "values": {str(rid): 2.75}, "seq": 3}
    # no kernel: the sliders are disabled, with a line saying why
    assert out[10]["sliders"][0]["disabled"] is True and "kernel" in out[10]["reason"]


def test_the_page_draws_the_jacobian_from_python_s_words():
    jac = _torch_jacobian([1.0, 0.5, 2.0])
    payload = {"lines": [], "passes": [], "can_rerun": True, "explore": rx.explore_payload(Exploration(jacobian=jac))}
    (out,) = _page_run([{"payload": payload}])
    parts = rx.jacobian_parts(jac)
    assert out["hidden"] is False and out["sliders"] == []
    assert out["jacobian"] == [[r["label"], *r["cells"]] for r in parts["rows"]] + [["v·J", *parts["vj"]], ["x.grad", *parts["grad"]]]
    (empty,) = _page_run([{"payload": {"lines": [], "passes": [], "can_rerun": True, "explore": None}}])
    assert empty["hidden"] is True


def test_an_explorer_that_fails_leaves_the_view_and_says_why(shell, monkeypatch):
    import autograd_magic.notebook.widget as widget

    session = FakeSession(shell)
    monkeypatch.setattr(session, "exploration", lambda: (_ for _ in ()).throw(ValueError("no <curve>\nmore")))
    view = widget.AutogradView(session, graph=False)
    ex = view.payload["explore"]
    assert ex["inputs"] == [] and ex["note"] == "The explorer could not run: ValueError: no <curve>"
    assert view.status == "" and _row(view.payload, "y")["value"]
    snap = view.snapshot()._repr_mimebundle_()["text/html"]
    assert "<b>explore</b>" not in snap and "<curve>" not in snap
