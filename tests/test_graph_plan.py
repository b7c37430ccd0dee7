"""The compiled backward plan (capture/_graph.c) gives the answer the Python one gives.

Before each recorded pass the recorder walks the graph and decides what each
node is hooked for (backward.py's `_plan_py`). Each graph here is planned by
both, and every part of the plan must match; the walk is also checked against
the graph itself (every node reachable from the roots, each once, and every
edge between them), so that two equally wrong plans cannot pass. Whole traces
are then compared with the compiled plan switched on and off.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autograd_magic as am
from autograd_magic.capture import backward as bw, preview

compiled = pytest.mark.skipif(bw._plan_c is None, reason="the compiled plan is not built")


class Twice(torch.autograd.Function):
    """A custom Function with two outputs, one input unused in backward."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a)
        return a * 2, a + b

    @staticmethod
    def backward(ctx, ga, gb):
        (a,) = ctx.saved_tensors
        return ga * 2 + gb, gb


def _mlp_loss():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return [m(torch.randn(5, 4)).pow(2).mean()]


def _shared_input():
    x = torch.randn(3, requires_grad=True)
    y = x * x + x.sin() * x  # x feeds four slots: no hand-off into its AccumulateGrad
    return [y.sum()]


def _views():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 4)
    y = (x @ w).t().reshape(-1)[1:].unsqueeze(0)
    return [y.sum()]


def _multi_output():
    x = torch.randn(6, requires_grad=True)
    a, b, c = x.split(2)
    return [(a * b + c.exp()).sum()]


def _custom():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    p, q = Twice.apply(a, b)
    return [(p * q).sum()]


def _two_roots():
    x = torch.randn(3, requires_grad=True)
    h = x.exp()
    return [h.sum(), (h * 2).mean()]


def _rnn():
    torch.manual_seed(1)
    cell = torch.nn.RNNCell(3, 4)
    h = torch.zeros(1, 4)
    for _ in range(6):
        h = cell(torch.randn(1, 3), h)
    return [h.sum()]


def _leaf_root():
    return [torch.randn(3, requires_grad=True)]


def _first_layer_input_needs_no_grad():
    lin = torch.nn.Linear(3, 2)
    return [lin(torch.randn(4, 3)).sum()]


GRAPHS = {f.__name__.lstrip("_"): f for f in (_mlp_loss, _shared_input, _views, _multi_output, _custom, _two_roots,
                                               _rnn, _leaf_root, _first_layer_input_needs_no_grad)}


def _start(roots):
    return [t.grad_fn for t in roots if t.grad_fn is not None]


def _same(py, c):
    names = ("nodes", "names", "variables", "keys", "edges_of", "all_edges", "handoffs", "posts", "fed")
    assert len(py) == len(c) == len(names)
    for label, a, b in zip(names, py, c):
        if label in ("nodes", "variables"):
            assert [id(x) for x in a] == [id(x) for x in b], label
        else:
            assert a == b, label


def _reachable(start):
    """Every node reachable from `start`, found by a breadth-first search of its own."""
    seen, frontier = {}, [n for n in start if n is not None]
    while frontier:
        nxt = []
        for n in frontier:
            if id(n) not in seen:
                seen[id(n)] = n
                nxt.extend(m for m, _ in n.next_functions if m is not None)
        frontier = nxt
    return seen


@compiled
@pytest.mark.parametrize("all_run", [True, False])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_the_compiled_plan_is_the_python_plan(name, all_run):
    roots = GRAPHS[name]()
    start = _start(roots)
    py = bw._plan_py(start, bw.MAX_WALK, all_run)
    c = bw._plan_c(start, bw.MAX_WALK, all_run)
    _same(py, c)
    nodes, names, variables, keys, edges_of, all_edges, handoffs, posts, fed = c
    # the walk against the graph itself
    reach = _reachable(start)
    assert sorted(id(n) for n in nodes) == sorted(reach)
    assert names == [n.name().rpartition("::")[2] for n in nodes]
    pos = {id(n): i for i, n in enumerate(nodes)}
    expected_edges = sorted((i, pos[id(m)]) for i, n in enumerate(nodes) for m, _ in n.next_functions if m is not None)
    assert sorted(all_edges) == expected_edges
    assert keys == [(n._sequence_nr(), type(n).__name__) for n in nodes]
    for n, v in zip(nodes, variables):
        if type(n).__name__ == "AccumulateGrad":
            assert v is n.variable
    # AccumulateGrad never gets a post-hook; with not every node running, every other node does
    assert not any(p for p, nm in zip(posts, names) if nm == "AccumulateGrad")
    if not all_run:
        assert all(p for p, nm in zip(posts, names) if nm != "AccumulateGrad")


