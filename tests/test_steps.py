"""A training loop's optimizer steps past --limit run with the tracer's mode lifted (capture/steps.py).

What a lifted step must keep, each checked against plain PyTorch or against the same cell with
lifting switched off: the values the loop computes, bit for bit; every count the trace keeps;
a NaN that a step puts into a parameter, found at that step; and nothing lifted where untraced
code would run (a closure, someone's step hook, a mode above ours), nor left lifted when a step
raises.
"""

from __future__ import annotations

import pytest
from IPython.utils.capture import capture_output
import torch

from autograd_magic import limits
from autograd_magic.capture import steps as steps_module
from autograd_magic.explain.wording import flags
from run_cells import plain as _plain, traced as _traced

LOOP = """torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
X, Y = torch.randn(32, 6), torch.randn(32, 1)
opt = {opt}
for i in range(30):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y)
    loss.backward()
    {before_step}opt.step()
"""
OPTIMIZERS = {
    "sgd": "torch.optim.SGD(model.parameters(), lr=0.05)",
    "momentum": "torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)",
    "adam": "torch.optim.Adam(model.parameters(), lr=0.01)",
    "adamw": "torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)",
}


def _loop(opt: str = "sgd", before_step: str = "") -> str:
    return LOOP.format(opt=OPTIMIZERS.get(opt, opt), before_step=before_step)


@pytest.fixture
def lifts(monkeypatch):
    """How many steps ran lifted: a list the tests read (one entry per lifted call)."""
    seen = []
    count = steps_module.OptimizerSteps._count_as_before

    def counting(self, site, span, opt):
        seen.append(span)
        return count(self, site, span, opt)

    monkeypatch.setattr(steps_module.OptimizerSteps, "_count_as_before", counting)
    return seen


def _never_lift(monkeypatch):
    monkeypatch.setattr(steps_module.OptimizerSteps, "_may_lift", lambda *a: False)
    monkeypatch.setattr(steps_module.OptimizerSteps, "_compiled", False)  # its compiled twin decides the same


def _facts(t) -> list:
    return [(r.op, r.span, r.expr, r.internal, r.module, r.occurrence, r.run, r.iteration, r.name) for r in t.records]


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_lifted_steps_compute_exactly_what_plain_torch_computes(shell, lifts, opt):
    cell = _loop(opt)
    plain = _plain(cell)
    _traced(shell, cell)
    assert len(lifts) >= 30 - 3 * limits.DETAIL_LIMIT  # all but the first few steps ran lifted
    traced = shell.user_ns
    for a, b in zip(traced["model"].parameters(), plain["model"].parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    for sa, sb in zip(traced["opt"].state.values(), plain["opt"].state.values()):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), k


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_a_lifted_loop_keeps_every_record_count_and_note_of_a_traced_one(shell, lifts, monkeypatch, opt):
    cell = _loop(opt)
    lifted = _traced(shell, cell)
    assert lifts
    shell.reset(new_session=False)
    with monkeypatch.context() as m:
        _never_lift(m)
        traced = _traced(shell, cell)
    assert _facts(lifted) == _facts(traced)
    assert lifted.repeats == traced.repeats and lifted.notes == traced.notes
    assert [(i.loss, i.grad_norm) for i in lifted.iterations] == [(i.loss, i.grad_norm) for i in traced.iterations]
    if opt == "sgd":  # a fact of the loop itself: SGD's update is one site, run once per parameter per step
        update = next(r for r in lifted.records if r.op == "add_" and r.internal)  # its first run: the site's record
        assert lifted.repeats[update.id] == 4 * 30 - limits.DETAIL_LIMIT


