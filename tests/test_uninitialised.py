"""A module's torch.empty (the room its __init__ makes for its weights) is shown as what it is.

`torch.nn.Linear(4, 8)` makes its weight and bias with torch.empty and fills
them in place (kaiming_uniform_, uniform_). The tensors torch.empty returns
hold leftover memory; the views must not show those numbers under the
module's line as if they were the weights. A real cell, checked against
plain PyTorch with the same seed.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from autograd_magic.explain.why import explain_record
from autograd_magic.explain.wording import record_label
from autograd_magic.render.payload import build_detail, build_payload

CELL = "torch.manual_seed(0)\nlin = torch.nn.Linear(4, 8)\nout = lin(torch.ones(2, 4)).sum()\nout.backward()"


def traced(shell, body=CELL):
    shell.run_cell("import torch")
    result = shell.run_cell("%%autograd --quiet -o t\n" + body)
    assert result.success, result.error_in_exec
    return shell.user_ns.pop("t")


def plain_linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 8)


def folded_rows(payload, call):
    return [r for g in payload["lines"] for c in g["folded"] if c["call"] == call for r in c["rows"]]


def test_linear_init_rows_are_named_as_uninitialised_memory(shell):
    t = traced(shell)
    rows = folded_rows(build_payload(t), "Linear.__init__")
    assert [r["label"] for r in rows] == ["torch.empty(8, 4) inside Linear.__init__", "torch.empty(8) inside Linear.__init__"]
    for r in rows:
        assert "torch.nn.Linear(4, 8)" not in r["label"] and r.get("expr") is None
        assert r["value"].startswith("uninitialised memory, filled in place by ")
        assert not re.search(r"\d\.\d", r["value"])  # no leftover numbers
    assert "kaiming_uniform_ in Linear.reset_parameters: see `lin.weight`" in rows[0]["value"]
    assert "uniform_ in Linear.reset_parameters: see `lin.bias`" in rows[1]["value"]


def test_the_values_shown_for_the_weights_are_the_initialised_ones(shell):
    t = traced(shell)
    plain = plain_linear()
    for name, param in (("lin.weight", plain.weight), ("lin.bias", plain.bias)):
        shown = [r for r in t.records if r.name == name]
        assert shown, name
        for r in shown:  # the parameter row and the in-place init row: the values plain PyTorch starts with
            assert np.allclose(np.asarray(r.preview.values), param.detach().numpy()), name


def test_detail_and_why_say_where_the_weights_are(shell):
    t = traced(shell)
    empty = next(r for r in t.records if r.op == "empty" and r.shape == (8, 4))
    d = build_detail(t, empty.id)
    assert d["label"] == "torch.empty(8, 4) inside Linear.__init__"
    assert d["value"].startswith("uninitialised memory") and d["stats"] is None
    why = " ".join(explain_record(t, empty.id))
    assert "reserves memory without setting any values" in why and "`lin.weight` shows the values it starts with" in why
    assert "requires_grad was never set" not in why
    assert plain_linear().weight.requires_grad  # what "the tensor that requires grad" refers to
    assert "keeps this memory as `lin.weight`, the tensor that requires grad" in why


def _dot_node(dot: str, rid: int) -> str:
    (node,) = [line for line in dot.splitlines() if line.strip().startswith(f"r{rid} [")]
    return node


def _html_row(html: str, rid: int) -> str:
    start = html.index(f'<tr data-record="{rid}">')
    return html[start : html.index("</tr>", start)]


def test_static_html_and_graph_do_not_print_the_leftover_values(shell):
    # Each empty record's own node and row, not the whole drawing: leftover memory can hold any
    # numbers, also ones another row shows for real (a gradient of ones has mean 1)
    t = traced(shell)
    empty = [r for r in t.records if r.op == "empty"]
    assert len(empty) == 2
    html = t.to_html()
    dot = t.to_dot(unfold=[r.id for r in empty])
    for r in empty:
        node, row = _dot_node(dot, r.id), _html_row(html, r.id)
        assert record_label(r) in node and "data uninitialised" in node
        assert "mean" not in node and not re.search(r"\d\.\d", node)
        assert "uninitialised memory" in row and "tensor(" not in row and not re.search(r"\d\.\d", row)
        garbage = f"{r.preview.mean:.4g}" if r.preview.mean is not None else None
        if garbage and garbage not in ("0", "nan"):
            # as a number the drawing shows, not a digit of the node's id, a size or the shape
            shown = " ".join(re.findall(r">([^<>]+)<", node)).replace(record_label(r), "")
            shown = shown.replace("(" + ", ".join(map(str, r.shape)) + ")", "")
            assert not re.search(rf"(?<![\w.]){re.escape(garbage)}(?![\w.])", shown), shown
            assert f">{garbage}<" not in row


def test_a_users_own_torch_empty_keeps_its_name_and_value(shell):
    t = traced(shell, "x = torch.empty(3)\ny = x.fill_(2.0) * 1")
    rec = next(r for r in t.records if r.op == "empty")
    assert rec.name == "x" and record_label(rec) == "x"
    row = next(r for g in build_payload(t)["lines"] for r in g["rows"] if r["id"] == rec.id)
    assert "uninitialised memory" not in row["value"]  # the value as torch prints it
    assert "uninitialised memory" in " ".join(build_detail(t, rec.id)["facts"])
    assert "fill_ on line 3 then fills it in place." in " ".join(explain_record(t, rec.id))
