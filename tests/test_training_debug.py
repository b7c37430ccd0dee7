"""Debugging a training loop past `--limit` (issue 16, second landing), against plain PyTorch.

A 50-iteration logistic regression whose learning rate is too high: the sigmoid saturates to
exactly 1.0 and `torch.log(1 - p)` turns -inf around iteration 34, long after the three
iterations `--limit` records. Plain torch says, with a TorchFunctionMode of the test's own
that checks every output with `torch.isfinite`, which op first made a NaN/Inf, in which
iteration and from which inputs; and, running the same loop, what each iteration's loss and
total gradient norm are. The trace must say the same, and the traced run must compute exactly
what the plain one does.
"""

from __future__ import annotations

import math
from xml.etree import ElementTree

import pytest
import torch
from IPython.utils.capture import capture_output
from torch.overrides import TorchFunctionMode

from autograd_magic import limits
from autograd_magic.data.debug import IterationScalars
from autograd_magic.explain.debug import ordinal
from autograd_magic.render.debug import banner_html, debug_payload, training_svg
from autograd_magic.render.payload import build_payload
from autograd_magic.render.snapshot import snapshot_html
from run_cells import plain as _plain, traced as _traced

LOOP = """torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
X = torch.randn(64, 2)
Y = (X[:, :1] + X[:, 1:] > 0).float()
opt = torch.optim.SGD(model.parameters(), lr={lr})
for i in range(50):
    opt.zero_grad()
    p = torch.sigmoid(model(X))
    loss = -(Y * torch.log(p) + (1 - Y) * torch.log(1 - p)).mean()
    loss.backward()
    opt.step()
"""
DIVERGES, CONVERGES = 4.0, 0.5

# a loop that never zeroes its gradients: each pass adds into .grad, the pass's own share is the delta
ACCUMULATES = """torch.manual_seed(1)
w = torch.randn(5, requires_grad=True)
xs = torch.randn(12, 5)
for i in range(12):
    loss = (xs[i] * w).sum().tanh() ** 2
    loss.backward()
"""

GRAD_LOOP = """torch.manual_seed(2)
w = torch.randn(3, requires_grad=True)
for i in range(8):
    loss = (w * (i + 1)).pow(3).sum()
    (g,) = torch.autograd.grad(loss, w)
"""


class _PlainWatch(TorchFunctionMode):
    """Plain torch's answers, from a mode of the test's own: the first op whose output holds a NaN
    or an Inf (the loop's `i` then, and its tensor inputs at that moment), and for each backward
    call its loss and the total norm of what it gave: `get_total_norm` of the change in each
    leaf's .grad, or of autograd.grad's results."""

    def __init__(self, ns: dict):
        super().__init__()
        self.ns, self.found, self.scalars = ns, None, []
        self.counts: dict[str, int] = {}  # differentiable outputs made so far, per op name

    def _leaves(self):
        if "model" in self.ns:
            return list(self.ns["model"].parameters())
        return [t for t in self.ns.values() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            leaves = self._leaves()
            before = [None if t.grad is None else t.grad.clone() for t in leaves]
            out = func(*args, **kwargs)
            deltas = [t.grad - b if b is not None else t.grad for t, b in zip(leaves, before) if t.grad is not None]
            self.scalars.append((args[0].item(), torch.nn.utils.get_total_norm(deltas).item()))
            return out
        out = func(*args, **kwargs)
        if func is torch.autograd.grad:
            root = args[0][0] if isinstance(args[0], (tuple, list)) else args[0]
            self.scalars.append((root.item(), torch.nn.utils.get_total_norm(list(out)).item()))
            return out
        if self.found is None:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                    inputs = [a.detach().clone() for a in args if isinstance(a, torch.Tensor)]
                    kind = "nan" if torch.isnan(t).any() else "inf"
                    self.found = (self.ns.get("i"), func.__name__, kind, inputs)
                    self.runs_before = self.counts.get(func.__name__, 0)
                    self.backward_calls_before = len(self.scalars)
                    break
            if isinstance(out, torch.Tensor) and out.requires_grad:
                self.counts[func.__name__] = self.counts.get(func.__name__, 0) + 1
        return out


def _plain_loop(cell: str):
    """Run `cell` plainly under `_PlainWatch`: [(loss, norm)] per backward call, the first
    non-finite op, and the namespace at the end."""
    ns: dict = {"torch": torch}
    watch = _PlainWatch(ns)
    with watch:
        exec(cell, ns)
    return watch.scalars, watch.found, ns


def _same(a, b, rel=1e-5) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=rel, abs=1e-12)


