"""The compiled site walk and mode handler (capture/_walk.c) give the answers the Python ones give.

Where each op came from (its span, what it ran inside, the module, the loop
site it counts towards) is found by walking the stack for every op; the
compiled walk runs where it is built, the Python one elsewhere. Each program
here is traced on both, in the same shell from the same state, and every
record's attribution must match; a few facts are also checked against what
the program plainly does, so that two equally wrong walks cannot pass.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from torch.overrides import TorchFunctionMode

from autograd_magic.capture import sites as sites_mod
from autograd_magic.capture import tracer as tracer_mod
from autograd_magic.capture.finite import UNINITIALISED
from fuzz_programs import fresh_shell, programs
from fuzz_programs import run as run_fuzz

compiled = pytest.mark.skipif(sites_mod._Walker is None, reason="the compiled site walk is not built")
handler_compiled = pytest.mark.skipif(tracer_mod._ModeCore is None, reason="the compiled mode handler is not built")


@pytest.fixture(scope="module")
def fuzz_shell():
    return fresh_shell()

SETUP = """
import torch
import torch.nn as nn
import torch.nn.functional as F
torch.manual_seed(0)
"""

PROGRAMS = {
    "top level": "x = torch.randn(3, requires_grad=True)\ny = (x * 2 + 1).sin().sum()\ny.backward()",
    "function of the cell": (
        "def f(a):\n    return a.exp() * 3\n"
        "x = torch.randn(4, requires_grad=True)\nz = f(x) + f(x * 2)\nz.sum().backward()"
    ),
    "module of the cell": (
        "class Block(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.lin = nn.Linear(4, 4)\n"
        "    def forward(self, x):\n        h = self.lin(x)\n        return torch.tanh(h) + helper(h)\n"
        "def helper(h):\n    return h.relu()\n"
        "net = nn.Sequential(Block(), nn.ReLU(), Block())\n"
        "out = net(torch.randn(2, 4)).pow(2).mean()\nout.backward()"
    ),
    "torch modules and functional": (
        "m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))\n"
        "X, Y = torch.randn(5, 8), torch.randn(5, 1)\n"
        "loss = F.mse_loss(m(X), Y)\nloss.backward()"
    ),
    "training loop past the limit": (
        "m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "X, Y = torch.randn(16, 4), torch.randn(16, 1)\n"
        "for _ in range(30):\n"
        "    opt.zero_grad()\n"
        "    loss = F.mse_loss(m(X), Y)\n"
        "    loss.backward()\n"
        "    opt.step()"
    ),
    "lambda, comprehension, generator": (
        "x = torch.randn(3, requires_grad=True)\n"
        "sq = lambda t: t * t\n"
        "parts = [sq(x[i]) for i in range(3)]\n"
        "total = sum(p for p in parts)\n"
        "total.backward()"
    ),
    "decorated, nested, recursive": (
        "@torch.no_grad()\ndef frozen(a):\n    return a * 10\n"
        "def outer(a):\n    def inner(b):\n        return b.sigmoid()\n    return inner(a) + frozen(a)\n"
        "def depth(a, n):\n    return a if n == 0 else depth(a * 1.5, n - 1)\n"
        "x = torch.randn(3, requires_grad=True)\ny = (outer(x) + depth(x, 4)).sum()\ny.backward()"
    ),
    "generator and class body": (
        "x = torch.randn(2, 3, requires_grad=True)\n"
        "def rows(t):\n    for r in t:\n        yield r.exp()\n"
        "class Holder:\n    scale = torch.tensor(2.0)\n"
        "total = torch.stack(list(rows(x))).mul(Holder.scale).sum()\ntotal.backward()"
    ),
    "tensors nested in lists": (
        "a = torch.tensor(1.0, requires_grad=True)\nb = torch.tensor(2.0)\n"
        "m = torch.tensor([[a.detach(), b]]) * a\nparts = torch.cat([a.reshape(1), b.reshape(1)], dim=0)\n"
        "(m.sum() + parts.sum()).backward()"
    ),
    "an error half-way": "x = torch.randn(3, requires_grad=True)\ny = x * 2\nz = y @ torch.randn(4, 4)",
}


def _attribution(trace) -> list[tuple]:
    """Where each record came from, and what the compiled handler's own records of an op's first runs
    fill in besides (tracer.py's `_record_op` in Python): every field a view reads, the gradients by pass."""
    def shown(p, op=None):
        if p is None:
            return None
        if op in UNINITIALISED:  # whatever the memory held: it differs from run to run
            return p.shape, p.dtype
        return (p.shape, p.dtype, *("nan" if v != v else v for v in (p.min, p.max, p.mean, p.norm)))  # nan == nan

    return [(r.op, r.span, r.line, r.expr, r.internal, r.module, r.occurrence, r.run, r.name, r.grad_fn,
             r.requires_grad, r.is_leaf, r.grad_enabled, r.inplace, r.mutates, r.external, r.inputs, r.output_index,
             r.version_changed, r.retains_grad, shown(r.preview, r.op), shown(r.attr_grad),
             sorted((k, shown(v)) for k, v in r.grads.items())) for r in trace.records]


def _run_on(path: str, shell, cell: str, monkeypatch):
    from autograd_magic.notebook.session import earlier_cells
    from autograd_magic.run.execute import execute

    with monkeypatch.context() as m:
        if path == "python":
            m.setattr(sites_mod, "_Walker", None)
        elif path == "python handler":
            m.setattr(tracer_mod, "_Mode", tracer_mod._PyMode)
        shell.reset(new_session=False)
        shell.run_cell(SETUP, store_history=False, silent=True)
        run = execute(shell, cell, first_line=2, earlier=earlier_cells(shell))
    return run.trace, run.error


class _Below(TorchFunctionMode):
    """A user's mode entered before the cell: below ours on torch's stack, it sees every call
    ours passes on, and none of the tracer's own reads."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_compiled_walk_is_built_and_used():
    # `make setup` compiles it; a silent fallback to the Python walk would hide a broken build
    from autograd_magic.capture.source import SourceMap

    assert sites_mod._Walker is not None
    finder = sites_mod.SiteFinder(SourceMap("<nowhere>", "x = 1"), anchor=lambda c: False, module_name=str)
    assert isinstance(finder.find.__self__, sites_mod._Walker)


def test_the_compiled_mode_handler_is_built_and_used():
    assert tracer_mod._ModeCore is not None and issubclass(tracer_mod._Mode, tracer_mod._ModeCore)
    assert type(tracer_mod._Mode.__torch_function__).__name__ == "method_descriptor"


@handler_compiled
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_a_users_mode_below_ours_sees_the_same_calls_on_both_handlers(name, shell, monkeypatch):
    cell = PROGRAMS[name]
    results = {}
    for path in ("compiled", "python handler"):
        below = _Below()
        with below:
            trace, error = _run_on(path, shell, cell, monkeypatch)
        results[path] = (_attribution(trace), trace.repeats, trace.notes, type(error), below.seen)
    assert results["compiled"] == results["python handler"]
    assert results["compiled"][4]  # it saw the cell's calls at all


@compiled
@pytest.mark.parametrize("path", ["python", "python handler"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_the_compiled_walk_attributes_every_op_as_the_python_walk_does(name, path, shell, monkeypatch):
    if path == "python handler" and tracer_mod._ModeCore is None:
        pytest.skip("the compiled mode handler is not built")
    cell = PROGRAMS[name]
    fast, fast_error = _run_on("compiled", shell, cell, monkeypatch)
    slow, slow_error = _run_on(path, shell, cell, monkeypatch)
    assert type(fast_error) is type(slow_error)
    assert _attribution(fast) == _attribution(slow)
    assert fast.repeats == slow.repeats
    assert [p.line for p in fast.passes] == [p.line for p in slow.passes]
    assert fast.notes == slow.notes
    assert fast.records  # something was recorded at all


@compiled
def test_the_compiled_walk_names_modules_and_inner_calls(shell, monkeypatch):
    """Facts of the program itself, on the compiled walk (lines count from the %%autograd line): each
    Block's ops carry its name in the Sequential, its Linear's op ran inside `Linear.forward` at the
    line that called it, `helper` (the cell's own function) shows its own line, not its caller's."""
    trace, error = _run_on("compiled", shell, PROGRAMS["module of the cell"], monkeypatch)
    assert error is None
    by_op = {}
    for r in trace.records:
        by_op.setdefault(r.op, []).append(r)
    assert [(r.module, r.line, r.internal) for r in by_op["tanh"]] == [("net.0", 8, None), ("net.2", 8, None)]
    assert [(r.module, r.line, r.expr) for r in by_op["linear"]] == [("net.0.lin", 7, "self.lin(x)"), ("net.2.lin", 7, "self.lin(x)")]
    assert {r.internal for r in by_op["linear"]} == {"Linear.forward"}
    helper = [r for r in by_op["relu"] if r.expr == "h.relu()"]
    assert [(r.module, r.line, r.internal) for r in helper] == [("net.0", 10, None), ("net.2", 10, None)]
    (pow_,) = by_op["pow"]
    assert (pow_.line, pow_.internal, pow_.module) == (12, None, None)


@compiled
def test_a_loop_counts_as_one_site_per_op_on_the_compiled_walk(shell, monkeypatch):
    from autograd_magic import limits

    trace, error = _run_on("compiled", shell, PROGRAMS["training loop past the limit"], monkeypatch)
    assert error is None
    linear = [r for r in trace.records if r.op == "linear"]
    assert len(linear) == 2 * min(30, limits.DETAIL_LIMIT)  # two layers, each its own site
    assert {r.module for r in linear} == {"m.0", "m.2"}
    firsts = {}
    for r in linear:
        firsts.setdefault(r.module, r.id)
    assert {trace.repeats.get(rid) for rid in firsts.values()} == {30 - limits.DETAIL_LIMIT}
    # SGD's update runs at one site for all four parameters: 4 * 30 runs, the first kept in detail
    assert 4 * 30 - limits.DETAIL_LIMIT in trace.repeats.values()


@compiled
def test_the_compiled_walk_holds_no_reference_to_its_finder():
    """Its callbacks are plain functions, not the finder's bound methods: a finder (and the
    namespace index it reaches) is freed when the tracer is, without the garbage collector."""
    import gc
    import weakref

    from autograd_magic.capture.source import SourceMap

    finder = sites_mod.SiteFinder(SourceMap("<nowhere>", "x = 1"), anchor=lambda c: False, module_name=str)
    assert type(finder.find).__name__ == "builtin_function_or_method"
    ref = weakref.ref(finder)
    gc.disable()
    try:
        del finder
        assert ref() is None
    finally:
        gc.enable()


@compiled
def test_the_compiled_walk_starts_at_its_callers_frame():
    """Called from a frame nothing classifies as the traced code, it walks to the top of the stack
    and says the op ran outside it, naming the first frame that is not routing (this function)."""
    from autograd_magic.capture.source import SourceMap

    finder = sites_mod.SiteFinder(SourceMap("<nowhere>", "x = 1"), anchor=lambda c: False, module_name=str)
    span, internal, key, module = finder.find("not_this_name")
    assert (span, key, module) == (None, None, None)
    assert internal == sys._getframe(0).f_code.co_qualname
    assert finder._find_py("not_this_name", sys._getframe(0)) == (span, internal, key, module)


@compiled
@settings(max_examples=int(os.environ.get("AUTOGRAD_MAGIC_SITE_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cell=programs())
def test_random_cells_are_attributed_alike_on_both_walks(cell, fuzz_shell, monkeypatch):
    """The fuzzer's random cells (loops, functions of the cell, nn.Linear, in-place ops, no_grad
    blocks, optimizer steps, errors) through `%%autograd`: compiled, then on the Python walk,
    then with the Python mode handler."""
    magic = "%%autograd --quiet -o site_trace"
    run_fuzz(fuzz_shell, cell, traced=True, magic=magic)
    fast = fuzz_shell.user_ns.get("site_trace")
    for patch in ((sites_mod, "_Walker", None), (tracer_mod, "_Mode", tracer_mod._PyMode)):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            run_fuzz(fuzz_shell, cell, traced=True, magic=magic)
            slow = fuzz_shell.user_ns.get("site_trace")
        assert (fast is None) == (slow is None), cell
        if fast is not None:
            assert _attribution(fast) == _attribution(slow), cell
            assert fast.repeats == slow.repeats and fast.notes == slow.notes, cell


def test_a_compiled_walker_never_initialised_raises_instead_of_crashing():
    if sites_mod._Walker is None:
        pytest.skip("the compiled walk is not built")
    walker = sites_mod._Walker.__new__(sites_mod._Walker)
    with pytest.raises(TypeError, match="__init__"):
        walker.find("add")


def test_a_users_own_mode_in_the_cell_routes_ops_to_the_lines_that_made_them(shell):
    """With the user's TorchFunctionMode defined and entered in the cell, each op is still the
    line that computed it, not the handler's `return func(*args, ...)` line."""
    import torch
    from run_cells import plain, traced

    cell = ("from torch.overrides import TorchFunctionMode\nclass Count(TorchFunctionMode):\n"
            "    def __torch_function__(self, func, types, args=(), kwargs=None):\n"
            "        return func(*args, **(kwargs or {}))\n"
            "x = torch.ones(2, requires_grad=True)\nwith Count():\n    y = (x * 3).exp().sum()\n    y.backward()")
    ns = plain(cell)
    t = traced(shell, cell)
    assert torch.equal(shell.user_ns["x"].grad, ns["x"].grad)
    assert t.last("y").line == 8 and t.last("y").expr == "(x * 3).exp().sum()"
    assert [p.line for p in t.passes] == [9]
    assert not any("func(*args" in (r.expr or "") for r in t.records)