def test_a_nan_a_lifted_step_puts_into_a_parameter_is_found_at_that_step(shell, lifts):
    poison = "if i == 20:\n        opt.param_groups[0]['lr'] = float('nan')\n    "
    cell = _loop("sgd", poison)
    # plain torch: the first step after which a parameter holds a NaN, and the gradient it came from
    ns: dict = {"torch": torch}
    exec(cell.replace("    opt.step()", "    grads = [p.grad.clone() for p in model.parameters()]\n    opt.step()\n"
                      "    if first is None and not all(torch.isfinite(p).all() for p in model.parameters()):\n"
                      "        first = (i, grads)").replace("for i in range(30):", "first = None\nfor i in range(30):"), ns)
    step, grads = ns["first"]
    assert step == 20
    t = _traced(shell, cell)
    assert len(lifts) > 10
    nf = t.nonfinite
    assert nf is not None and nf.op == "step" and nf.kind == "nan"
    assert nf.expr == "opt.step()" and t.source_line(nf.line).strip() == "opt.step()"
    assert nf.run == step  # the step's own calls before it
    assert nf.iteration == step + 1  # the backward calls before it: the one of its own iteration among them
    assert nf.label == "model.0.weight"  # the first parameter the optimizer updates
    (grad,) = nf.inputs  # the gradient it was updated from, as plain torch had it
    assert grad.label == "model.0.weight.grad" and grad.kind is None and grad.preview.min == grads[0].min().item() and grad.preview.max == grads[0].max().item()
    # made by the cell's own backward call, and shown on its line, not among tensors from outside the cell
    made = next(r for r in t.records if r.name == "model.0.weight.grad")
    assert made.created_by == "loss.backward()" and t.source_line(made.line).strip() == "loss.backward()"
    assert "created by loss.backward()" in flags(made) and "from outside the cell" not in flags(made)
    assert "First NaN in an optimizer step: `model.0.weight = opt.step()`" in str(t).splitlines()[1]


@pytest.mark.parametrize("case", ["closure", "hook", "mode"])
def test_no_step_is_lifted_where_untraced_code_would_run(shell, lifts, monkeypatch, case):
    if case == "closure":  # LBFGS runs forward and backward inside its step
        cell = """torch.manual_seed(0)
w = torch.randn(4, requires_grad=True)
x = torch.randn(16, 4)
opt = torch.optim.LBFGS([w], max_iter=2)
def closure():
    opt.zero_grad()
    loss = (x @ w).pow(2).mean()
    loss.backward()
    return loss
for i in range(12):
    opt.step(closure)
"""
    elif case == "hook":  # someone's hook would run with the mode lifted
        cell = _loop("sgd").replace("for i in range(30):", "seen = []\nopt.register_step_post_hook("
                                    "lambda o, a, k: seen.append(o.param_groups[0]['params'][0].sum()))\nfor i in range(30):")
    else:  # a mode of the user's above ours
        cell = "from torch.overrides import TorchFunctionMode\nclass Mine(TorchFunctionMode):\n" \
               "    def __torch_function__(self, func, types, args=(), kwargs=None):\n" \
               "        return func(*args, **(kwargs or {}))\n" + _loop("sgd").replace(
                   "for i in range(30):", "with Mine():\n  for i in range(30):").replace("\n    ", "\n      ")
    plain = _plain(cell)
    t = _traced(shell, cell)
    assert lifts == []
    shell.reset(new_session=False)
    with monkeypatch.context() as m:
        _never_lift(m)
        assert _facts(_traced(shell, cell)) == _facts(t)
    for name in ("w", "model"):
        if name in plain:
            a, b = shell.user_ns[name], plain[name]
            for x, y in zip(*(([v] if isinstance(v, torch.Tensor) else list(v.parameters())) for v in (a, b))):
                assert torch.equal(x, y)


def test_a_lifted_step_that_raises_fails_as_it_would_and_leaves_no_mode_behind(shell, lifts):
    # at i == 20 a learning rate SGD cannot use: its update raises inside the step, before any
    # parameter changes; the cell catches it and goes on
    cell = _loop("sgd", "if i == 20:\n        opt.param_groups[0]['lr'] = None\n    try:\n        ").replace(
        "        opt.step()\n", "        opt.step()\n    except TypeError as e:\n        caught = str(e)\n"
        "        opt.param_groups[0]['lr'] = 0.05\n    after = model(X).sum()\n")
    plain = _plain(cell)
    assert "caught" in plain
    t = _traced(shell, cell)
    assert len(lifts) >= 10  # the step at i == 20 was lifted too
    assert shell.user_ns["caught"] == plain["caught"]
    assert torch.equal(shell.user_ns["after"], plain["after"])
    assert torch._C._len_torch_function_stack() == 0
    assert any("raised" in n and "optimizer step" in n for n in t.notes)
    # the next step put the mode back: the later steps' updates are counted (the failed one made none)
    update = next(r for r in t.records if r.op == "add_" and r.internal)
    assert t.repeats[update.id] == 4 * 29 - limits.DETAIL_LIMIT