# ---- the first NaN/Inf, found in an iteration --limit did not record ---------------------------


def test_a_nan_past_the_limit_is_named_with_its_iteration_and_its_inputs_statistics(shell):
    cell = LOOP.format(lr=DIVERGES)
    _, found, _ = _plain_loop(cell)
    iteration, func, kind, (operand,) = found
    assert iteration >= 3 * limits.DETAIL_LIMIT  # well past the iterations the trace records
    t = _traced(shell, cell)
    nf = t.nonfinite
    assert nf is not None and nf.op == func == "log" and nf.kind == kind
    assert nf.expr == "torch.log(1 - p)" and t.source_line(nf.line).strip().startswith("loss = -(Y * torch.log(p)")
    assert nf.run == iteration  # the op's own runs before it: the loop's `i`
    (inp,) = nf.inputs
    assert inp.preview.min == operand.min().item() and inp.preview.max == operand.max().item()
    assert inp.preview.mean == pytest.approx(operand.mean().item(), rel=1e-6)
    assert inp.preview.norm == pytest.approx(operand.norm().item(), rel=1e-6)
    assert nf.count == int((~torch.isfinite(torch.log(operand))).sum())
    assert f"the {ordinal(iteration + 1)} time it ran" in str(t).splitlines()[1]
    html = snapshot_html(t, graph=False)
    assert f'<tr data-record="{nf.record}" id="' in html  # the origin's row, which the banner links to
    assert "First Inf in forward" in banner_html(t) and "torch.log(1 - p)" in banner_html(t)
    assert build_payload(t)["debug"]["forward"]["id"] == nf.record


# an op that runs four times per iteration: its runs and the loop's iterations differ
INNER_STEPS = """torch.manual_seed(0)
w = torch.tensor([0.5], requires_grad=True)
for i in range(8):
    h = torch.ones(1)
    for k in range(4):
        h = h + torch.exp(w * 3)
    loss = h.sum()
    loss.backward()
    with torch.no_grad():
        w += 10.0
"""


def test_a_nan_past_the_limit_names_the_loop_iteration_apart_from_the_op_s_own_runs(shell):
    ns: dict = {"torch": torch}
    watch = _PlainWatch(ns)
    with watch:
        exec(INNER_STEPS, ns)
    i, func, kind, _ = watch.found
    assert func == "exp" and kind == "inf" and watch.runs_before > 3 * watch.backward_calls_before > 0
    t = _traced(shell, INNER_STEPS)
    nf = t.nonfinite
    assert nf is not None and nf.op == "exp" and nf.expr == "torch.exp(w * 3)"
    assert nf.run == watch.runs_before  # exp's own runs before it: four per iteration
    assert nf.iteration == watch.backward_calls_before == i  # the backward calls before it: the loop's `i`
    line = str(t).splitlines()[1]
    assert f"the {ordinal(watch.runs_before + 1)} time it ran, after {i} backward calls" in line, line


