"""The widget without a browser: traits, toggle callbacks, payload, mimebundle, escaping.

Reference answers come from plain PyTorch run beside the traced cell.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from autograd_magic.run.execute import execute
from autograd_magic.render.payload import build_payload
from autograd_magic.data.trace import Preview, Record, Trace, TraceError
from autograd_magic.variants.interventions import Toggles
from autograd_magic.variants.sandbox import take_snapshot
from autograd_magic.notebook.session import CellSession
from autograd_magic.notebook.widget import AutogradView, make_view

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
GRID_SETUP = "import torch\nx = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)"
GRID_CELL = "y = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()"


def _view(shell, setup: str, cell: str, **kwargs) -> AutogradView:
    """What the magic does: snapshot, real run, then the view."""
    shell.run_cell(setup)
    snapshot = take_snapshot(shell, cell)
    run = execute(shell, cell, first_line=2, display=False, capture=True)
    session = CellSession(shell, cell, run.trace, snapshot)
    return make_view(session, graph=kwargs.pop("graph", False), **kwargs)


def _rows(payload: dict) -> list[dict]:
    out = []
    for group in payload["lines"]:
        out.extend(group["rows"])
        for call in group["folded"]:
            out.extend(call["rows"])
    return out


def _row(payload: dict, label: str) -> dict:
    found = [r for r in _rows(payload) if r["label"] == label]
    assert found, f"no row {label!r} in {[r['label'] for r in _rows(payload)]}"
    return found[-1]


def _numbers(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?", text)]


def _plain_grid():
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    y = 3 * x + 2
    out = (2 * y**2).mean()
    out.backward()
    return x, y


# ---- what the page first shows -------------------------------------------------------------


def test_table_shows_the_seed_gradients_torch_computes(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    x, y = _plain_grid()
    p = view.payload
    assert _numbers(_row(p, "x")["grad"]) == pytest.approx(x.grad.flatten().tolist())
    assert _row(p, "y")["requires_grad"] is True and _row(p, "y")["is_leaf"] is False
    assert _row(p, "y")["grad_fn"] == type(y.grad_fn).__name__
    assert _numbers(_row(p, "y")["value"]) == pytest.approx(y.flatten().tolist())
    # torch keeps no .grad on the intermediate: the row says so, next to what backward delivered
    assert "non-leaf" in _row(p, "y")["grad_note"]
    assert [g["line"] for g in p["lines"]] == [None, 2, 3, 4]  # x came from an earlier cell
    assert [r["label"] for r in p["lines"][1]["rows"]] == ["3*x", "y"]  # the cell's ops are rows, not folded


def test_polynomial_gradient(shell):
    view = _view(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)", "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()")
    x = torch.tensor(2.0, requires_grad=True)
    (2 * x**4 + x**3 + 3 * x**2 + 5 * x + 1).backward()
    assert _numbers(_row(view.payload, "x")["grad"]) == [x.grad.item()]


def test_gradient_is_a_dash_before_any_backward(shell):
    view = _view(shell, GRID_SETUP, "y = 3*x + 2")
    assert _row(view.payload, "y")["grad"] == "—"
    assert _row(view.payload, "x")["grad"] == "—"


def test_detail_prints_the_value_like_print_tensor(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    _, y = _plain_grid()
    view.selected = _row(view.payload, "y")["id"]
    d = view.detail
    assert d["label"] == "y" and d["line"] == 2 and d["source"] == "y = 3*x + 2"
    assert d["value"] == str(y)
    assert d["passes"][0]["grad"] is not None  # what the pass delivered to y
    assert d["attr_grad"] is None and d["why"]  # ... and why y.grad is None


# ---- toggles -------------------------------------------------------------------------------


def test_no_grad_toggle_shows_requires_grad_false_and_the_backward_error(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    with pytest.raises(RuntimeError) as plain:
        with torch.no_grad():
            x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
            (2 * (3 * x + 2) ** 2).mean().backward()
    view.no_grad = True
    p = view.payload
    assert p["variant"]["grad_mode"] == "no_grad"
    assert all(r["requires_grad"] is False for r in _rows(p) if r["label"] != "x")
    assert "requires_grad" in _row(p, "y").get("changed", [])
    # y is a leaf in the variant, but only leaves of the real run can be flipped
    assert _row(p, "y")["is_leaf"] is True and "can_flip" not in _row(p, "y")
    assert _row(p, "x")["can_flip"] is True
    assert p["error"]["type"] == "RuntimeError"
    assert p["error"]["message"] == str(plain.value)
    assert p["error"]["line"] == 5
    assert view.status == ""
    view.no_grad = False
    assert view.payload["variant"] is None and view.payload["error"] is None
    assert _row(view.payload, "y")["requires_grad"] is True


def test_detach_y_leaves_x_without_a_gradient(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    x_real_grad = shell.user_ns["x"].grad.clone()
    view.detach_ids = [_row(view.payload, "y")["id"]]
    # plain torch: with y detached, nothing flows back to x
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    y = (3 * x + 2).detach()
    out = (2 * y**2).mean()
    assert not out.requires_grad and x.grad is None
    p = view.payload
    assert _row(p, "x")["grad"] == "None"
    assert p["variant"]["detached"]
    assert "grad" in _row(p, "x")["changed"]
    assert _numbers(_row(p, "x")["was"]["grad"]) == pytest.approx(x_real_grad.flatten().tolist())
    # the user's tensors are the real run's
    assert torch.equal(shell.user_ns["x"].grad, x_real_grad)


def test_several_detaches_at_once(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    ids = [_row(view.payload, "y")["id"], _row(view.payload, "z")["id"]]
    view.detach_ids = ids
    assert len(view.variant.detached) == 2
    assert view.payload["error"]["type"] == "RuntimeError"  # out no longer requires grad


def test_flip_requires_grad_on_a_leaf(shell):
    setup = "import torch\na = torch.tensor([3.0, 2.0], requires_grad=True)\nb = torch.tensor([4.0, 7.0])"
    view = _view(shell, setup, "ab_res = ((a + b) * 8).sum()\nab_res.backward()")
    assert _row(view.payload, "b")["grad"] == "None"
    view.flip_ids = [_row(view.payload, "b")["id"]]
    a = torch.tensor([3.0, 2.0], requires_grad=True)
    b = torch.tensor([4.0, 7.0], requires_grad=True)
    ((a + b) * 8).sum().backward()
    assert _numbers(_row(view.payload, "b")["grad"]) == pytest.approx(b.grad.tolist())
    assert shell.user_ns["b"].requires_grad is False and shell.user_ns["b"].grad is None


def test_ids_from_the_page_that_name_nothing_are_ignored(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    before = view.payload
    view.detach_ids = [999, -3]
    view.flip_ids = [_row(before, "y")["id"]]  # not a leaf: nothing to flip
    assert view.variant is None and view.payload == before and view.status == ""
    view.selected = 12345
    assert view.detail == {}


JUNK_FROM_PAGE = [
    "1",
    "__import__('os').system('touch {marker}')",
    {"__class__": "os.system"},
    10**400,
    -10**400,
    2**53,
    -2,
    1.5,
    float("nan"),
    True,
    None,
    [],
    [1, [2]],
    [[0]],
    ["0"],
    [-1],
    [10**400],
    [0.0],
    {"0": 1},
]
PAGE_TRAITS = ["selected", "step", "pass_index", "request_check", "detach_ids", "flip_ids", "no_grad"]


def _update(state) -> dict:
    return {"content": {"data": {"method": "update", "state": state, "buffer_paths": []}}, "buffers": []}


def test_junk_from_the_page_is_dropped_without_a_traceback_or_a_rerun(shell, monkeypatch, tmp_path):
    import autograd_magic.notebook.session as sandbox  # where the view's re-runs call it

    view = _view(shell, GRID_SETUP, GRID_CELL, graph=True)
    reruns, tracebacks = [], []
    real_run_variant = sandbox.run_variant
    monkeypatch.setattr(sandbox, "run_variant", lambda *a, **k: reruns.append(a) or real_run_variant(*a, **k))
    # ipywidgets shows an error raised by a comm message as a traceback in the notebook
    monkeypatch.setattr(shell, "showtraceback", lambda *a, **k: tracebacks.append(a))
    marker = tmp_path / "ran"
    before = {name: getattr(view, name) for name in PAGE_TRAITS + ["payload", "graph_svg", "detail", "status"]}
    for name in PAGE_TRAITS + ["payload", "graph_svg", "status", "busy", "_esm", "layout", "no_such_trait"]:
        for junk in JUNK_FROM_PAGE:
            junk = junk.replace("{marker}", str(marker)) if isinstance(junk, str) else junk
            if name == "no_grad" and type(junk) is bool or name in ("selected", "step") and junk == -1:
                continue  # a valid value for that name, not junk
            view._handle_msg(_update({name: junk}))
    # malformed messages and states
    for msg in [{}, {"content": {}}, {"content": {"data": None}}, _update(None), _update("selected"), _update([1, 2]),
                {"content": {"data": {"method": "update", "state": {"selected": 0}, "buffer_paths": [["selected"]]}}}]:
        view._handle_msg(msg)
    assert tracebacks == [] and reruns == [] and not marker.exists()
    after = {name: getattr(view, name) for name in before}
    # the one malformed message above carried a valid id: it selected record 0, nothing else changed
    assert after.pop("selected") == 0 and after.pop("detail")["id"] == 0
    before.pop("selected"), before.pop("detail")
    assert after == before and view.variant is None


def test_valid_updates_from_the_page_still_work(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    y = _row(view.payload, "y")["id"]
    view._handle_msg(_update({"selected": y}))
    assert view.detail["label"] == "y"
    view._handle_msg(_update({"detach_ids": [y]}))
    assert view.variant is not None and _row(view.payload, "x")["grad"] == "None"
    view._handle_msg(_update({"detach_ids": [], "no_grad": True}))
    assert view.no_grad is True and view.variant.grad_mode == "no_grad"
    view._handle_msg(_update({"no_grad": False, "selected": 10**400}))  # the junk id is dropped, the switch kept
    assert view.no_grad is False and view.variant is None and view.selected == y


def test_a_failing_rerun_is_reported_not_raised(shell):
    shell.run_cell(GRID_SETUP)
    run = execute(shell, GRID_CELL, first_line=2, display=False, capture=True)
    view = make_view(CellSession(shell, GRID_CELL, run.trace, None), graph=False)
    assert view.payload["can_rerun"] is False
    view.no_grad = True  # no snapshot: the view cannot re-run, and says so
    assert "re-run" in view.status and view.variant is None and not view.busy


def test_initial_variant_from_the_magic_sets_the_toggles(shell):
    from autograd_magic.variants.sandbox import run_variant

    shell.run_cell(GRID_SETUP)
    snapshot = take_snapshot(shell, GRID_CELL)
    run = execute(shell, GRID_CELL, first_line=2, display=False, capture=True)
    variant = run_variant(shell, GRID_CELL, run.trace, snapshot, Toggles(no_grad=True))
    view = make_view(CellSession(shell, GRID_CELL, run.trace, snapshot), variant=variant, graph=False)
    assert view.no_grad is True and view.payload["variant"]["grad_mode"] == "no_grad"


def test_gradient_check_button(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    view.request_check += 1
    lines = view.payload["gradcheck"]
    assert lines and lines[0].startswith("x: agrees"), (lines, view.status)


# ---- graph and stepper ---------------------------------------------------------------------


def test_graph_nodes_are_named_by_record_id(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL, graph=True)
    titles = set(re.findall(r"<title>r(\d+)</title>", view.graph_svg))
    assert {str(r["id"]) for r in _rows(view.payload)} <= titles


def test_stepper_steps_follow_the_backward_pass(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    (p,) = view.payload["passes"]
    assert [s["node"] for s in p["steps"]] == [s.node for s in view.trace.passes[0].steps]
    assert p["steps"][0]["records"] == [_row(view.payload, "out")["id"]]


def test_module_internals_fold_under_their_call_line(shell):
    setup = "import torch\ntorch.manual_seed(0)\nlin = torch.nn.Linear(3, 2)\ninp = torch.ones(4, 3)"
    view = _view(shell, setup, "h = torch.nn.functional.gelu(lin(inp))\nh.sum().backward()")
    internal = [r for r in view.trace.records if r.internal and not r.external]
    top = [r for g in view.payload["lines"] for r in g["rows"]]
    assert not any(r.get("internal") for r in top)
    assert "h" in [r["label"] for r in top]  # the cell's own op stays a row of its line
    folded = [c for g in view.payload["lines"] for c in g["folded"]]
    assert sum(c["count"] for c in folded) == len(internal)


# ---- publishing ----------------------------------------------------------------------------


def test_widget_output_is_the_widget_alone_and_the_snapshot_is_its_own_output(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    data, _meta = view._repr_mimebundle_()
    # the widget's output: no HTML (Lab would never show it: its widget renderer has no fallback)
    # and an empty text, so front ends without widgets show the snapshot output only
    assert set(data) == {WIDGET_MIME, "text/plain"}
    assert data[WIDGET_MIME]["model_id"] == view.model_id
    assert data["text/plain"] == ""
    only_text, _ = view._repr_mimebundle_(include={"text/plain"})
    assert set(only_text) == {"text/plain"}
    # the snapshot output: HTML marked with this model id (a class: Lab's sanitizer keeps it), and text
    snap = view.snapshot()._repr_mimebundle_()
    assert set(snap) == {"text/html", "text/plain"}
    assert view.snapshot_class == "agm-snapshot-" + view.model_id
    assert f'<div class="agm-snapshot {view.snapshot_class}">' in snap["text/html"]
    # the snapshot's text is the trace's own summary, naming the backward call by its notebook line
    assert snap["text/plain"] == str(view.trace)
    assert "backward pass 1 (line 5: out.backward()): 6 nodes" in snap["text/plain"].splitlines()
    assert "<script" not in snap["text/html"]
    assert view.snapshot()._repr_mimebundle_(exclude={"text/html"}).keys() == {"text/plain"}


def test_the_page_s_ping_is_answered_and_nothing_else_is(shell):
    view = _view(shell, GRID_SETUP, GRID_CELL)
    sent = []
    view.send = lambda content, buffers=None: sent.append(content)

    def custom(content):
        view._handle_msg({"content": {"data": {"method": "custom", "content": content}}, "buffers": []})

    custom({"type": "ping", "n": 7})
    custom({"type": "ping", "n": "<img>"})
    custom({"type": "other"})
    custom("ping")
    assert sent == [{"type": "pong", "n": 7}, {"type": "pong", "n": 0}]


def test_the_magic_displays_this_view(shell, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.append(objs))
    shell.run_cell(GRID_SETUP)
    result = shell.run_cell("%%autograd --no-graph\n" + GRID_CELL)
    assert result.success
    ((view,), (snapshot,)) = shown  # two outputs: the widget first (the page draws it at once), then its snapshot
    assert isinstance(view, AutogradView)
    assert snapshot.model_id == view.model_id
    assert _numbers(_row(view.payload, "x")["grad"]) == pytest.approx(_plain_grid()[0].grad.flatten().tolist())


# ---- size and safety -----------------------------------------------------------------------


def _synthetic(n: int, hostile: str = "") -> Trace:
    """A 10,000-op trace as plain data: half top-level ops, half inside a module call."""
    records = []
    for i in range(n):
        p = Preview(shape=(64, 64), dtype="torch.float32", values=np.arange(36, dtype=np.float32).reshape(6, 6), summarized=True, min=0.0, max=1.0, mean=0.5, norm=3.0)
        records.append(
            Record(
                id=i, op="mul", name=(hostile or f"t{i}") if i % 7 == 0 else None, expr=f"t{i - 1} * w{i}", line=2 + i // 10,
                span=(2 + i // 10, 0, 2 + i // 10, 9), grad_fn="MulBackward0", requires_grad=True, is_leaf=False,
                inputs=[i - 1] if i else [], internal="Block.forward" if i % 2 else None, preview=p, grads={0: p},
            )
        )
    src = "\n" + "\n".join(f"t{i} = t{i - 1} * w{i}" for i in range(0, n, 10))
    return Trace(source=src, records=records, error=TraceError("ValueError", hostile or "boom", line=3))


def test_payload_of_ten_thousand_ops_stays_under_a_megabyte():
    from autograd_magic.render.payload import build_rows

    trace = _synthetic(10_000)
    payload = build_payload(trace)
    size = len(json.dumps(payload))
    assert size < 300_000, size  # the first screen; the rest is asked for page by page
    pages, more = [payload], payload["more_rows"]
    while more:
        start = sum(len(g["rows"]) + sum(len(c["rows"]) for c in g["folded"]) for p in pages for g in p["lines"])
        pages.append(build_rows(trace, None, start))
        more = pages[-1]["more_rows"]
    assert sum(len(json.dumps(p)) for p in pages) < 1_000_000
    top = sum(len(g["rows"]) for p in pages for g in p["lines"])
    folded = sum(c["count"] for p in pages for g in p["lines"] for c in g["folded"] if not c.get("more"))
    assert top + payload["hidden_rows"] + folded == 10_000  # every op is shown or counted


HOSTILE = '<img src=x onerror="window.__pwned=1"><script>alert(1)</script>'


def test_hostile_strings_travel_as_data_and_are_escaped_in_html(shell, monkeypatch):
    trace = _synthetic(30, hostile=HOSTILE)
    view = make_view(CellSession(None, trace.source, trace, None), graph=True)
    # the payload carries the text as text; the page sets it with textContent
    assert any(r["label"] == HOSTILE for r in _rows(view.payload))
    assert view.payload["error"]["message"] == HOSTILE
    data = view.snapshot()._repr_mimebundle_()
    assert "<img src=x" not in data["text/html"] and "<script>alert" not in data["text/html"]
    assert "<img src=x" not in view.graph_svg and "<script>alert" not in view.graph_svg
    # a graph failure's message is escaped too
    import autograd_magic.render.dot as dot

    monkeypatch.setattr(dot, "render_dot", lambda *a, **k: (_ for _ in ()).throw(ValueError(HOSTILE)))
    assert "<img" not in view._graph() and "&lt;img" in view._graph()


def test_front_end_never_parses_payload_text_as_html():
    js = (Path(__file__).resolve().parent.parent / "autograd_magic" / "notebook" / "widget.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", js)


def test_a_view_that_cannot_be_built_falls_back_to_the_snapshot(shell, monkeypatch):
    import autograd_magic.notebook.widget as widget

    shell.run_cell(GRID_SETUP)
    run = execute(shell, GRID_CELL, first_line=2, display=False, capture=True)
    monkeypatch.setattr(widget, "build_payload", lambda *a, **k: (_ for _ in ()).throw(KeyError(HOSTILE)))
    view = make_view(CellSession(shell, GRID_CELL, run.trace, None), graph=False)
    assert isinstance(view, widget.StaticView)
    data = view._repr_mimebundle_()
    assert set(data) == {"text/html", "text/plain"}
    assert "interactive view failed" in data["text/html"] and "<img src=x" not in data["text/html"]
