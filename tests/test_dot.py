"""The graph view's DOT: structure checked against torch's own autograd graph.

The reference is the real `grad_fn` graph of the tensors the cell made
(walked through `next_functions`), never our own output. The DOT is parsed
back with pygraphviz (the Graphviz parser itself).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pygraphviz
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autograd_magic.render.dot import render_dot
from autograd_magic.explain.fold import fold
from autograd_magic.render.layout import layout, svg_or_fallback_html
from autograd_magic.data.trace import Preview, Record, Trace

# ---------------------------------------------------------------- helpers


def _traced(shell, cell: str, flags: str = ""):
    shell.user_ns.pop("_t", None)
    result = shell.run_cell(f"%%autograd --quiet -o _t {flags}\n{cell}", store_history=False)
    return shell.user_ns["_t"], result


def _graph(dot: str) -> pygraphviz.AGraph:
    return pygraphviz.AGraph(string=dot)


def _classes(g: pygraphviz.AGraph, node: str) -> set[str]:
    return set((g.get_node(node).attr.get("class") or "").split())


def _op_name(g: pygraphviz.AGraph, node: str) -> str:
    """The grad_fn (or op) name an op node shows: the label's first line."""
    label = g.get_node(node).attr["label"]
    return re.match(r"<?([^<]+)<BR/>", label).group(1)


def _dot_backward_graph(g: pygraphviz.AGraph, root: str):
    """Autograd nodes reachable from record `root` in our drawing: Counter of names, of edges.

    Our drawing is data-flow: r<i> -> op<j> -> r<j>, acc<i> -> r<i>. The
    autograd node of record i is op<i> (if it has a grad_fn) or acc<i>.
    """

    def node_of(record: str):
        for src in g.predecessors(record):
            if src.startswith("acc"):
                return src
            if src.startswith("op") and "no-grad-fn" not in _classes(g, src):
                return src
        return None

    start = node_of(root)
    names: Counter = Counter()
    edges: set = set()
    seen, todo = set(), [start] if start else []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        names["AccumulateGrad" if n.startswith("acc") else _op_name(g, n)] += 1
        if n.startswith("acc"):
            continue
        for rec in g.predecessors(n):
            nxt = node_of(rec)
            if nxt is not None:
                edges.add((n, nxt))
                todo.append(nxt)
    edge_names = Counter(
        (_op_name(g, a), "AccumulateGrad" if b.startswith("acc") else _op_name(g, b)) for a, b in edges
    )
    return names, edge_names


def _torch_backward_graph(tensor):
    """The same from torch itself: walk grad_fn.next_functions."""
    names: Counter = Counter()
    edges: set = set()
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names[type(fn).__name__] += 1
        for nxt, _ in fn.next_functions:
            if nxt is not None:
                edges.add((fn, nxt))
                todo.append(nxt)
    edge_names = Counter((type(a).__name__, type(b).__name__) for a, b in edges)
    return names, edge_names


# ---------------------------------------------------------------- against torch

# (notebook, cell index, the tensor whose graph the cell builds entirely)
GRAPH_CELLS = [("000", 2, "y"), ("001", 5, "out"), ("002", 10, "w"), ("004", 0, "s"), ("004", 3, "out")]


@pytest.mark.parametrize("notebook, index, root", GRAPH_CELLS)
def test_seed_graph_matches_torch_next_functions(shell, seeds, notebook, index, root):
    cells = seeds.NOTEBOOKS[notebook]
    for cell in cells[:index]:
        shell.run_cell(cell, store_history=False)
    trace, _ = _traced(shell, cells[index])
    g = _graph(render_dot(trace))
    root_record = trace.last(root)
    assert root_record is not None
    ours = _dot_backward_graph(g, f"r{root_record.id}")
    theirs = _torch_backward_graph(shell.user_ns[root])
    assert ours == theirs