def test_the_traced_loop_computes_exactly_what_the_plain_loop_does(shell):
    cell = LOOP.format(lr=DIVERGES)
    _, _, plain = _plain_loop(cell)
    after_plain = torch.rand(3)  # the RNG right after the cell
    _traced(shell, cell)
    after_traced = torch.rand(3)
    traced = shell.user_ns["model"]
    for a, b in zip(traced.parameters(), plain["model"].parameters()):
        assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)  # bit for bit, NaN where plain has NaN
        assert torch.allclose(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(after_plain, after_traced)  # both seeded 0 in the cell: the same draws after it


# ---- the loss and total gradient norm of every backward call ---------------------------------


@pytest.mark.parametrize("lr", [DIVERGES, CONVERGES])
def test_every_iterations_loss_and_gradient_norm_match_plain_torch(shell, lr, stats_path):
    cell = LOOP.format(lr=lr)
    plain, _, _ = _plain_loop(cell)
    t = _traced(shell, cell)
    its = t.training()
    assert [it.index for it in its] == list(range(50)) and len(plain) == 50
    assert [it.pass_index for it in its] == [0, 1, 2] + [None] * 47  # three recorded, the rest past --limit
    for it, (loss, norm) in zip(its, plain):
        assert _same(it.loss, loss, rel=1e-6), (it, loss)
        assert _same(it.grad_norm, norm), (it, norm)
        assert it.finite == (math.isfinite(loss) and math.isfinite(norm))
        assert it.line is not None and t.source_line(it.line).strip() == "loss.backward()"
    if lr == CONVERGES:
        assert all(it.finite for it in its) and t.nonfinite is None and t.backward_nonfinite == []
        assert banner_html(t) == ""  # a finite loop shows no banner
        assert "am-debug" not in snapshot_html(t, graph=False)
    else:
        first = next(k for k, (loss, norm) in enumerate(plain) if not (math.isfinite(loss) and math.isfinite(norm)))
        assert next(it.index for it in its if not it.finite) == first


def test_a_pass_adds_its_own_share_when_gradients_accumulate(shell, stats_path):
    plain, _, _ = _plain_loop(ACCUMULATES)
    t = _traced(shell, ACCUMULATES)
    its = t.training()
    assert len(its) == len(plain) == 12
    for it, (loss, norm) in zip(its, plain):
        assert _same(it.loss, loss, rel=1e-6) and _same(it.grad_norm, norm)


def test_autograd_grad_past_the_limit_counts_what_it_returns(shell, stats_path):
    plain, _, _ = _plain_loop(GRAD_LOOP)
    t = _traced(shell, GRAD_LOOP)
    its = t.training()
    assert len(its) == len(plain) == 8 and sum(it.recorded for it in its) == limits.DETAIL_LIMIT
    for it, (loss, norm) in zip(its, plain):
        assert _same(it.loss, loss, rel=1e-6) and _same(it.grad_norm, norm)


def test_past_the_iteration_bound_calls_are_counted(shell, monkeypatch):
    monkeypatch.setattr(limits, "TRAIN_ITERATIONS", 5)
    t = _traced(shell, ACCUMULATES)
    assert len(t.training()) == 5 and t.iterations_left_out == 7
    assert any("backward calls" in n for n in t.notes)


# ---- the chart --------------------------------------------------------------------------------


def test_the_chart_shows_for_two_passes_or_more_and_marks_the_nan(shell):
    t = _traced(shell, LOOP.format(lr=DIVERGES))
    html = snapshot_html(t, graph=False)
    assert "training loop" in html
    chart = build_payload(t)["debug"]["training"]
    root = ElementTree.fromstring(chart["svg"])  # well-formed, drawn with presentation attributes only
    assert "<script" not in chart["svg"] and "style=" not in chart["svg"]
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) >= 2  # loss and gradient norm
    first = next(it for it in t.training() if not it.finite)
    assert f"first non-finite at call {first.index + 1}" in chart["summary"]
    assert chart["svg"].count('stroke="#cf222e" stroke-width="1.5"') == 2  # one × per panel: NaN from there on

    single = _traced(shell, "x = torch.tensor([1.0, 2.0], requires_grad=True)\n(x * x).sum().backward()\n")
    assert len(single.training()) == 1
    assert "training loop" not in snapshot_html(single, graph=False) and debug_payload(single) is None


