"""Clean-up under faults: KeyboardInterrupt and errors anywhere in a traced cell.

A fault counter raises at its k-th tick, for every k the cell reaches, from a
custom autograd Function's forward and backward, a module's forward, tensor
hooks and the cell body. The traced run must fail exactly as the plain run
does (same error, same namespace) and leave nothing behind: no mode on
torch's stack, no global module hook, no hook that still fires on a later
backward, no binding helper in the namespace, and the user's own modes in
place.
"""

from __future__ import annotations

import gc
import signal
import threading
import time

import pytest
import torch
from IPython.utils.capture import capture_output
from torch.overrides import TorchFunctionMode

from fuzz_programs import fresh_shell, run

BIND = "__autograd_magic_bind__"

PRELUDE = '''
import torch

class Fault:
    def __init__(self):
        self.k, self.calls, self.exc = 0, 0, KeyboardInterrupt

    def tick(self, where):
        self.calls += 1
        if self.calls == self.k:
            raise self.exc(f"fault at {where} #{self.calls}")

fault = Fault()

class Boom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        fault.tick("Function.forward")
        return x * 2

    @staticmethod
    def backward(ctx, g):
        fault.tick("Function.backward")
        return g * 2

class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        fault.tick("Module.forward")
        return torch.tanh(self.lin(x))
'''

CELL = '''net = Layer()
x = torch.ones(3, requires_grad=True)
h = x.register_hook(lambda g: fault.tick("leaf hook"))
y = Boom.apply(x)
for i in range(4):
    y = net(y) * 0.5
    y.register_hook(lambda g: fault.tick("hook in loop"))
s = y.sum()
s.backward(retain_graph=True)
g, = torch.autograd.grad(s, [x], retain_graph=True)
fault.tick("cell")
print(x.grad, g)
'''

AFTER = "a = torch.ones(2, requires_grad=True)\nb = (a * 3).exp().sum()\nb.backward()\nprint(a.grad)"


@pytest.fixture(scope="module")
def ipy():
    shell = fresh_shell()
    for key in [k for k in shell.user_ns if k in ("fault", "Boom", "Layer", "Fault")]:
        del shell.user_ns[key]
    assert shell.run_cell(PRELUDE, store_history=False).success
    keep = {k: shell.user_ns[k] for k in ("torch", "Fault", "fault", "Boom", "Layer")}
    shell._fault_keep = keep
    return shell


def _global_hooks() -> tuple:
    from torch.nn.modules import module as nn_module

    return len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks)


def _stance() -> str:
    try:
        from torch._dynamo import eval_frame

        return eval_frame._stance.stance
    except Exception:
        return "unknown"


def _clean_state() -> tuple:
    # A finished run's mode can be pushed back by torch at any later garbage
    # collection (see test_a_mode_pushed_back_late_is_inert_and_purged): it is
    # inert and the extension purges it around every cell. Purge it here too;
    # what is left on the stack after that is a real leak.
    from autograd_magic.capture.tracer import purge_stale_modes

    purge_stale_modes()
    return torch._C._len_torch_function_stack(), _global_hooks(), torch.is_grad_enabled(), _stance()


def _run_with_fault(ipy, k: int, exc, traced: bool, magic: str = "%%autograd --quiet -o trace_out"):
    fault = ipy._fault_keep["fault"]
    fault.k, fault.calls, fault.exc = k, 0, exc
    return run(ipy, CELL, traced=traced, keep=ipy._fault_keep, magic=magic), fault.calls


def _trace_counts(trace) -> tuple:
    return [len(p.steps) for p in trace.passes], [sorted(r.grads) for r in trace.records]


def _ticks(ipy) -> int:
    outcome, calls = _run_with_fault(ipy, 0, KeyboardInterrupt, traced=False)
    assert outcome.error is None, outcome.stdout
    return calls


def _reference_after(ipy) -> str:
    return run(ipy, AFTER, traced=False).stdout