@compiled
def test_the_compiled_plan_stops_where_the_python_one_does():
    roots = _rnn()
    start = _start(roots)
    for limit in (1, 2, 5, 17):
        py = bw._plan_py(start, limit, True)
        c = bw._plan_c(start, limit, True)
        _same(py, c)
        assert len(c[0]) == limit
        # an edge to a node past the limit leads nowhere in the plan
        assert all(t is None or t < limit for edges in c[4] for t, _ in edges)


@compiled
def test_a_plan_that_cannot_read_a_node_raises_as_the_python_one_does():
    class Broken:
        @property
        def next_functions(self):
            raise RuntimeError("no graph here")

    for plan in (bw._plan_py, bw._plan_c):
        with pytest.raises(RuntimeError, match="no graph here"):
            plan([Broken()], bw.MAX_WALK, True)


_OPS = [
    lambda a, b: a * b,
    lambda a, b: a + b.sin(),
    lambda a, b: (a - b).tanh(),
    lambda a, b: a.t().t() * b,
    lambda a, b: torch.stack([a, b]).sum(0),
    lambda a, b: a.exp() / (1 + b * b),
]


@compiled
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_OPS) - 1), st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=25),
       st.booleans())
def test_the_compiled_plan_matches_on_random_graphs(steps, all_run):
    torch.manual_seed(0)
    values = [torch.randn(2, 2, requires_grad=True) for _ in range(3)] + [torch.randn(2, 2)]
    for op, i, j in steps:
        values.append(_OPS[op](values[i % len(values)], values[j % len(values)]))
    roots = [v.sum() for v in values[-2:] if v.requires_grad]
    start = _start(roots)
    _same(bw._plan_py(start, bw.MAX_WALK, all_run), bw._plan_c(start, bw.MAX_WALK, all_run))


def test_the_compiled_plan_is_built_and_used():
    # `make setup` compiles it; a silent fallback to the Python plan would hide a broken build
    assert bw._plan_c is not None and bw._plan is bw._plan_c


CELLS = [
    "y = (x * x).sum(); y.backward()",
    "h = torch.tanh(w @ x); l = (h * h).sum() + h.mean(); l.backward()",
    "g, = torch.autograd.grad((x.exp() * w[0]).sum(), [x])",
    "a, b = Twice.apply(x, w[0]); (a * b).sum().backward(inputs=[x])",
]


def _env() -> dict:
    torch.manual_seed(0)
    return {"torch": torch, "Twice": Twice, "x": torch.randn(3, requires_grad=True),
            "w": torch.randn(3, 3, requires_grad=True)}


def _passes(cell: str):
    env = _env()
    with am.trace() as t:
        exec(cell, env)
    return [(p.nodes, sorted(p.edges), [(s.node, s.node_id, s.records, s.next_ids,
                                         [None if g is None else (g.shape, g.min, g.max, g.norm) for g in s.grad_in],
                                         [None if g is None else (g.shape, g.min, g.max, g.norm) for g in s.grad_out])
                                        for s in p.steps]) for p in t.passes]


prehook_compiled = pytest.mark.skipif(bw._pre_hook is bw._PreHook, reason="the compiled pre-hook is not built")


def test_the_compiled_pre_hook_is_built_and_used():
    assert bw._pre_hook is not bw._PreHook and type(bw._pre_hook).__name__ == "type"
    assert bw._pre_hook.__name__ == "PreHook"


CELLS += [
    # fan-in: the engine sums into one slot, so senders get post-hooks and hold nothing
    "h = x.exp(); l = (h * h).sum() + (h * 3).sum(); l.backward()",
    # a leaf's .grad accumulating over two passes (AccumulateGrad's leaf entries)
    "l = (w @ x).sum(); l.backward(retain_graph=True); l.backward()",
    # views sent on (TBackward, expand): post-hooks preview while the received one lives
    "l = (w.t() @ x).sum() + x.expand(2, 3).sum(); l.backward()",
]