def test_a_long_run_stays_within_the_charts_bytes():
    rows = [IterationScalars(index=k, loss=1 / (k + 1), grad_norm=math.exp(-k / 500), pass_index=k if k < 3 else None)
            for k in range(10_000)]
    rows[7000].loss = math.nan
    svg = training_svg(rows)
    assert len(svg) <= limits.DEBUG_CHART_BYTES
    ElementTree.fromstring(svg)
    assert ">7001<" in svg  # the first non-finite call is named on the axis even when sampled


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_device_the_scalars_match_and_nothing_syncs_per_op(shell):
    cell = LOOP.format(lr=CONVERGES).replace("torch.nn.Linear(2, 1)", "torch.nn.Linear(2, 1).cuda()")
    cell = cell.replace("X = torch.randn(64, 2)", "X = torch.randn(64, 2).cuda()")
    plain, _, _ = _plain_loop(cell)
    t = _traced(shell, cell)
    for it, (loss, norm) in zip(t.training(), plain):
        assert _same(it.loss, loss, rel=1e-6) and _same(it.grad_norm, norm, rel=1e-5)


# ---- a loop with no backward call: what is kept is checked when the cell ends, or when the window is full ----

NO_BACKWARD = """w = torch.tensor([3.0, 2.5, 4.0])
for i in range(30):
    y = torch.log(w - i * 0.1)
"""


@pytest.mark.parametrize("window", [limits.FINITE_WINDOW, 5])
def test_a_loop_without_backward_is_checked_all_the_same(shell, monkeypatch, window):
    monkeypatch.setattr(limits, "FINITE_WINDOW", window)
    _, found, _ = _plain_loop(NO_BACKWARD)
    iteration, func, kind, (operand,) = found
    t = _traced(shell, NO_BACKWARD)
    nf = t.nonfinite
    assert func == "log" and iteration > limits.DETAIL_LIMIT
    assert (nf.op, nf.run, nf.kind) == (func, iteration, kind)
    (inp,) = nf.inputs
    assert inp.preview.min == operand.min().item() and inp.preview.max == operand.max().item()
    assert t.training() == []  # no backward call, no chart
    assert "training loop" not in snapshot_html(t, graph=False)


def test_device_scalars_are_read_back_together():
    from autograd_magic.capture.finite import DeferredScalars, LeafNorms

    got = {}
    deferred = DeferredScalars()
    deferred.later(torch.tensor(2.5), lambda v: got.setdefault("a", v))
    deferred.later(torch.tensor([7.0], dtype=torch.float16), lambda v: got.setdefault("b", v))
    norms = LeafNorms()
    for g in (torch.randn(4, 3).t(), torch.randn(5)):
        norms.add(g)
    norms.norm(deferred, lambda v: got.setdefault("norm", v))
    assert "a" not in got and "norm" in got  # CPU gradients: their norm now; the deferred ones wait
    deferred.read()
    assert got["a"] == 2.5 and got["b"] == 7.0