def test_a_traced_run_is_freed_without_the_garbage_collector():
    """Nothing the tracer made for a run (its step hooks among them) holds it in a cycle: its
    records and their arrays go when the run ends, not when the collector next runs."""
    import gc
    import weakref

    import autograd_magic as am
    from autograd_magic.capture import tracer as tracer_module

    made = []
    start = tracer_module.Tracer.start

    def remember(self):
        made.append(weakref.ref(self))
        return start(self)

    ns = _plain(_loop("sgd").replace("for i in range(30):", "for i in range(0):"))
    model, opt, X, Y = ns["model"], ns["opt"], ns["X"], ns["Y"]
    gc.collect()
    gc.disable()
    try:
        tracer_module.Tracer.start = remember
        with am.trace():
            for _ in range(8):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(X), Y).backward()
                opt.step()
        tracer_module.Tracer.start = start
        assert made and made[0]() is None
    finally:
        tracer_module.Tracer.start = start
        gc.enable()


def test_steps_called_inside_a_step_count_and_compute_as_traced_ones(shell, lifts, monkeypatch):
    """An optimizer whose step calls another's (and its own base class's, whose step torch wraps
    too): the hooks fire nested. The inner calls may run lifted, the outer one stays traced; either
    way the values are plain torch's and the trace is the one with lifting off."""
    cell = _loop("Outer(model[2].parameters(), lr=0.05)").replace(
        "opt = Outer", "inner = torch.optim.SGD(model[0].parameters(), lr=0.05)\n"
        "class Outer(torch.optim.SGD):\n    def step(self, closure=None):\n        inner.step()\n"
        "        return super().step(closure)\nopt = Outer").replace("    opt.zero_grad()", "    inner.zero_grad()\n    opt.zero_grad()")
    plain = _plain(cell)
    lifted = _traced(shell, cell)
    assert lifts
    assert not any("raised" in n for n in lifted.notes)
    for a, b in zip(shell.user_ns["model"].parameters(), plain["model"].parameters()):
        assert torch.equal(a, b)
    shell.reset(new_session=False)
    with monkeypatch.context() as m:
        _never_lift(m)
        traced = _traced(shell, cell)
    assert _facts(lifted) == _facts(traced) and lifted.repeats == traced.repeats and lifted.notes == traced.notes


def test_the_gradients_an_update_reads_are_named_and_made_by_the_cells_backward(shell):
    # a recorded iteration's SGD update reads each parameter's .grad: the cell's own backward made it
    cell = _loop("sgd").replace("range(30)", "range(2)")
    ns: dict = {"torch": torch}
    exec(cell.replace("    opt.step()", "    if i == 0:\n        first = [p.grad.clone() for p in model.parameters()]\n    opt.step()"), ns)
    t = _traced(shell, cell)
    grads = [r for r in t.records if r.external and (r.name or "").endswith(".grad")]
    names = [n for n, _ in ns["model"].named_parameters()]
    assert [r.name for r in grads[:3]] == [f"model.{n}.grad" for n in names[:3]]  # the update's first runs (--limit 3)
    for r, plain in zip(grads, ns["first"]):  # the first iteration's gradients, as plain torch had them
        assert r.preview.shape == tuple(plain.shape)
        assert r.preview.min == plain.min().item() and r.preview.max == plain.max().item()
        assert r.created_by == "loss.backward()" and t.source_line(r.line).strip() == "loss.backward()"
        assert flags(r) == ["created by loss.backward()"]  # not "from outside the cell", not "made under no_grad"


def test_a_tensor_from_outside_the_cell_read_after_a_backward_stays_external(shell):
    # held in a list: no name of its own, so the tracer asks whether it is a leaf's gradient; it is not
    shell.run_cell("import torch\nheld = [torch.ones(3)]")
    t = _traced(shell, "x = torch.ones(3, requires_grad=True)\n(x * 2).sum().backward()\ny = x.detach() + held[0]")
    (outside,) = [r for r in t.records if r.external and r.name is None]
    assert outside.created_by is None and outside.line is None and "from outside the cell" in flags(outside)


COMPILED_STEPS = pytest.mark.skipif(steps_module._lift_step_c is None, reason="capture/_walk.c not built")


