"""The live view builds its first screen only; the rest comes when the page asks over the comm.

The first payload carries the table's first rows and each pass's first steps; more rows,
more steps and the graph's SVG are answers to the page's custom messages, not synced state.
References: plain PyTorch's own autograd graph (the nodes a backward pass runs) and the
whole table built in one go.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autograd_magic import limits
from autograd_magic.data.trace import Preview
from autograd_magic.explain.format import format_short, format_values
from autograd_magic.explain.stepper import describe_grad
from autograd_magic.notebook.session import CellSession
from autograd_magic.notebook.widget import AutogradView, make_view
from autograd_magic.render.payload import build_payload, cell_value
from autograd_magic.run.execute import execute
from autograd_magic.variants.sandbox import take_snapshot

MLP_SETUP = (
    "import torch\ntorch.manual_seed(0)\n"
    "net = torch.nn.Sequential(*[m for _ in range(8) for m in (torch.nn.Linear(6, 6), torch.nn.Tanh())])\n"
    "inp = torch.randn(3, 6)"
)
MLP_CELL = "loss = net(inp).pow(2).mean()\nloss.backward()"
LOOP_SETUP = "import torch\nx = torch.ones(3, requires_grad=True)"
LOOP_CELL = "h = x\nfor i in range(400):\n    h = h * 1.001 + 0.5\nh.sum().backward()"


def _view(shell, setup: str, cell: str, graph: bool = False, **kw) -> AutogradView:
    shell.run_cell(setup)
    snapshot = take_snapshot(shell, cell)
    run = execute(shell, cell, first_line=2, display=False, capture=True, **kw)
    return make_view(CellSession(shell, cell, run.trace, snapshot), graph=graph)


def _page(view):
    """What the page receives from custom messages, and a way to ask."""
    sent = []
    view.send = lambda content, buffers=None: sent.append(content)

    def ask(question):
        view._handle_msg({"content": {"data": {"method": "custom", "content": question}}, "buffers": []})
        return sent[-1] if sent else None

    return sent, ask


def _plain_mlp_nodes() -> list[str]:
    """The autograd nodes of the same model and loss in plain PyTorch (a walk of its graph)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(8) for m in (torch.nn.Linear(6, 6), torch.nn.Tanh())])
    inp = torch.randn(3, 6)
    loss = net(inp).pow(2).mean()
    seen, stack, names = set(), [loss.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_the_stepper_gets_every_step_page_by_page(shell):
    view = _view(shell, MLP_SETUP, MLP_CELL)
    (p,) = view.payload["passes"]
    plain = _plain_mlp_nodes()
    assert p["n_steps"] == len(plain) > limits.WIDGET_FIRST_STEPS
    assert len(p["steps"]) == limits.WIDGET_FIRST_STEPS  # the first screen only
    _sent, ask = _page(view)
    steps = list(p["steps"])
    while len(steps) < p["n_steps"]:
        answer = ask({"type": "steps", "pass": 0, "start": len(steps)})
        assert answer["type"] == "steps" and answer["version"] == view.payload["version"]
        assert answer["start"] == len(steps) and answer["steps"]
        steps.extend(answer["steps"])
    # every node plain PyTorch's graph has, each once, the loss's node first
    assert sorted(s["node"] for s in steps) == sorted(plain)
    assert steps[0]["node"] == type(torch.tensor(1.0, requires_grad=True).pow(2).mean().grad_fn).__name__
    assert [s["i"] for s in steps] == list(range(len(steps)))
    # junk questions are ignored, answered by nothing
    before = len(_sent)
    for q in ({"type": "steps", "pass": "0", "start": 0}, {"type": "steps", "pass": 0, "start": -1}, {"type": "steps"},
              {"type": "rows", "start": 1.5}, {"type": "nope"}, ["steps"]):
        ask(q)
    assert len(_sent) == before and view.status == ""


def test_rows_past_the_first_screen_come_page_by_page_and_match_the_whole_table(shell):
    view = _view(shell, LOOP_SETUP, LOOP_CELL, detail_limit=10_000)
    first = view.payload
    assert first["more_rows"] > 0 and first["hidden_rows"] == 0
    _sent, ask = _page(view)
    pages = [first]
    while pages[-1]["more_rows"]:
        loaded = sum(len(g["rows"]) + sum(len(c["rows"]) for c in g["folded"]) for p in pages for g in p["lines"])
        answer = ask({"type": "rows", "start": loaded})
        assert answer["type"] == "rows" and answer["start"] == loaded and answer["version"] == first["version"]
        pages.append(answer)
    whole = build_payload(view.trace, max_rows=limits.WIDGET_ROWS)  # the table in one go
    assert whole["more_rows"] == 0

    def flat(ps):
        return [(g["line"], r["id"], json.dumps(r, sort_keys=True)) for p in ps for g in p["lines"] for r in g["rows"]]

    assert flat(pages) == flat([whole])
    # the loop's numbers are torch's: h after 400 steps
    h = torch.ones(3)
    for _ in range(400):
        h = h * 1.001 + 0.5
    assert float(whole["lines"][-2]["rows"][-1]["value"].strip("[]").split(",")[0]) == pytest.approx(h[0].item(), rel=1e-4)


def test_the_graph_is_laid_out_when_the_page_asks_and_is_not_synced_state(shell, monkeypatch):
    import autograd_magic.notebook.widget as widget

    calls = []
    real = widget.svg_or_fallback_html
    monkeypatch.setattr(widget, "svg_or_fallback_html", lambda *a, **k: calls.append(1) or real(*a, **k))
    view = _view(shell, MLP_SETUP, MLP_CELL, graph=True)
    assert calls == []  # the cell returned without a layout for the widget
    assert "graph_svg" not in view.get_state() and view.payload["graph"] is True
    sent, ask = _page(view)
    answer = ask({"type": "graph"})
    assert answer["type"] == "graph" and "<svg" in answer["svg"] and calls == [1]
    # a re-run shows another graph: the page that showed one gets it pushed
    view.no_grad = True
    assert sent[-1]["type"] == "graph" and sent[-1]["version"] == view.payload["version"] != answer["version"]
    # what the kernel sets (as the SVG security test does) reaches the page too
    view.graph_svg = "<svg></svg>"
    assert sent[-1] == {"type": "graph", "svg": "<svg></svg>", "version": view.payload["version"]}


def test_answers_after_a_rerun_carry_the_new_version(shell):
    view = _view(shell, MLP_SETUP, MLP_CELL)
    v0 = view.payload["version"]
    _sent, ask = _page(view)
    view.no_grad = True  # the no_grad variant: its backward raises, as plain PyTorch's does under no_grad
    with pytest.raises(RuntimeError):
        with torch.no_grad():
            torch.nn.Linear(2, 2)(torch.ones(2)).sum().backward()
    (p,) = view.payload["passes"]
    assert view.payload["version"] != v0 and p["error"] and p["n_steps"] == 0
    assert ask({"type": "steps", "pass": 0, "start": 0}) == {"type": "steps", "pass": 0, "start": 0, "steps": [], "version": view.payload["version"]}
    view.no_grad = False
    assert ask({"type": "steps", "pass": 0, "start": 20})["steps"]


TRANSFORMER_SETUP = (
    "import torch, warnings\nwarnings.filterwarnings('ignore')\ntorch.manual_seed(0)\n"
    "m = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 4, 512, batch_first=True), 6)\n"
    "inp = torch.randn(8, 32, 256)"
)


def test_a_transformer_cell_s_widget_state_stays_under_its_bound(shell, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.append(objs))
    shell.run_cell(TRANSFORMER_SETUP)
    assert shell.run_cell("%%autograd\nm(inp).pow(2).mean().backward()").success
    ((view,), (_snapshot,)) = shown
    state = len(json.dumps(view.get_state()))
    assert state <= limits.WIDGET_STATE_BYTES, state
    (p,) = view.payload["passes"]
    assert p["n_steps"] > len(p["steps"])  # the rest of the ~450 steps are asked for
    # the first row's gradient is torch's: the parameters' .grad after the same backward
    assert shell.user_ns["m"].layers[0].linear1.weight.grad is not None


# ---- formatting shortcuts: the same text as formatting every value -----------------------------


def _previews():
    rng = np.random.default_rng(0)
    for shape in [(), (1,), (3,), (20,), (21,), (6, 6), (6, 6, 6), (7,), (1, 144), (145,), (3, 50), (2, 3)]:
        for vals in (rng.standard_normal(shape).astype(np.float32), np.full(shape, 2.0, np.float32), np.arange(int(np.prod(shape))).reshape(shape)):
            yield Preview(shape=shape, dtype=str(vals.dtype), values=vals, min=0.0, max=1.0, mean=0.5, norm=1.0)
    yield Preview(shape=(64, 64), dtype="torch.float32", values=np.ones((6, 6), np.float32), summarized=True, mean=1.0)
    yield Preview(shape=(9, 9, 9), dtype="torch.float32", values=np.ones((6, 6, 6), np.float32), summarized=True, mean=1.0)


def test_cell_values_are_what_formatting_every_value_gives():
    for p in _previews():
        text = format_values(p, indent=0)
        lines = text.splitlines()
        fits = len(lines) <= 4 and all(len(line) <= 72 for line in lines)
        assert cell_value(p) == (text if fits else format_short(p, 60)), p.shape
        if not (p.complete and p.numel > 1 and np.all(np.asarray(p.values) == np.asarray(p.values).reshape(-1)[0])):
            assert describe_grad(p) == format_short(p, 60), p.shape