@pytest.mark.parametrize("n,word", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"), (35, "35th"), (112, "112th")])
def test_ordinals(n, word):
    assert ordinal(n) == word


def test_the_window_keeps_a_bounded_number_of_bytes_alive(shell, monkeypatch):
    """An inference loop has no backward call to empty the window: the outputs it keeps for the
    NaN/Inf search are checked and let go once they reach FINITE_WINDOW_BYTES, so the loop's
    tensors die as they would in a plain run, and the first NaN/Inf is found all the same."""
    monkeypatch.setattr(limits, "FINITE_WINDOW_BYTES", 1 << 16)
    shell.run_cell("import torch, weakref\nrefs, most = [], 0")
    body = ("with torch.no_grad():\n    for i in range(40):\n        h = torch.ones(256, 64) * i\n"
            "        refs.append(weakref.ref(h))\n        most = max(most, sum(r() is not None for r in refs))\n")
    with capture_output():
        shell.run_cell("%%autograd --quiet\n" + body)
    window = (1 << 16) // (256 * 64 * 4)  # outputs of 64 KB: one window's worth
    assert shell.user_ns["most"] <= window + 2, shell.user_ns["most"]  # and the `h` being made
    _, found, _ = _plain_loop(NO_BACKWARD)
    iteration, func, kind, _ = found
    nf = _traced(shell, NO_BACKWARD).nonfinite
    assert (nf.op, nf.run, nf.kind) == (func, iteration, kind)


def test_a_loop_of_sparse_tensors_past_the_limit_is_kept_for_the_search_without_a_skipped_op():
    import autograd_magic as am

    torch.manual_seed(3)
    w = torch.randn(3, 3, requires_grad=True)
    with am.trace() as t:
        for i in range(3 * limits.DETAIL_LIMIT):
            s = torch.randn(3, 3).to_sparse()
            y = torch.sparse.mm(s, w).sum()
            y.backward()
    assert not [n for n in t.notes if "skipped" in n or "not checked" in n], t.notes
    assert len(t.training()) == 3 * limits.DETAIL_LIMIT


def test_a_sparse_gradient_adds_no_note_and_shows_torch_s_gradient():
    import autograd_magic as am

    torch.manual_seed(5)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    idx = torch.tensor([1, 2, 1])
    with am.trace() as t:
        emb(idx).sum().backward()
    assert t.notes == []
    assert emb.weight.grad.layout == torch.sparse_coo


def test_functions_made_on_the_fly_are_not_kept_alive_by_the_tracer():
    import gc
    import weakref

    import autograd_magic as am
    from torch.overrides import handle_torch_function, has_torch_function

    refs = []
    x = torch.ones(2)
    with am.trace():
        for _ in range(3):
            held = torch.zeros(4)

            def op(t, held=held):
                if has_torch_function((t,)):
                    return handle_torch_function(op, (t,), t)
                return t + held.sum()

            op(x)
            refs.append(weakref.ref(held))
            del held, op
    gc.collect()
    assert all(r() is None for r in refs)


# ---- the compiled handler's own passes past --limit (capture/_walk.c's `pass_fast`) ----------

RETAINS = LOOP.format(lr=CONVERGES).replace("loss.backward()", "loss.backward(retain_graph=True)")
# a parameter the loss never reaches: its .grad stays None, and the pass's norm is over the others
UNUSED = LOOP.format(lr=CONVERGES).replace("opt = ", "spare = torch.nn.Parameter(torch.ones(3))\nspare.sum()\nopt = ")
SEEDED = LOOP.format(lr=CONVERGES).replace("loss.backward()", "loss.backward(torch.tensor(1.0))")


def _pass_facts(t) -> tuple:
    nonfinite = t.nonfinite
    def same_nan(v):  # a NaN is no NaN's equal: compared by what it is
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return ([(it.index, it.line, same_nan(it.loss), same_nan(it.grad_norm), it.pass_index) for it in t.iterations],
            t.iterations_left_out, t.notes, t.repeats, [(r.op, r.expr, r.run, r.iteration) for r in t.records],
            None if nonfinite is None else (nonfinite.record, nonfinite.iteration))


@pytest.mark.parametrize("cell", [LOOP.format(lr=DIVERGES), LOOP.format(lr=CONVERGES), ACCUMULATES, GRAD_LOOP, RETAINS,
                                  SEEDED, UNUSED],
                         ids=["diverges", "converges", "accumulates", "grad", "retains", "seeded", "unused"])
def test_the_compiled_passes_past_the_limit_keep_what_the_python_ones_keep(shell, monkeypatch, cell, stats_path):
    from autograd_magic.capture import backward as backward_mod, tracer as tracer_mod

    if tracer_mod._ModeCore is None:
        pytest.skip("the compiled mode handler is not built")
    general = []
    run_unrecorded = backward_mod.BackwardRecorder._run_unrecorded
    monkeypatch.setattr(backward_mod.BackwardRecorder, "_run_unrecorded",
                        lambda self, *a: general.append(1) or run_unrecorded(self, *a))
    compiled = _pass_facts(_traced(shell, cell))
    taken = len(general)
    general.clear()
    monkeypatch.setattr(tracer_mod.Tracer, "_fast_passes", False)
    python = _pass_facts(_traced(shell, cell))
    assert compiled == python
    assert len(compiled[0]) > limits.DETAIL_LIMIT + 1  # passes past the limit, each with its entry
    # the loop's own case runs compiled past the limit; an accumulating one, an argument, autograd.grad do not
    plain_case = cell.startswith("torch.manual_seed(0)") and cell not in (RETAINS, SEEDED)
    if cell is UNUSED:  # its norms, each iteration, are plain torch's over the parameters that got a gradient
        plain, _, _ = _plain_loop(cell)
        assert [_same(it.grad_norm, norm) for it, (_, norm) in zip(_traced(shell, cell).training(), plain)] == [True] * 50
    assert (taken < len(general)) == plain_case and len(general) > 0


def test_past_the_iteration_bound_the_compiled_passes_hand_over(shell, monkeypatch):
    monkeypatch.setattr(limits, "TRAIN_ITERATIONS", 6)
    t = _traced(shell, LOOP.format(lr=CONVERGES))
    assert len(t.training()) == 6 and t.iterations_left_out == 44
    assert [it.pass_index for it in t.training()] == [0, 1, 2, None, None, None]


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_a_failing_gradient_norm_past_the_limit_is_noted_and_the_loop_goes_on(shell, monkeypatch, path):
    from autograd_magic.capture import backward as backward_mod, tracer as tracer_mod

    def boom(*a):
        raise RuntimeError("boom")

    if path == "compiled":
        if tracer_mod._ModeCore is None:
            pytest.skip("the compiled mode handler is not built")
        # what the compiled pass hands to Python: the NaN gradients of the iterations after ~34
        monkeypatch.setattr(backward_mod.BackwardRecorder, "_leaf_norms", boom)
    else:
        monkeypatch.setattr(tracer_mod.Tracer, "_fast_passes", False)
        monkeypatch.setattr(backward_mod.LeafNorms, "add_all", boom)
    cell = LOOP.format(lr=DIVERGES)
    _, _, plain = _plain_loop(cell)
    t = _traced(shell, cell)
    assert "the gradient norm of a pass past the limit was not kept: RuntimeError: boom" in t.notes
    for a, b in zip(shell.user_ns["model"].parameters(), plain["model"].parameters()):
        assert torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)  # the loop computed what it computes plainly


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_a_ctrl_c_in_the_bookkeeping_of_a_pass_past_the_limit_reaches_the_user(monkeypatch, path):
    """A Ctrl-C landing in our reads before a later `loss.backward()` runs (here: in its site walk)
    stops the cell there, as it would stop the plain loop: no iteration after it runs."""
    import autograd_magic as am
    from autograd_magic.capture import sites as sites_mod, tracer as tracer_mod

    if path == "compiled" and tracer_mod._ModeCore is None:
        pytest.skip("the compiled mode handler is not built")
    monkeypatch.setattr(tracer_mod.Tracer, "_fast_passes", path == "compiled")
    armed = {"at": None}
    init = sites_mod.SiteFinder.__init__

    def with_interrupt(self, *a, **kw):  # `find` is each finder's own (the compiled walk's, where built)
        init(self, *a, **kw)
        find = getattr(self, "find")

        def interrupted(func_name, *rest):
            if func_name == "backward" and armed["at"] == "now":
                armed["at"] = "done"
                raise KeyboardInterrupt
            return find(func_name, *rest)

        self.find = interrupted

    monkeypatch.setattr(sites_mod.SiteFinder, "__init__", with_interrupt)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    X, Y = torch.randn(8, 4), torch.randn(8, 1)
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with am.trace():
            for i in range(10):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(X), Y)
                armed["at"] = "now" if i == limits.DETAIL_LIMIT + 2 else armed["at"]
                loss.backward()
                opt.step()
                ran.append(i)
    assert armed["at"] == "done" and ran == list(range(limits.DETAIL_LIMIT + 2))
    assert all(p.grad is None for p in model.parameters())  # the interrupted backward never ran