@COMPILED_STEPS
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("poison", ["", "if i == 20:\n        opt.param_groups[0]['lr'] = float('nan')\n    "])
def test_lifted_steps_record_the_same_compiled_or_not(shell, lifts, monkeypatch, opt, poison):
    cell = _loop(opt, poison)
    answers = []
    lift_step = steps_module._lift_step_c
    monkeypatch.setattr(steps_module, "_lift_step_c", lambda *a: answers.append(lift_step(*a)) or answers[-1])
    compiled = _traced(shell, cell)
    assert answers.count(True) == len(lifts) > 0  # the compiled hook lifted every one of them
    lifted = len(lifts)
    assert lifted >= 30 - 3 * limits.DETAIL_LIMIT
    shell.reset(new_session=False)
    with monkeypatch.context() as m:
        m.setattr(steps_module.OptimizerSteps, "_compiled", False)
        python = _traced(shell, cell)
    assert answers.count(True) == lifted  # none by the compiled hook the second time
    assert len(lifts) == 2 * lifted  # lifted alike both ways
    assert _facts(compiled) == _facts(python)
    assert compiled.repeats == python.repeats and compiled.notes == python.notes
    # repr: a NaN loss is the same NaN both ways
    assert repr([(i.loss, i.grad_norm) for i in compiled.iterations]) == repr([(i.loss, i.grad_norm) for i in python.iterations])
    if poison:
        a, b = compiled.nonfinite, python.nonfinite
        assert a is not None and (a.op, a.run, a.iteration, a.label, a.line) == (b.op, b.run, b.iteration, b.label, b.line)


STEP_CASES = ["none", "closure", "closure by keyword", "pre-hook", "post-hook", "global pre-hook", "global post-hook",
              "mode above", "variant", "busy", "stale", "not alike", "new site", "no line"]


def _lift_once(case: str, compiled: bool):
    """One step call's pre-hook on a made-up tracer whose mode is on torch's stack: (lifted, calls
    counted, `_open`, what is left on the stack, notes), with the compiled hook or the Python one."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.overrides import TorchFunctionMode

    from autograd_magic.capture import torch_compat as compat

    class Ours(TorchFunctionMode):
        stale = case == "stale"

    class Tracer:
        interventions = ("a variant's",) if case == "variant" else ()
        busy = case == "busy"
        notes: list = []

        def note(self, text):
            self.notes.append(text)

    tracer, mode, span = Tracer(), Ours(), (1, 0, 1, 5)
    tracer.notes = []
    tracer._mode = mode
    found = (None if case == "no line" else span, None, span, None)
    tracer.sites = type("Sites", (), {"find": staticmethod(lambda name: found)})()
    tracer.calls, tracer._site_runs, tracer._span_counts = 0, {}, {}
    tracer.trace = type("T", (), {"records": [], "notes": []})()
    steps = steps_module.OptimizerSteps(tracer)
    if case != "new site":
        site = steps._sites[span] = steps_module._Site()
        site.alike, site.calls, site.last = case != "not alike", 7, ((), (), 0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    args, kwargs = (opt,), {}
    if case == "closure":
        args = (opt, lambda: None)
    elif case == "closure by keyword":
        kwargs = {"closure": lambda: None}
    elif case == "pre-hook":
        opt.register_step_pre_hook(lambda *a: None)
    elif case == "post-hook":
        opt.register_step_post_hook(lambda *a: None)
    handles = [register_optimizer_step_pre_hook(lambda *a: None)] if case == "global pre-hook" else \
        [register_optimizer_step_post_hook(lambda *a: None)] if case == "global post-hook" else []
    handles += [register_optimizer_step_pre_hook(steps._pre), register_optimizer_step_post_hook(steps._post)]  # ours
    stack = [mode] + ([TorchFunctionMode()] if case == "mode above" else [])
    for m in stack:
        compat.push_mode(m)
    steps._compiled = compiled
    try:
        if compiled:
            lifted = steps_module._lift_step_c(steps, opt, args, kwargs)
        else:
            steps._pre(opt, args, kwargs)
            lifted = steps._open is not None and steps._open[2][0] == "lifted"
        left = [compat.mode_at(i) for i in range(compat.mode_stack_len())]
    finally:
        while compat.mode_stack_len():
            compat.pop_mode()
        for h in handles:
            h.remove()
    site = steps._sites.get(span)
    return lifted, site.calls if site else None, steps._open if lifted else None, left, tracer.notes, stack


@COMPILED_STEPS
@pytest.mark.parametrize("case", STEP_CASES)
def test_the_compiled_step_hook_lifts_exactly_where_the_python_one_does(case):
    """`lift_step` lifts where `_pre` does (the mode off the stack, the call open and counted) and
    refuses each case `_may_lift` refuses, changing nothing (`_pre` then decides)."""
    c_lifted, c_calls, c_open, c_left, c_notes, stack = _lift_once(case, compiled=True)
    p_lifted, p_calls, p_open, p_left, p_notes, _ = _lift_once(case, compiled=False)
    assert c_lifted == p_lifted == (case == "none")
    if c_lifted:
        assert c_left == p_left == [] and c_calls == p_calls == 8 and c_open[2][0] == "lifted" and c_open[1] == (1, 0, 1, 5)
    else:
        assert c_left == stack and c_calls == (None if case == "new site" else 7) and c_notes == []


def test_what_a_lifted_step_keeps_of_its_parameters_is_the_same_compiled_or_not():
    from autograd_magic.capture import tracer as tracer_module

    compiled = tracer_module._params_state_c
    if compiled is None:
        pytest.skip("capture/_walk.c is not built: only the Python reads run")
    with_grad = torch.nn.Parameter(torch.randn(3, 4))
    with_grad.grad = torch.randn(3, 4)
    with torch.no_grad():
        with_grad.mul_(2.0)  # a version past 0
    params = [with_grad, torch.nn.Parameter(torch.randn(5, dtype=torch.float64)), torch.randn(2, 2, device="meta"),
              torch.nn.Parameter(torch.randn(2).half())]
    ours, theirs = compiled(params), tracer_module._params_state_py(params)
    assert [id(p) for p in ours[0]] == [id(p) for p in theirs[0]] == [id(p) for p in params[:2] + params[3:]]
    assert [id(g) for g in ours[1]] == [id(g) for g in theirs[1]] and ours[1][0] is with_grad.grad
    assert ours[2] == theirs[2] == [p._version for p in ours[0]] and ours[2][0] > 0
    assert ours[3] == theirs[3] == 3 * 4 * 4 + 5 * 8 + 2 * 2
    with torch.inference_mode():
        made = torch.ones(2)  # no version counter: the compiled reads hand it to the Python ones
    with pytest.raises(RuntimeError):
        compiled([made])
    assert tracer_module._params_state([made])[2] == tracer_module._params_state_py([made])[2]


# ---- zero_grad() with the mode lifted ----
@pytest.fixture
def dispatched(monkeypatch):
    """The torch calls each traced run's mode saw (`Tracer.calls` at its stop), one entry per run."""
    from autograd_magic.capture import tracer as tracer_module

    seen = []
    stop = tracer_module.Tracer.stop

    def counting(self):
        seen.append(self.calls)
        return stop(self)

    monkeypatch.setattr(tracer_module.Tracer, "stop", counting)
    return seen