def test_polynomial_nodes_and_edges(shell):
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)")
    trace, _ = _traced(shell, "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()")
    g = _graph(trace.to_dot())
    x = trace.last("x") or next(r for r in trace.records if r.external)
    ops = [n for n in g.nodes() if n.startswith("op")]
    assert Counter(_op_name(g, n) for n in ops) == Counter(
        {"AddBackward0": 4, "MulBackward0": 3, "PowBackward0": 3}
    )
    # x feeds the three powers and 5*x, and its AccumulateGrad node fills x.grad
    assert sorted(_op_name(g, n) for n in g.successors(f"r{x.id}")) == sorted(
        ["PowBackward0"] * 3 + ["MulBackward0"]
    )
    assert g.has_edge(f"acc{x.id}", f"r{x.id}")
    # every record of the cell is a node named r<id>, each op feeds its record
    for r in trace.records:
        assert g.has_node(f"r{r.id}")
        if r.grad_fn:
            assert g.has_edge(f"op{r.id}", f"r{r.id}")
    # the drawn values and grads are the plain run's: y = 63, x.grad = 93
    y = trace.last("y")
    assert "data 63." in g.get_node(f"r{y.id}").attr["label"]
    assert "grad 93." in g.get_node(f"r{x.id}").attr["label"]


def test_every_seed_cell_gives_parseable_dot_and_svg(shell, seeds):
    for notebook, cells in seeds.NOTEBOOKS.items():
        shell.reset(new_session=False)
        for i, cell in enumerate(cells):
            trace, _ = _traced(shell, cell)
            dot = render_dot(trace)
            g = _graph(dot)
            drawn = {n for n in g.nodes() if n.startswith("r")}
            assert drawn == {f"r{r.id}" for r in trace.records}, (notebook, i)
            if notebook == "000":  # one notebook through the real layout is enough here
                result = layout(dot)
                assert result.svg is not None and result.svg.startswith("<svg"), (notebook, i, result.hint)
                for n in drawn:
                    assert f"<title>{n}</title>" in result.svg


# ---------------------------------------------------------------- styling of variants