# ---- where a .grad no recorded pass put there came from ---------------------------------------

STEP_NAN = """torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
X, Y = torch.randn(32, 6), torch.randn(32, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for i in range(30):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y)
    loss.backward()
    if i == 20:
        opt.param_groups[0]['lr'] = float('nan')
    opt.step()
"""


def test_a_grad_left_by_backward_calls_past_the_limit_is_said_to_come_from_them(shell):
    from autograd_magic.explain.why import explain_record

    plain = _plain_loop(STEP_NAN)[2]
    t = _traced(shell, STEP_NAN)
    # the record the NaN search made for the step that broke the weight, in the 21st backward call's
    # iteration: no recorded pass reached it, and its .grad after the cell is the later calls' work
    (rec,) = [r for r in t.records if r.run is not None and r.name == "model.0.weight"]
    assert rec.iteration == 21 and not rec.grads and rec.attr_grad is not None
    later = sum(1 for it in t.iterations if it.index >= rec.iteration)
    assert later == 30 - 21 and all(it.pass_index is None for it in t.iterations[21:])
    assert plain["model"][0].weight.grad is not None  # plain torch leaves one there too
    why = " ".join(explain_record(t, rec.id))
    assert f"the {later} backward calls this cell ran past --limit (not recorded in detail)" in why, why
    assert "before this cell." not in why.replace("or by ones before this cell.", "")