@pytest.fixture
def zero_lifts(monkeypatch):
    """Whether each zero_grad call ran with the mode lifted (one bool per call)."""
    seen = []
    top = steps_module._liftable_top

    def spying():
        mode = top()
        seen.append(mode is not None)
        return mode

    monkeypatch.setattr(steps_module, "_liftable_top", spying)
    return seen


def _never_lift_zero_grad(monkeypatch):
    monkeypatch.setattr(steps_module, "_liftable_top", lambda: None)


ZERO_GRADS = {
    "optimizer": "opt.zero_grad()",
    "module": "model.zero_grad()",
    "keyword": "opt.zero_grad(set_to_none=True)",
    "in place": "opt.zero_grad(set_to_none=False)",
}


@pytest.mark.parametrize("how", sorted(ZERO_GRADS))
def test_zero_grad_lifted_computes_and_records_what_a_traced_one_does(shell, zero_lifts, dispatched, monkeypatch, how):
    cell = _loop("adam").replace("opt.zero_grad()", ZERO_GRADS[how])
    plain = _plain(cell)
    lifted = _traced(shell, cell)
    if how == "in place":  # zero_() on each gradient is the user's op, recorded: never lifted
        assert not any(zero_lifts)
        assert any(r.op == "zero_" for r in lifted.records)
    else:
        assert len(zero_lifts) == 30 and all(zero_lifts)
    for a, b in zip(shell.user_ns["model"].parameters(), plain["model"].parameters()):
        assert torch.equal(a, b) and torch.equal(a.grad, b.grad)
    shell.reset(new_session=False)
    with monkeypatch.context() as m:
        _never_lift_zero_grad(m)
        traced = _traced(shell, cell)
    assert _facts(lifted) == _facts(traced) and lifted.repeats == traced.repeats and lifted.notes == traced.notes
    assert [(i.loss, i.grad_norm) for i in lifted.iterations] == [(i.loss, i.grad_norm) for i in traced.iterations]
    # the mode really was off the stack: none of a lifted zero_grad's reads and writes reached it
    lifted_calls, traced_calls = dispatched[0], dispatched[-1]
    if how == "in place":
        assert lifted_calls == traced_calls
    else:  # per call after the first: a .grad read and write for each of the 4 parameters (and an optimizer's profiler range)
        assert traced_calls - lifted_calls >= 29 * 8