@pytest.mark.parametrize(
    "exc, magic",
    [
        (KeyboardInterrupt, "%%autograd --quiet -o trace_out"),
        (ValueError, "%%autograd --quiet -o trace_out"),
        # with a sandboxed variant re-run and a gradient check after the real run
        (KeyboardInterrupt, "%%autograd --quiet --no-grad --check -o trace_out"),
    ],
    ids=["KeyboardInterrupt", "ValueError", "KeyboardInterrupt-variant"],
)
def test_fault_at_every_tick(ipy, exc, magic):
    total = _ticks(ipy)
    assert total > 10  # forward, module, hooks and backward ticks all ran
    reference = _reference_after(ipy)
    before = _clean_state()
    injected = 0
    for k in range(1, total + 2):
        plain, _ = _run_with_fault(ipy, k, exc, traced=False)
        traced, _ = _run_with_fault(ipy, k, exc, traced=True, magic=magic)
        injected += plain.error is not None
        assert traced.error == plain.error, k
        if k <= total:
            assert plain.error == (exc.__name__, plain.error[1]) and "fault at" in plain.error[1]
        assert traced.namespace.keys() - {"trace_out"} == plain.namespace.keys(), k
        for key in plain.namespace:
            assert traced.namespace[key] == plain.namespace[key], (k, key)
        assert BIND not in ipy.user_ns
        assert _clean_state() == before, k
        # Our tensor and node hooks are gone: a later backward leaves the stored trace alone.
        trace = ipy.user_ns["trace_out"]
        counts = _trace_counts(trace)
        fault = ipy._fault_keep["fault"]
        fault.k = -1
        if "s" in ipy.user_ns and ipy.user_ns["s"].requires_grad:
            ipy.user_ns["s"].backward(retain_graph=True)
        assert _trace_counts(trace) == counts, k
        # The next plain cell runs as it would have without the magic.
        assert _reference_after(ipy) == reference
    assert injected == total


def test_fault_trace_records_the_error(ipy):
    fault = ipy._fault_keep["fault"]
    traced, _ = _run_with_fault(ipy, 3, ValueError, traced=True)
    trace = ipy.user_ns["trace_out"]
    assert trace.error is not None and trace.error.type == "ValueError"
    assert "fault at" in trace.error.message
    assert fault.calls == 3


def test_fault_with_views_shown(ipy):
    # Not --quiet: the text view renders a partial trace and the error still propagates.
    for k in (1, 5, 12):
        plain, _ = _run_with_fault(ipy, k, KeyboardInterrupt, traced=False)
        traced, _ = _run_with_fault(ipy, k, KeyboardInterrupt, traced=True, magic="%%autograd --text")
        assert traced.error == plain.error
        assert "autograd trace" in traced.stdout
        assert _clean_state()[0] == 0