def test_a_grad_an_earlier_cell_left_is_said_to_come_from_before_the_cell(shell):
    from autograd_magic.explain.why import explain_record

    shell.run_cell("import torch\nw = torch.ones(3, requires_grad=True)\n(w * 2).sum().backward()")
    t = _traced(shell, "y = w * 3")
    (rec,) = [r for r in t.records if r.name == "w"]
    assert rec.attr_grad is not None and not rec.grads
    why = " ".join(explain_record(t, rec.id))
    assert "was left there by backward calls before this cell." in why and "past --limit" not in why
    assert shell.user_ns["w"].grad.tolist() == [2.0, 2.0, 2.0]  # plain torch's


def test_an_op_found_past_the_limit_is_not_said_to_be_out_of_reach_of_backward(shell):
    # its iteration's backward call did reach it (the loss is made from it), unrecorded: the
    # explanation says so, and which call that was, as plain torch counts it
    from autograd_magic.explain.why import explain_record

    cell = LOOP.format(lr=DIVERGES)
    _, found, _ = _plain_loop(cell)
    iteration = found[0]  # backward calls plain torch ran before the op first made a NaN/Inf
    t = _traced(shell, cell)
    (rec,) = [r for r in t.records if r.run is not None]
    why = " ".join(explain_record(t, rec.id))
    line = next(i + 1 for i, text in enumerate(cell.splitlines()) if text.strip() == "loss.backward()")
    assert f"before backward call {iteration + 1} (line {line + 1})" in why, why  # +1: the magic's line
    assert "No backward pass in this cell reached it" not in why and "does not depend on it" not in why