@compiled
@prehook_compiled
@pytest.mark.parametrize("python_part", ["_plan", "_pre_hook"])
@pytest.mark.parametrize("cell", CELLS)
def test_traces_are_the_same_with_the_compiled_or_the_python_part(cell, python_part, monkeypatch):
    fast = _passes(cell)
    monkeypatch.setattr(bw, python_part, {"_plan": bw._plan_py, "_pre_hook": bw._PreHook}[python_part])
    slow = _passes(cell)
    assert fast == slow
    assert fast and all(nodes and steps for nodes, _, steps in fast)
    # against plain torch: every pass sends each leaf the same share of its final .grad
    env = _env()
    exec(cell, env)
    if "grad(" not in cell and "inputs=" not in cell:
        for _, _, steps in fast:
            got = sorted(s[4][0][3] for s in steps if s[0] == "AccumulateGrad")
            want = sorted(float(env[k].grad.norm()) / len(fast) for k in ("x", "w") if env[k].grad is not None)
            assert got == pytest.approx(want, rel=1e-5)


@prehook_compiled
@pytest.mark.parametrize("which", ["compiled", "python"])
def test_a_pre_hook_that_fails_notes_it_and_backward_still_runs(which, monkeypatch):
    if which == "python":
        monkeypatch.setattr(bw, "_pre_hook", bw._PreHook)

    def broken(seen, dense, g):
        raise ValueError("preview broke")

    monkeypatch.setattr(preview, "_cache_get", broken)  # every pass's PreviewCache.get
    x = torch.randn(3, requires_grad=True)
    with am.trace() as t:
        y = (x * x).sum()
        y.backward()
    assert torch.allclose(x.grad, 2 * x.detach())
    assert any("part of a backward pass was not recorded: ValueError: preview broke" in n for n in t.notes)


@prehook_compiled
def test_a_keyboard_interrupt_in_a_pre_hook_reaches_the_user(monkeypatch):
    def interrupted(seen, dense, g):
        raise KeyboardInterrupt

    monkeypatch.setattr(preview, "_cache_get", interrupted)
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(KeyboardInterrupt):
        with am.trace():
            (x * x).sum().backward()
    # and torch-function dispatch is back on: a mode sees ops again
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        x + 1
    assert seen


def _compiled_pre_hook():
    from autograd_magic.capture import backward as backward_mod

    hook = getattr(backward_mod._graph, "PreHook", None) if backward_mod._plan_c is not None else None
    if hook is None:
        pytest.skip("the compiled pre-hook is not built")
    return backward_mod, hook


def test_a_compiled_pre_hook_never_initialised_raises_instead_of_crashing():
    _, hook = _compiled_pre_hook()
    with pytest.raises(TypeError, match="__init__"):
        hook.__new__(hook)((torch.ones(1),))


def test_a_pre_hook_s_own_failure_is_noted_as_it_is_in_python():
    """The first failing read is the one noted (not a SystemError of a second read made with
    the first one's error still set), in the compiled hook as in its Python twin."""
    backward_mod, compiled = _compiled_pre_hook()

    class Recorder:
        def __init__(self):
            self.notes = []

        def _missed(self, exc):
            self.notes.append(f"{type(exc).__name__}: {exc}")

    class Shared:  # what a pass's hooks share (`_PassHooks`), with one read that fails
        def __init__(self):
            self.recorder, self.p, self.by_node, self.held, self.steps = Recorder(), None, {}, {}, []
            self.get = lambda g: None

        @property
        def accumulated(self):
            raise ValueError("accumulated is gone")

        @property
        def version_seen(self):  # Python code: it would run with the error above still set
            return lambda g: 0

    leaf = torch.randn(3, requires_grad=True)
    noted = []
    for hook in (compiled, backward_mod._PreHook):
        shared = Shared()
        assert hook(shared, 0, "AccumulateGrad", [], [], (), True, leaf)((torch.ones(3),)) is None
        noted.append(shared.recorder.notes)
    assert noted[0] == noted[1] == ["ValueError: accumulated is gone"]