TORCH_ZERO_GRADS = tuple(original for _, original in steps_module._TORCH_ZERO_GRADS)


def _zero_grads() -> tuple:
    return torch.optim.Optimizer.__dict__["zero_grad"], torch.nn.Module.__dict__["zero_grad"]


def test_zero_grad_is_torchs_own_again_after_a_cell_even_one_that_raises(shell):
    before = TORCH_ZERO_GRADS
    assert _zero_grads() == before
    _traced(shell, _loop("sgd").replace("range(30)", "range(3)"))
    assert _zero_grads() == before
    shell.run_cell("import torch")
    with capture_output():
        result = shell.run_cell("%%autograd --quiet\nm = torch.nn.Linear(2, 2)\nm.zero_grad()\nraise ValueError('boom')")
    assert isinstance(result.error_in_exec, ValueError)
    assert _zero_grads() == before
    assert torch._C._len_torch_function_stack() == 0


def test_tracers_in_several_threads_lift_their_own_zero_grad_and_leave_torchs_in_place():
    # torch's mode stack is per thread, the wrapping is not: tracers starting and stopping at once
    # in four threads each compute what plain torch does, and torch's own methods are back after
    import threading

    import autograd_magic as am

    def run(traced: bool, out: list, barrier=None) -> None:
        m = torch.nn.Linear(4, 2)  # the global RNG is shared by the threads: fixed values instead
        with torch.no_grad():
            m.weight.copy_(torch.linspace(-1, 1, 8).reshape(2, 4))
            m.bias.fill_(0.5)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        x = torch.linspace(0, 1, 12).reshape(3, 4)
        if barrier is not None:
            barrier.wait()
        for _ in range(25):
            if traced:
                with am.trace():
                    opt.zero_grad()
                    m(x).pow(2).sum().backward()
                    opt.step()
            else:
                opt.zero_grad()
                m(x).pow(2).sum().backward()
                opt.step()
        out.append((m.weight.detach().clone(), torch._C._len_torch_function_stack()))

    expected: list = []
    run(False, expected)
    got: list = []
    barrier = threading.Barrier(4)
    threads = [threading.Thread(target=run, args=(True, got, barrier)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(got) == 4
    for weight, stack in got:
        assert torch.equal(weight, expected[0][0]) and stack == 0
    assert _zero_grads() == TORCH_ZERO_GRADS and not steps_module._lifting and not steps_module._wrapped


def test_a_zero_grad_that_raises_while_lifted_fails_as_it_would_and_the_cell_stays_traced(shell, zero_lifts):
    # a module whose parameters() raises on the call zero_grad makes; the cell catches it and goes on
    cell = """class Odd(torch.nn.Linear):
    fail = False
    def parameters(self, recurse=True):
        if Odd.fail:
            raise RuntimeError('no parameters today')
        return super().parameters(recurse)
torch.manual_seed(0)
m = Odd(3, 2)
x = torch.ones(1, 3)
m(x).sum().backward()
Odd.fail = True
try:
    m.zero_grad()
except RuntimeError as e:
    caught = str(e)
Odd.fail = False
y = m(x).sum()
"""
    plain = _plain(cell)
    t = _traced(shell, cell)
    assert zero_lifts == [True]
    assert shell.user_ns["caught"] == plain["caught"] == "no parameters today"
    assert torch.equal(shell.user_ns["y"], plain["y"])
    # the mode was back for the ops after it: the second forward is recorded on its line
    assert any(r.op == "sum" and t.source_line(r.line).strip() == "y = m(x).sum()" for r in t.records)
    assert torch._C._len_torch_function_stack() == 0


def test_zero_grad_is_not_lifted_under_a_mode_of_the_users_above_ours(shell, zero_lifts):
    cell = "from torch.overrides import TorchFunctionMode\nseen = []\nclass Mine(TorchFunctionMode):\n" \
           "    def __torch_function__(self, func, types, args=(), kwargs=None):\n" \
           "        seen.append(getattr(func, '__name__', ''))\n        return func(*args, **(kwargs or {}))\n" \
           "m = torch.nn.Linear(2, 2)\nm(torch.ones(2)).sum().backward()\nwith Mine():\n    m.zero_grad()\n"
    plain = _plain(cell)
    _traced(shell, cell)
    assert zero_lifts == [False]
    assert shell.user_ns["seen"] == plain["seen"] and "__set__" in plain["seen"]
    assert shell.user_ns["m"].weight.grad is None


def test_a_zero_grad_of_the_users_own_runs_traced_and_stays_theirs(shell, zero_lifts, monkeypatch):
    """A replacement put in place before the cell runs its own ops traced, as it would with no lifting;
    one put in place during the cell (made with functools.wraps, as most are) is still there after it."""
    patch = "import functools\n_torchs = torch.optim.Optimizer.zero_grad\nnorms = []\n" \
            "@functools.wraps(_torchs)\ndef logged(self, *a, **k):\n" \
            "    if self.param_groups[0]['params'][0].grad is not None:\n" \
            "        norms.append(torch.stack([p.grad.norm() for g in self.param_groups for p in g['params']]).sum())\n" \
            "    return _torchs(self, *a, **k)\n"
    cell = _loop("sgd").replace("range(30)", "range(6)")
    try:
        shell.run_cell("import torch\n" + patch + "torch.optim.Optimizer.zero_grad = logged")
        lifted = _traced(shell, cell)
        assert not any(zero_lifts)  # not torch's own: nothing lifted
        assert any(r.op == "norm" for r in lifted.records)
        shell.reset(new_session=False)
        torch.optim.Optimizer.zero_grad = TORCH_ZERO_GRADS[0]
        shell.run_cell("import torch\n" + patch + "torch.optim.Optimizer.zero_grad = logged")
        with monkeypatch.context() as m:
            _never_lift_zero_grad(m)
            traced = _traced(shell, cell)
        assert _facts(lifted) == _facts(traced)
    finally:
        torch.optim.Optimizer.zero_grad = TORCH_ZERO_GRADS[0]
    try:
        _traced(shell, patch + "torch.optim.Optimizer.zero_grad = logged\nm = torch.nn.Linear(2, 1)")
        assert torch.optim.Optimizer.__dict__["zero_grad"] is shell.user_ns["logged"]
    finally:
        torch.optim.Optimizer.zero_grad = TORCH_ZERO_GRADS[0]
    assert _zero_grads() == TORCH_ZERO_GRADS


# ---- torch's profiler ranges with the mode lifted ----
TORCH_RANGES = tuple(original for _, _, original in steps_module._TORCH_RANGES)


def _ranges() -> tuple:
    return tuple(torch.autograd.profiler.record_function.__dict__[name] for name in ("__enter__", "__exit__"))


RANGES = """import torch
x = torch.ones(3, requires_grad=True)
for i in range(5):
    with torch.autograd.profiler.record_function("mine"):
        y = (x * 2).sum()
y.backward()
"""


def test_a_profiler_range_runs_with_the_mode_lifted_and_profiles_as_it_would(shell, dispatched):
    # its two torch.ops calls never reach the mode: the cell without the ranges counts the same
    # calls; the range still reaches torch's profiler, as often as in the plain cell
    from torch.profiler import profile

    def ranges(result_of) -> int:
        with profile() as prof:
            result_of()
        return sum(1 for e in prof.events() if e.name == "mine")

    plain_count = ranges(lambda: _plain(RANGES))
    traced = []
    traced_count = ranges(lambda: traced.append(_traced(shell, RANGES)))
    assert plain_count == traced_count == 5
    shell.reset(new_session=False)
    _traced(shell, RANGES.replace('with torch.autograd.profiler.record_function("mine"):', "if True:"))
    assert dispatched[0] == dispatched[1]
    assert torch.equal(shell.user_ns["x"].grad, _plain(RANGES)["x"].grad)
    assert _ranges() == TORCH_RANGES


def test_an_optimizer_steps_range_is_lifted_and_torchs_own_again_after_a_cell_that_raises(shell, monkeypatch):
    # the range each step opens (before the step hooks) sees no mode on torch's stack, also in the
    # first --limit steps, recorded in detail; after the cell, torch's own methods are back
    seen = []
    enter = TORCH_RANGES[0]

    def spying(self):
        seen.append((self.name, torch._C._len_torch_function_stack()))
        return enter(self)

    wrappers = tuple((o, n, orig, steps_module._lifted_range(spying) if n == "__enter__" else w)
                     for o, n, orig, w in steps_module._WRAPPERS)
    monkeypatch.setattr(steps_module, "_WRAPPERS", wrappers)
    shell.run_cell("import torch")
    with capture_output():
        result = shell.run_cell("%%autograd --quiet\n" + _loop("adam").replace("range(30)", "range(6)")
                                + "raise ValueError('boom')")
    assert isinstance(result.error_in_exec, ValueError)
    steps = [depth for name, depth in seen if name.startswith("Optimizer.step#")]
    assert steps == [0] * 6 and len(seen) == 12  # and each zero_grad's range
    assert _ranges() == TORCH_RANGES and not steps_module._wrapped
    assert torch._C._len_torch_function_stack() == 0


# ---- a step that changes nothing: the optimizer holds tensors without a gradient ----
def _notes_of(shell, body: str) -> list[str]:
    return _traced(shell, body).notes


def test_a_step_whose_optimizer_holds_an_earlier_models_parameters_says_it_changed_nothing(shell):
    """The model's cell run again after the optimizer's: the loop trains nothing (plain torch: the
    new model's weights stay as they were), and the view says why, once, naming what got gradients."""
    shell.run_cell("import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(3, 1)\nx = torch.randn(4, 3)\n"
                   "opt = torch.optim.SGD(model.parameters(), lr=0.1)\nmodel = torch.nn.Linear(3, 1)")
    before = shell.user_ns["model"].weight.detach().clone()
    loop = "for i in range(3):\n    opt.zero_grad()\n    loss = model(x).pow(2).mean()\n    loss.backward()\n    opt.step()"
    notes = [n for n in _notes_of(shell, loop) if "changed nothing" in n]
    assert len(notes) == 1, notes
    assert "opt.step() on line 6" in notes[0] and "model.weight" in notes[0] and "model.bias" in notes[0]
    assert "built again after the optimizer was made" in notes[0]
    assert torch.equal(shell.user_ns["model"].weight, before)  # what the note says: nothing trained
    # the same loop, plain: the same weights (the note is about the cell, not caused by the trace)
    shell.run_cell("model2 = torch.nn.Linear(3, 1)\nw2 = model2.weight.detach().clone()\n" + loop.replace("model(", "model2("))
    assert torch.equal(shell.user_ns["model2"].weight, shell.user_ns["w2"])


def test_zero_grad_between_backward_and_step_is_said_to_leave_nothing_to_step(shell):
    shell.run_cell("import torch\nmodel = torch.nn.Linear(3, 1)\nx = torch.randn(4, 3)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)")
    notes = _notes_of(shell, "loss = model(x).pow(2).mean()\nloss.backward()\nopt.zero_grad()\nopt.step()")
    hit = [n for n in notes if "changed nothing" in n]
    assert len(hit) == 1 and "(model.weight, model.bias)" in hit[0] and "not between them" in hit[0], notes
    assert shell.user_ns["model"].weight.grad is None


def test_steps_that_update_something_get_no_such_note(shell):
    shell.run_cell("import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))\nx = torch.randn(4, 3)\n"
                   "opt = torch.optim.SGD(model.parameters(), lr=0.1)\nhead = torch.optim.SGD(model[1].parameters(), lr=0.1)")
    loop = "for i in range(3):\n    opt.zero_grad()\n    loss = model(x).pow(2).mean()\n    loss.backward()\n    opt.step()"
    assert not any("changed nothing" in n for n in _notes_of(shell, loop))
    # an optimizer over part of the model (its head): some of its tensors have gradients
    assert not any("changed nothing" in n for n in _notes_of(shell, loop.replace("opt.", "head.")))
    # a closure makes the gradients inside the step (LBFGS): none before it, and the step trains
    shell.run_cell("lbfgs = torch.optim.LBFGS(model.parameters())\nw0 = model[0].weight.detach().clone()")
    closure = ("def closure():\n    lbfgs.zero_grad()\n    loss = model(x).pow(2).mean()\n    loss.backward()\n    return loss\n"
               "lbfgs.zero_grad(set_to_none=True)\nlbfgs.step(closure)")
    assert not any("changed nothing" in n for n in _notes_of(shell, closure))
    assert not torch.equal(shell.user_ns["model"][0].weight, shell.user_ns["w0"])