class _Counting(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("k", [0, 2, 7, 15])
def test_user_modes_survive(ipy, k):
    """A mode entered before the cell and one entered in the cell (never exited) stay, in order."""
    cell_enter = "inner = Counting()\ninner.__enter__()\n"
    keep = dict(ipy._fault_keep, Counting=_Counting)
    results = {}
    for traced in (False, True):
        outer = _Counting()
        depth = torch._C._len_torch_function_stack()
        outer.__enter__()
        try:
            fault = keep["fault"]
            fault.k, fault.calls, fault.exc = k, 0, KeyboardInterrupt
            outcome = run(ipy, cell_enter + CELL, traced=traced, keep=keep)
            inner = ipy.user_ns["inner"]
            assert torch._C._len_torch_function_stack() == depth + 2
            assert torch._C._get_function_stack_at(depth) is outer
            assert torch._C._get_function_stack_at(depth + 1) is inner
            # Both still see the next cell's ops.
            n_outer, n_inner = len(outer.calls), len(inner.calls)
            torch.ones(2) + 1
            assert len(outer.calls) > n_outer and len(inner.calls) > n_inner
            results[traced] = (outcome.error, outcome.namespace.keys(), list(outer.calls), list(inner.calls))
        finally:
            while torch._C._len_torch_function_stack() > depth:
                torch._C._pop_torch_function_stack()
    assert results[True][0] == results[False][0]
    assert results[True][1] == results[False][1]
    # The user's modes saw exactly the ops of a plain run: our previews never reach them.
    assert results[True][2] == results[False][2]
    assert results[True][3] == results[False][3]


def test_error_in_user_hook_and_module(ipy):
    cells = [
        "x = torch.ones(3, requires_grad=True)\ny = x * 2\ny.register_hook(lambda g: 1 / 0)\ny.sum().backward()",
        "class Bad(torch.nn.Module):\n    def forward(self, x):\n        raise RuntimeError('bad forward')\n"
        "m = Bad()\nx = torch.ones(3, requires_grad=True)\ny = m(x * 2)",
        "x = torch.ones(3, requires_grad=True)\ny = x * 2\nraise ValueError(f'in cell {y.sum().item()}')",
        "x = torch.ones(3, requires_grad=True)\ny = x.reshape(5)",
    ]
    before = _clean_state()
    for cell in cells:
        plain = run(ipy, cell, traced=False)
        traced = run(ipy, cell, traced=True)
        assert plain.error is not None
        assert traced.error == plain.error
        # Same traceback in the cell's own frames (global module hooks make torch's
        # Module._call_impl take its slow path, so torch's own frames may differ).
        assert _cell_frames(traced.shown) == _cell_frames(plain.shown)
        assert "autograd_magic" not in traced.shown
        assert traced.namespace == plain.namespace
        assert _clean_state() == before
        assert BIND not in ipy.user_ns


def _cell_frames(shown: str) -> list:
    kept, keep = [], True
    lines = shown.split("\n")
    for line in lines[:-1]:
        if line.startswith(("Cell", "File ")):
            keep = line.startswith("Cell")
        if keep:
            kept.append(line)
    return kept + lines[-1:]


def test_user_binding_name_kept(ipy):
    """A user's own variable with our helper's name is left as it was."""
    keep = dict(ipy._fault_keep, **{BIND: "mine"})
    run(ipy, "x = torch.ones(2) * 2", traced=True, keep=keep)
    assert ipy.user_ns[BIND] == "mine"
    del ipy.user_ns[BIND]


# An interrupt that lands in a gc callback is printed and dropped by Python ("Exception ignored").
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("magic", ["%%autograd --quiet", "%%autograd --quiet --no-grad"], ids=["real", "with-variant"])
def test_interrupt_from_a_timer(ipy, magic):
    """Ctrl-C at arbitrary moments (a signal, not a hook): state is always clean afterwards.

    The timer is armed by the cell's first line, so the interrupt lands in the
    traced code, in the tracer's own work or in the magic around it; one that
    lands after `run_cell` returned is caught here and counted as late.
    """
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    body = "x = torch.ones(8, requires_grad=True)\ny = x\nfor i in range(200):\n    y = (y * 1.001).tanh() + x\n" \
           "y.sum().backward()\nprint(float(x.grad.sum()))"
    # float(), not the tensor's repr: torch's printer enters torch.no_grad(), whose
    # __enter__ leaves grad mode off if a signal lands just after it disabled it
    # (a plain cell too: see test_torch_printing_is_not_interrupt_safe_plain_either).
    keep = dict(ipy._fault_keep, arm=lambda delay: signal.setitimer(signal.ITIMER_REAL, delay))
    before = _clean_state()

    def interrupt(signum, frame):
        raise KeyboardInterrupt("timer")

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        durations = []
        for _ in range(3):  # the fastest warm run: delays must land inside the cell
            start = time.perf_counter()
            assert run(ipy, body, traced=True, keep=keep, magic=magic).error is None
            durations.append(time.perf_counter() - start)
        duration = min(durations)
        outcomes = {"in cell": 0, "late": 0, "none": 0}
        for i in range(40):
            delay = max(1e-5, duration * i / 44)
            try:
                outcome = run(ipy, f"arm({delay})\n" + body, traced=True, keep=keep, magic=magic)
                outcomes["in cell" if outcome.error else "none"] += 1
                if outcome.error:
                    assert outcome.error == ("KeyboardInterrupt", "timer")
            except KeyboardInterrupt:
                outcomes["late"] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert _clean_state() == before, (i, outcomes)
            assert BIND not in ipy.user_ns
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["in cell"] >= 5, outcomes


def test_torch_printing_is_not_interrupt_safe_plain_either(ipy):
    """Ctrl-C landing just as torch's printer entered `torch.no_grad()` leaves grad
    mode off in a plain cell (its `__exit__` never runs): the traced cell does the
    same, no more and no less. (Why the timer test prints a float, not a tensor.)"""
    import sys

    import torch.autograd.grad_mode as grad_mode

    enter = grad_mode.no_grad.__enter__.__code__

    def inject(frame, event, arg):
        if event == "call" and frame.f_code is enter:
            def at_return(frame, event, arg):
                if event == "return":
                    raise KeyboardInterrupt("landed in no_grad.__enter__")
                return at_return

            return at_return
        return None

    after = {}
    try:
        for traced in (False, True):
            sys.settrace(inject)
            try:
                outcome = run(ipy, "x = torch.ones(3)\nprint(x)", traced=traced, keep=ipy._fault_keep)
            finally:
                sys.settrace(None)
            after[traced] = (outcome.error, torch.is_grad_enabled())
            torch.set_grad_enabled(True)
    finally:
        torch.set_grad_enabled(True)
    assert after[False] == (("KeyboardInterrupt", "landed in no_grad.__enter__"), False)
    assert after[True] == after[False]


@pytest.mark.parametrize("where", ["push", "stance"])
def test_interrupt_while_the_tracer_starts(ipy, monkeypatch, where):
    """Ctrl-C half-way through starting: nothing stays pushed, registered or bound."""
    from autograd_magic.capture import tracer as _tracer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("during start")

    if where == "push":  # right after the mode went onto torch's stack
        real_enter = _tracer._Mode.__enter__

        def enter_then_interrupt(self):
            real_enter(self)
            interrupted()

        monkeypatch.setattr(_tracer._Mode, "__enter__", enter_then_interrupt)
    else:  # right after the eager stance for compiled code was set (the cell mentions compile)
        from autograd_magic.capture import torch_compat

        real_apply = torch_compat.force_eager

        def apply_then_interrupt():
            real_apply()
            interrupted()

        monkeypatch.setattr(torch_compat, "force_eager", apply_then_interrupt)
    before = _clean_state()
    cell = "x = torch.ones(2) * 2  # mentions torch.compile: the eager stance is set"
    try:
        for magic in ("%%autograd --quiet", "%%autograd --quiet --no-grad"):
            outcome = run(ipy, cell, traced=True, keep=ipy._fault_keep, magic=magic)
            assert outcome.error == ("KeyboardInterrupt", "during start")
            assert _clean_state() == before
            assert BIND not in ipy.user_ns
        import autograd_magic as am

        for no_grad in (False, True):
            with pytest.raises(KeyboardInterrupt):
                with am.trace(no_grad=no_grad):  # mentions compile too: torch.compile
                    torch.ones(2) * 2
            assert _clean_state() == before
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("method", ["_finish_records", "_pop_mode"])
def test_interrupt_while_the_tracer_stops(ipy, monkeypatch, method):
    """Ctrl-C inside the clean-up itself: what is left of it still runs."""
    from autograd_magic.capture.tracer import Tracer

    real = getattr(Tracer, method)
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        real(self, *args, **kwargs)
        raise KeyboardInterrupt("during stop")

    before = _clean_state()
    monkeypatch.setattr(Tracer, method, interrupted)
    try:
        outcome = run(ipy, "x = torch.ones(2, requires_grad=True)\ny = x * 2", traced=True, keep=ipy._fault_keep)
    finally:
        monkeypatch.setattr(Tracer, method, real)
    assert calls
    assert outcome.error == ("KeyboardInterrupt", "during stop")
    assert _clean_state() == before
    assert BIND not in ipy.user_ns
    assert not ipy.user_ns["x"]._backward_hooks


def test_a_mode_pushed_back_late_is_inert_and_purged(ipy):
    """torch runs a mode's handler inside `_pop_mode_temporarily`, a generator-based
    context manager; Ctrl-C landing in its `__exit__` leaves the generator suspended,
    and when it is collected (cells later) its `finally` pushes our finished mode back.
    That mode must record nothing, and be gone before the next cell runs."""
    import gc

    import autograd_magic as am

    gc.collect()  # earlier tests' suspended generators (timer Ctrl-Cs) push theirs now, not below
    before = _clean_state()
    x = torch.ones(2, requires_grad=True)
    suspended = []  # (a list: the block's f_locals snapshot must not keep the generator alive)
    with am.trace() as trace:
        y = x * 2
        suspended.append(torch.overrides._pop_mode_temporarily())  # what an interrupted handler leaves behind
        suspended[0].__enter__()  # pops our mode off the stack and holds it
    n = len(trace.records)
    suspended.clear()
    gc.collect()  # the generator's `finally` pushes the finished mode back
    try:
        assert torch._C._len_torch_function_stack() == before[0] + 1  # the mechanism is real
        stale = torch._C._get_function_stack_at(before[0])
        assert stale.tracer.trace is trace
        z = (y * 3).sum()  # runs through the pushed-back mode: it must stay inert
        assert len(trace.records) == n
        outcome = run(ipy, "w = torch.ones(2) * 3", traced=False, keep=ipy._fault_keep)  # a plain cell
        assert outcome.error is None
        assert torch._C._len_torch_function_stack() == before[0]  # purged around that cell (no purge of ours here)
        torch._C._push_on_torch_function_stack(stale)  # once more, then a traced run starts
        with am.trace() as again:
            z * 2
        assert len(again.records) >= 1 and len(trace.records) == n
        assert torch._C._len_torch_function_stack() == before[0]
    finally:
        from autograd_magic.capture.tracer import purge_stale_modes

        purge_stale_modes()


def test_torch_compile_runs_under_the_magic(ipy):
    try:
        compiled = torch.compile(lambda a, b: (a * b).sin() + a, backend="eager")
        compiled(torch.ones(2), torch.ones(2))
    except Exception as exc:  # no dynamo on this platform / Python
        pytest.skip(f"torch.compile does not work here: {type(exc).__name__}: {exc}")
    # Defined in a cell, as users do (dynamo then reads the cell's source).
    run(ipy, "@torch.compile(backend='eager')\ndef f(a, b):\n    return (a * b).sin() + a", traced=False, keep=ipy._fault_keep)
    keep = dict(ipy._fault_keep, f=ipy.user_ns["f"])
    cell = "x = torch.ones(3, requires_grad=True)\ny = f(x, torch.arange(3.0))\ny.sum().backward()\nprint(x.grad)\ny"
    plain = run(ipy, cell, traced=False, keep=keep)
    traced = run(ipy, cell, traced=True, keep=keep)
    assert plain.error is None
    assert traced.error == plain.error
    assert traced.stdout == plain.stdout
    def mine(ns):  # dynamo adds its own globals (`__compiled_fn_*`) when it compiles
        return {k: v for k, v in ns.items() if not k.startswith("__")}

    assert mine(traced.namespace) == mine(plain.namespace)
    assert _clean_state()[0] == 0 and _stance() in ("default", "unknown")
    # And compiled code still compiles after the cell.
    assert torch.equal(compiled(torch.ones(2), torch.ones(2)), torch.ones(2).sin() + 1)


def test_tracers_overlapping_in_threads_keep_compiled_code_eager_until_the_last_stops():
    """The compile stance is the process's: tracers in two threads that start A, B and stop A, B keep
    compiled code eager while either runs, and the last to stop puts back the stance from before."""
    import threading

    import autograd_magic as am

    try:
        from torch._dynamo import eval_frame
    except Exception as exc:  # no dynamo on this platform / Python
        pytest.skip(f"no torch._dynamo here: {type(exc).__name__}: {exc}")
    before = _stance()
    a_in, b_in, a_out, b_out = (threading.Event() for _ in range(4))
    seen = {}

    def first():
        with am.trace():
            a_in.set()
            b_in.wait(10)
            seen["both running"] = _stance()
        a_out.set()

    def second():
        a_in.wait(10)
        with am.trace():
            b_in.set()
            a_out.wait(10)
            seen["after the first stopped"] = _stance()
        b_out.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert b_out.is_set()
    assert seen == {"both running": "force_eager", "after the first stopped": "force_eager"}
    assert _stance() == before == eval_frame._stance.stance


def test_nested_traces_are_isolated(ipy):
    """A %%autograd run and an am.trace() block inside a traced cell: each records its own, the outer resumes."""
    cell = (
        "x = torch.ones(2, requires_grad=True)\n"
        "get_ipython().run_cell_magic('autograd', '--quiet -o inner', 'y = x * 2\\n')\n"
        "z = y + 1\n"
        "import autograd_magic as am\n"
        "with am.trace() as block:\n    w = z * 3\n"
        "v = w.sum()\n"
    )
    before = _clean_state()
    plain = run(ipy, cell, traced=False, keep=ipy._fault_keep)
    traced = run(ipy, cell, traced=True, keep=ipy._fault_keep, magic="%%autograd --quiet -o outer")
    assert plain.error is None and traced.error is None
    ours = {"outer", "inner", "block"}
    assert {k: v for k, v in traced.namespace.items() if k not in ours} == {
        k: v for k, v in plain.namespace.items() if k not in ours
    }
    outer, inner, block = (ipy.user_ns[k] for k in ("outer", "inner", "block"))
    assert {"x", "z", "v"} <= {r.name for r in outer.records}  # named after the inner run ended
    assert "y" in {r.name for r in inner.records} and "z" not in {r.name for r in inner.records}
    assert [r.name for r in block.records if r.expr == "z * 3"] == ["w"]
    assert BIND not in ipy.user_ns
    assert _clean_state() == before


@pytest.mark.parametrize(
    "magic", ["%%autograd --quiet -o t", "%%autograd --text -o t", "%%autograd --static -o t", "%%autograd -o t",
              "%%autograd --quiet --no-grad -o t"]
)
def test_no_tensor_kept_alive(ipy, magic):
    """The trace, the views and the toggles hold plain data: the cell's tensors die with their names."""
    cell = (
        "import weakref\nx = torch.ones(1000, requires_grad=True)\ny = x * 2\nz = (y.exp() * 3).sum()\n"
        "z.backward()\nrefs = [weakref.ref(v) for v in (x, y, z, x.grad)]"
    )
    outcome = run(ipy, cell, traced=True, keep=ipy._fault_keep, magic=magic)
    assert outcome.error is None
    ipy.run_cell("del x, y, z", store_history=False)
    gc.collect()
    assert [r() is None for r in ipy.user_ns["refs"]] == [True] * 4


def test_a_users_mode_sees_none_of_the_nan_search_past_the_limit(ipy):
    """Past --limit the tracer keeps a loop's ops and searches them for the first NaN/Inf: reading
    their sizes, versions and values must not reach a mode of the user's (it sees a plain run's ops)."""
    loop = ("h = torch.ones(3)\nfor i in range(8):\n    h = h * 2\n"
            "h = h / torch.zeros(3)\nfor i in range(6):\n    h = h + 1\n")
    seen = {}
    for traced in (False, True):
        mode = _Counting()
        with mode:
            with capture_output():
                result = ipy.run_cell(("%%autograd --quiet -o nan_trace\n" if traced else "") + loop)
        assert result.success, result.error_in_exec
        seen[traced] = list(mode.calls)
    assert seen[True] == seen[False]
    assert ipy.user_ns["nan_trace"].nonfinite is not None  # the search ran, and found the Inf


TRANSFORMER_EVAL = """import warnings
warnings.filterwarnings("ignore")
torch.manual_seed(0)
layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
enc = torch.nn.TransformerEncoder(layer, 2).eval()
mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
x = torch.randn(2, 5, 8)
mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
with torch.no_grad():
    z = enc(x, src_key_padding_mask=mask)
    z1 = layer.eval()(x)
    a, w = mha(x, x, x, key_padding_mask=mask)
"""


def _run_for(ipy, cell: str, magic: str = "") -> dict:
    ipy.run_cell("import torch", store_history=False)
    with capture_output():
        result = ipy.run_cell(magic + cell, store_history=False)
    assert result.error_in_exec is None, result.error_in_exec
    return {k: ipy.user_ns[k] for k in ("z", "z1", "a", "w")}


def test_eval_mode_attention_computes_what_the_plain_run_computes():
    """Any TorchFunctionMode turns off the fused inference path of the Transformer layers and of
    MultiheadAttention (`torch.overrides.has_torch_function`): the traced cell computed padded
    positions another way (values where plain torch has zeros). Ours alone does not count: the
    fused op goes through it as one op, and the results are plain torch's, bit for bit."""
    ipy = fresh_shell()
    plain = _run_for(ipy, TRANSFORMER_EVAL)
    traced = _run_for(ipy, TRANSFORMER_EVAL, "%%autograd --quiet -o _t\n")
    assert plain["z"][1, 3:].abs().sum() == 0  # the fused path's padded positions
    for name in plain:
        assert torch.equal(plain[name], traced[name]), name
    assert torch.overrides.has_torch_function is torch._C._has_torch_function  # torch's own again
    assert not ipy.user_ns["_t"].notes, ipy.user_ns["_t"].notes  # the nested tensors were previewed, no op skipped


def test_a_users_own_mode_still_turns_the_fused_path_off():
    """A mode of the user's below ours sees every op, as it would without the magic: the fused path stays off."""
    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    ipy = fresh_shell()
    ipy.user_ns["Watch"] = Watch
    _run_for(ipy, TRANSFORMER_EVAL.replace("with torch.no_grad():", "with torch.no_grad(), Watch():"), "%%autograd --quiet\n")
    assert "_transformer_encoder_layer_fwd" not in seen and "linear" in seen


def test_torchs_other_callers_of_has_torch_function_get_its_own_answer():
    """Only the attention fast-path checks see the tracer's mode discounted: `torch._assert` (and
    higher-order ops) still route through __torch_function__ while a cell is traced."""
    import autograd_magic as am

    x = torch.ones(2)
    with am.trace():
        assert torch.overrides.has_torch_function((x,))  # the mode is on: torch's own answer here
        torch._assert(x.sum() > 0, "positive")