def test_the_detail_of_an_op_found_past_the_limit_says_the_recorded_passes_ran_before_it(shell):
    from autograd_magic.render.payload import build_detail

    t = _traced(shell, STEP_NAN)
    (rec,) = [r for r in t.records if r.run is not None and r.name == "model.0.weight"]
    d = build_detail(t, rec.id)
    assert len(d["passes"]) == limits.DETAIL_LIMIT and all(p["before"] and p["grad"] is None for p in d["passes"])
    # a record of the recorded iterations: the passes that reached it are not "before" it
    first = next(r for r in t.records if r.name == "model.0.weight" and r.run is None and r.grads)
    assert not any(p["before"] for p in build_detail(t, first.id)["passes"])


# ---- what an optimizer step puts into the parameters -------------------------------------------

MLP_STEPS = """torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
X, Y = torch.randn(8, 3), torch.randn(8, 1)
for i in range(6):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y)
    loss.backward()
    opt.step()
"""


def test_each_recorded_step_has_a_gradient_and_an_update_row_for_every_parameter(shell):
    """The step's loop over the parameters runs one update op per parameter: --limit counts the
    step's calls, so each of the first --limit calls shows every parameter's `.grad` and update,
    with plain torch's values (the op's own count stopped it after three parameters)."""
    ns: dict = {"torch": torch}
    exec(MLP_STEPS.replace("    opt.step()", "    grads.append([p.grad.clone() for p in model.parameters()])\n"
                           "    opt.step()\n    params.append([p.detach().clone() for p in model.parameters()])"),
         {**ns, "grads": (grads := []), "params": (params := [])})
    t = _traced(shell, MLP_STEPS)
    names = [n for n, _ in shell.user_ns["model"].named_parameters()]
    for k in range(limits.DETAIL_LIMIT):
        rows = [r for r in t.records if r.grad_of is not None and r.name and r.name.endswith(".grad")][k * 4:(k + 1) * 4]
        assert [r.name for r in rows] == [f"model.{n}.grad" for n in names]
        for r, g in zip(rows, grads[k]):
            assert torch.allclose(torch.from_numpy(r.preview.values), g) if r.preview.complete else r.preview.mean == pytest.approx(g.mean().item())
        updates = [r for r in t.records if r.inplace and r.in_step][k * 4:(k + 1) * 4]
        assert [r.name for r in updates] == [f"model.{n}" for n in names]
        for r, p in zip(updates, params[k]):
            assert r.preview.mean == pytest.approx(p.mean().item(), rel=1e-5, abs=1e-7)
    assert len([r for r in t.records if r.inplace and r.in_step]) == 4 * limits.DETAIL_LIMIT  # later calls: none


NAN_STEP = """w = torch.ones(2, requires_grad=True)
opt = torch.optim.SGD([w], lr=0.1)
for i in range(8):
    opt.zero_grad()
    if i == {k}:
        loss = torch.sqrt((w * 0).sum())  # its gradient at 0 is Inf: NaN by the time it reaches w
    else:
        loss = (w * w).sum()
    loss.backward()
    opt.step()
"""


@pytest.mark.parametrize("k", [1, 5])  # within --limit, and past it
def test_a_nan_the_backward_pass_puts_into_the_parameters_is_found_in_the_step(shell, k):
    """NaN first appears in `w` through `opt.step()`, from the `.grad` backward made: the first
    NaN is that step's (not `w.grad` "from outside the cell", not a later forward op)."""
    ns = _plain(NAN_STEP.format(k=k).replace("    opt.step()", "    opt.step()\n    if w.isnan().any() and 'first' not in dir():\n        first = i"))
    assert ns["first"] == k and ns["w"].isnan().all()
    t = _traced(shell, NAN_STEP.format(k=k))
    nf = t.nonfinite
    assert nf is not None and nf.kind == "nan" and not nf.external and nf.step
    assert t.source_line(nf.line).strip() == "opt.step()"
    (grad,) = [o for o in nf.inputs if o.label == "w.grad"]
    assert grad.kind == "nan"
    assert "First NaN in an optimizer step" in str(t).splitlines()[1]