def test_detach_variant_draws_the_cut(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    variant, _ = _traced(shell, "y = x * 3\nz = (y * y).sum()\nz.backward()", "--detach y")
    assert variant.variant_of is not None
    g = _graph(render_dot(variant.variant_of, variant=variant))
    y = variant.last("y")
    cut = [e for e in g.out_edges(f"r{y.id}") if "cut" in (e.attr.get("class") or "")]
    assert cut, "edges leaving the detached y must be drawn cut"
    assert "detached" in _classes(g, f"r{y.id}")
    # the variant changed z: its grad_fn and requires_grad differ from the real run
    z = variant.last("z")
    assert "changed" in _classes(g, f"r{z.id}")


def test_no_grad_variant_greys_ops(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    variant, _ = _traced(shell, "y = x * 3\nz = y.sum()", "--no-grad")
    g = _graph(render_dot(variant.variant_of, variant=variant))
    for r in variant.records:
        if not r.external:
            assert "no-grad" in _classes(g, f"r{r.id}")
            assert "no-grad" in _classes(g, f"op{r.id}")
            assert "changed" in _classes(g, f"r{r.id}")  # requires_grad True -> False
    x = variant.last("x")
    assert "external" in _classes(g, f"r{x.id}")


def test_user_detach_op_and_selection(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    trace, _ = _traced(shell, "y = x * 2\nd = y.detach()\nw = (d * x).sum()\nw.backward()")
    d = trace.last("d")
    g = _graph(render_dot(trace, selected=d.id))
    y = trace.last("y")
    edge = g.get_edge(f"r{y.id}", f"op{d.id}")
    assert "cut" in edge.attr["class"]
    assert "selected" in _classes(g, f"r{d.id}")
    assert not any("selected" in _classes(g, n) for n in g.nodes() if n != f"r{d.id}")


def test_inplace_op_marked(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    trace, _ = _traced(shell, "y = x * 2\ny.add_(1)\nz = y.sum()")
    g = _graph(render_dot(trace))
    inplace = [r for r in trace.records if r.inplace]
    assert inplace
    for r in inplace:
        assert "inplace" in _classes(g, f"op{r.id}")


# ---------------------------------------------------------------- folding

TRAIN_SETUP = """\
import torch, torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
X = torch.randn(128, 32)
Y = torch.randn(128, 1)"""

TRAIN = """\
for step in range({steps}):
    opt.zero_grad()
    loss = ((model(X) - Y) ** 2).mean()
    loss.backward()
    opt.step()"""


def test_training_loop_folds_under_max_nodes(shell):
    shell.run_cell(TRAIN_SETUP)
    trace, _ = _traced(shell, TRAIN.format(steps=200))
    g = _graph(render_dot(trace, max_nodes=60))
    assert len(g.nodes()) <= 60
    # model(X) ran inside modules: one call node per call, named after it
    calls = [n for n in g.nodes() if "call" in _classes(g, n)]
    assert calls and any("model(X)" in g.get_node(n).attr["label"] for n in calls)
    # loop runs beyond the kept ones are announced on the site's node
    assert any("more runs (not recorded)" in g.get_node(n).attr["label"] for n in g.nodes())


def test_every_op_kept_still_fits_and_keeps_the_loss(shell):
    shell.run_cell(TRAIN_SETUP)
    trace, _ = _traced(shell, TRAIN.format(steps=40), "--limit 100000")
    assert len(trace.records) > 300  # the budget has something to do
    for max_nodes in (300, 40, 12):
        g = _graph(render_dot(trace, max_nodes=max_nodes))
        assert len(g.nodes()) <= max_nodes
    last_loss = trace.last("loss")
    assert g.has_node(f"r{last_loss.id}") or any(
        last_loss.id in u.records for u in fold(trace, max_nodes=12).units if u.key != "more"
    )
    assert g.has_node("more") and "more nodes folded" in g.get_node("more").attr["label"]


def test_unfold_expands_a_call(shell):
    shell.run_cell(TRAIN_SETUP)
    trace, _ = _traced(shell, "out = model(X)\nloss = out.pow(2).mean()")
    folded = render_dot(trace)
    internal = [r for r in trace.records if r.internal and not r.external]
    assert len(internal) == 3  # linear, relu, linear
    g = _graph(folded)
    assert sum(g.has_node(f"r{r.id}") for r in internal) == 1  # one node for the call
    g2 = _graph(render_dot(trace, unfold=[internal[0].id]))
    for r in internal:
        assert g2.has_node(f"r{r.id}") and g2.has_node(f"op{r.id}")


# ---------------------------------------------------------------- escaping

HOSTILE = [
    '"; evil [label="x"]; a -> b; "',
    "{a|b}|<c>",
    "<script>alert(1)</script>",
    "</TD></TR></TABLE>> ] ; x -> y [",
    "a & b &amp; &#60; \\N \\l",
    "line1\nline2\r\n\"q\" 'q'",
    "\x00\x07tab\there",
]


def _hostile_trace(text: str) -> Trace:
    pv = Preview(shape=(2,), dtype="torch.float32", values=np.array([1.0, 2.0]))
    bad = Preview(shape=(3,), dtype=text, values=None, note=text)
    records = [
        Record(id=0, op="external", name=text, external=True, requires_grad=True, preview=pv, grads={0: bad}),
        Record(id=1, op=text, name=None, expr=text, line=1, span=(1, 0, 1, 4), grad_fn=text,
               requires_grad=True, is_leaf=False, inputs=[0], preview=bad, internal=None),
        Record(id=2, op="mul", name=text, expr=text, line=2, span=(2, 0, 2, 4), grad_fn="MulBackward0",
               requires_grad=True, is_leaf=False, inputs=[1, 0], preview=pv, module=text),
        Record(id=3, op=text, expr=text, line=3, span=(3, 0, 3, 4), internal="f" + text, module=text,
               requires_grad=True, is_leaf=False, grad_fn=text, inputs=[2], preview=pv),
    ]
    return Trace(source=text, records=records)


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_strings_neither_break_dot_nor_inject_svg(text):
    trace = _hostile_trace(text)
    dot = render_dot(trace)
    g = _graph(dot)
    assert set(g.nodes()) == {"r0", "acc0", "r1", "op1", "r2", "op2", "r3"}
    assert len(g.edges()) == 7
    svg = layout(dot).svg
    assert svg is not None
    assert "<script" not in svg.lower()
    fallback = svg_or_fallback_html(dot + " ", timeout=0.0)  # a new key: not served from the cache
    assert "am-graph-fallback" in fallback and "<script" not in fallback.lower()


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_string_keeps_the_node_set(text):
    g = _graph(render_dot(_hostile_trace(text)))
    assert set(g.nodes()) == {"r0", "acc0", "r1", "op1", "r2", "op2", "r3"}


# ---------------------------------------------------------------- what the widget relies on


def test_selection_recolours_without_moving_the_layout(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    trace, _ = _traced(shell, "y = x * 3\nz = (y * y).sum()\nz.backward()")
    plain = layout(render_dot(trace)).svg
    y = trace.last("y")
    picked = layout(render_dot(trace, selected=y.id)).svg
    assert plain != picked  # the colours differ ...
    geometry = re.compile(r'(?:points|viewBox|x|y|d)="[^"]*"')
    assert geometry.findall(plain) == geometry.findall(picked)  # ... the positions do not


def test_node_map_names_a_drawn_node_for_every_record(shell):
    shell.run_cell(TRAIN_SETUP)
    trace, _ = _traced(shell, TRAIN.format(steps=5))
    from autograd_magic.render.dot import node_map

    for max_nodes in (300, 10):
        g = _graph(render_dot(trace, max_nodes=max_nodes))
        mapping = node_map(trace, max_nodes=max_nodes)
        assert set(mapping) == {r.id for r in trace.records}
        assert all(g.has_node(name) for name in mapping.values())


def test_trace_to_svg_and_html(shell):
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)")
    trace, _ = _traced(shell, "y = x ** 2\ny.backward()")
    svg = trace.to_svg()
    assert svg.startswith("<svg") and f"<title>r{trace.last('y').id}</title>" in svg
    html = svg_or_fallback_html(trace, timeout=5.0)
    assert html.startswith('<div class="am-graph"') and "<svg" in html


def _unrolled_trace(steps: int) -> Trace:
    """h = tanh(h @ w) written out `steps` times: `w` is read from every step."""
    pv = Preview(shape=(2, 2), dtype="torch.float32", values=np.eye(2))
    recs = [
        Record(id=0, op="external", name="w", external=True, requires_grad=True, preview=pv),
        Record(id=1, op="external", name="h0", external=True, preview=pv),
    ]
    prev = 1
    for k in range(steps):
        mm = len(recs)
        recs.append(Record(id=mm, op="matmul", expr=f"h{k} @ w", line=k + 1, span=(k + 1, 5, k + 1, 11),
                           grad_fn="MmBackward0", requires_grad=True, is_leaf=False, inputs=[prev, 0], preview=pv))
        recs.append(Record(id=mm + 1, op="tanh", name=f"h{k + 1}", expr=f"torch.tanh(h{k} @ w)", line=k + 1,
                           span=(k + 1, 5, k + 1, 25), grad_fn="TanhBackward0", requires_grad=True,
                           is_leaf=False, inputs=[mm], preview=pv))
        prev = mm + 1
    return Trace(records=recs)


def test_far_reads_of_a_shared_tensor_start_from_copies():
    """Long edges from one hub are what made dot run for minutes; each far read gets a copy."""
    trace = _unrolled_trace(50)
    g = _graph(render_dot(trace, max_nodes=1000))
    proxies = [n for n in g.nodes() if "proxy" in _classes(g, n)]
    assert len(proxies) > 40
    for p in proxies:
        assert p.startswith("r0_p") and "w" in g.get_node(p).attr["label"]
        assert len(g.out_edges(p)) == 1 and g.out_edges(p)[0][1].startswith("op")
    assert len(g.out_edges("r0")) + len(proxies) == 50  # every read of w is still drawn
    # under a tight budget, far reads past it are left out and the legend says how many
    small = _graph(render_dot(trace, max_nodes=120))
    assert len(small.nodes()) <= 120
    assert "far reads of shared tensors not drawn" in small.graph_attr["label"]


def test_small_graphs_draw_every_read_directly(shell):
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)")
    trace, _ = _traced(shell, "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1")
    g = _graph(render_dot(trace))
    assert not [n for n in g.nodes() if "proxy" in _classes(g, n)]


def test_tensor_changed_in_place_after_use_is_marked(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    trace, _ = _traced(shell, "y = x * 2\nz = y.exp()\ny.add_(1)")
    g = _graph(render_dot(trace))
    y = next(r for r in trace.records if r.op == "mul")
    assert y.version_changed  # torch's version counter moved after exp saved y
    assert "modified in place later" in g.get_node(f"r{y.id}").attr["label"]
    assert any("inplace" in _classes(g, n) for n in g.nodes() if n.startswith("op"))


@pytest.mark.parametrize("line", ["torch.mul(a, b, out=c)", "c += a", "c.mul_(2)", "c.requires_grad = False"])
def test_a_node_of_a_line_that_changes_a_named_tensor_shows_the_line_as_written(shell, line):
    """`torch.mul(a, b, out=c)` binds nothing: its node reads as that line, not `c = torch.mul(...)`."""
    t, _ = _traced(shell, f"import torch\na = torch.ones(2)\nb = torch.ones(2) * 3\nc = torch.zeros(2)\n{line}")
    dot = render_dot(t)
    assert line in dot and f"= {line}" not in dot, dot
