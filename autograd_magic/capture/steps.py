"""A training loop's optimizer steps past --limit, run with the tracer's mode lifted (issue 16's cost).

An optimizer step is torch's own code: per parameter a few attribute reads and in-place updates
(about 25 torch calls for a two-layer MLP under SGD), each one dispatched through the tracer's
mode. Past the detail limit none of them is recorded: they are counted, and their outputs wait in
the NaN window. Measured on the loop benchmark, that dispatch and counting cost more than the step
itself.

So once two calls of one `opt.step()` line have run alike (the same ops the same number of times)
and recorded nothing, its later calls run with the mode off torch's stack: torch's own optimizer
step hooks lift it and put it back. Such a call counts as the one before it did, and it is one
entry of the NaN window, whose outputs are the optimizer's parameters: a NaN or an Inf the step
put into a parameter is found in execution order, attributed to the `opt.step()` line.

Never lifted: in a variant (its interventions see every op), with a closure (LBFGS runs the
model's forward and backward inside its step), with other step hooks (they would run untraced),
or when another mode sits above ours.

`zero_grad()` (an optimizer's or a module's) that sets the gradients to None records nothing: per
parameter a `.grad` read and a `.grad = None`, which the mode passes through, and for an optimizer
a profiler range whose two torch.ops calls go through torch's Python dispatch. Measured on the
loop benchmark, that dispatch cost as much again as the plain zero_grad (+25 us an iteration). So
while a tracer runs, torch's own two `zero_grad`s run with its mode off the stack, when it is on
top and has no interventions; `set_to_none=False` (in-place `zero_()`, recorded) runs as called, and
so does a `zero_grad` someone replaced (its own ops stay traced). torch has no hook there: the two
methods are wrapped while any tracer runs, and put back after the last one.

The profiler range every optimizer step opens (`record_function`, entered before the step hooks
that lift the step, left after them) is two more such torch.ops calls per step, in every loop
iteration: its `__enter__` and `__exit__` are wrapped the same way and run with the mode lifted
(a range holds no tensor; a DataLoader's `next()` opens one too).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Callable, Optional

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks, \
    register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import torch_compat as compat
from .functions import running_top

#: the NaN window's name for a lifted step: no torch function has a dot in its name
STEP = "Optimizer.step"

try:  # compiled where built (capture/_walk.c): a lifted call's two hooks, one call each
    from ._walk import configure_steps as _configure_steps, count_lifted as _count_lifted_c, lift_step as _lift_step_c
except ImportError:
    _lift_step_c = _count_lifted_c = None
else:
    _configure_steps(compat.no_torch_function, _global_optimizer_pre_hooks, _global_optimizer_post_hooks, STEP,
                     compat.pop_mode, compat.push_mode, compat.mode_at)


class _Site:
    """One `opt.step()` span: what its last calls did, and whether they may run lifted."""

    __slots__ = ("calls", "last", "alike")

    def __init__(self):
        self.calls = 0
        self.last: Optional[tuple] = None  # (site deltas, span deltas, torch calls) of the last traced call
        self.alike = False  # the last two traced calls matched and recorded nothing


class OptimizerSteps:
    """The step hooks of one tracer: registered at its start, removed at its stop."""

    # a lifted call's `_pre` and `_count_as_before` compiled (capture/_walk.c), where built; the
    # same reads and changes (tests switch it off)
    _compiled = True

    def __init__(self, tracer):
        self.tracer = weakref.proxy(tracer)  # no cycle: a run's tracer (its records, their arrays) is freed without the collector
        self._handles: list = []
        self._sites: dict[tuple, _Site] = {}
        self._open: Optional[tuple] = None  # the call in progress: (site, span, lifted mode or the counts before it)
        self._lifts = None  # the mode `zero_grad()` runs without (registered at start)
        self._detailing = False  # the tracer's `_step_detail` is on: a call within --limit is running

    def start(self) -> None:
        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        mode = self.tracer._mode
        if mode is not None and not self.tracer.interventions:
            self._lifts = mode
            _lift_zero_grads(mode)

    def stop(self) -> None:
        self._detail(False)
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._lifts is not None:
            _unlift_zero_grads(self._lifts)
            self._lifts = None
        self._raised()  # the tracer takes its mode off the stack, wherever it is
        self._open = None

    def _raised(self, mode_back: bool = False) -> None:
        """A lifted step that never reached its post-hook raised, and the cell went on (it caught
        the error): the ops since ran untraced. The next step call puts the mode back."""
        opened = self._open
        if opened is None or opened[2][0] != "lifted":
            return
        self._open = None
        mode = opened[2][1]
        if mode_back and not mode.stale and not any(compat.mode_at(i) is mode for i in range(compat.mode_stack_len())):
            compat.push_mode(mode)
        self.tracer.note(f"an optimizer step past --limit (line {opened[1][0]}) raised: the ops after it "
                         "until the next step were not traced")

    # ---- the hooks ----
    def _pre(self, opt, args, kwargs) -> None:
        if self._detailing:
            self._detail(False)
        if self._compiled and _lift_step_c is not None:
            try:
                if _lift_step_c(self, opt, args, kwargs):
                    return
            except Exception:  # nothing changed: the way below decides, and notes an error of its own
                pass
        tracer = self.tracer
        self._raised(mode_back=True)
        self._open = None
        mode = tracer._mode
        if mode is None or mode.stale or tracer.busy:
            return
        try:
            with compat.no_torch_function():
                span, _, _, _ = tracer.sites.find("step")
            if span is None:
                return
            site = self._sites.get(span)
            if site is None:
                site = self._sites[span] = _Site()
            site.calls += 1
            if site.calls == 1 and len(args) <= 1 and not kwargs:  # a closure (LBFGS) makes the gradients in the step
                self._check_updates(opt, span)
            if site.alike and self._may_lift(opt, args, kwargs, mode):
                compat.pop_mode()
                self._open = (site, span, ("lifted", mode, opt))
                return
            self._open = (site, span, self._counts())
            # one of the first --limit calls: each of its ops is recorded, once per parameter (their own
            # counts would stop the loop over the parameters part-way); not with a closure (LBFGS runs the
            # model in it: its ops count as any op's)
            self._detail(site.calls <= tracer.detail_limit and len(args) <= 1 and not kwargs)
        except Exception as exc:  # bookkeeping only: the step runs traced as before
            self._open = None
            tracer.note(f"an optimizer step was not counted: {type(exc).__name__}: {exc}")

    def _check_updates(self, opt, span) -> None:
        """A step none of whose parameters has a gradient changes nothing: said once per call site,
        with what the cell's last backward call did give gradients to. The notebook's classic: the
        model's cell run again after the optimizer's, so the optimizer holds the earlier model's
        parameters; or `zero_grad()` between `backward()` and `step()`."""
        tracer = self.tracer
        try:
            with compat.no_torch_function():
                params = [p for g in opt.param_groups for p in g["params"] if isinstance(p, torch.Tensor)]
                if not params or any(p.grad is not None for p in params):
                    return
                labels = [self._label(p) for p in params]
                named = [label for label in labels if label is not None]
                held = _some(named) + ("; " if named and len(named) < len(labels) else "")
                if len(named) < len(labels):
                    held += f"{len(labels) - len(named)} that no name holds now" if named else "no name holds them now"
                recorder, records, ids = tracer.backward, tracer.trace.records, {id(p) for p in params}
                got = [records[recorder.leaf_records[i][1][0]].label for i in recorder._new_grads
                       if i not in ids and i in recorder.leaf_records and recorder.leaf_records[i][1]]
        except Exception:  # a hint only
            return
        text = (f"{tracer.source_map.text(span)} on line {span[0]} changed nothing: none of the {len(params)} "
                f"tensors its optimizer holds ({held}) has a gradient.")
        if got:
            text += (f" The backward call before it gave gradients to {_some(got)}, which the optimizer "
                     "does not hold: was the model built again after the optimizer was made? Make the optimizer "
                     "again from the model's parameters.")
        else:
            text += " Call backward() on the loss before step(), and zero_grad() before the next backward(), not between them."
        tracer.note(text)

    def _label(self, p: torch.Tensor) -> Optional[str]:
        """"model.weight", or "the earlier model.weight" for one no name holds now that an earlier
        traced cell knew by that name; None for one no name holds (a note is plain text: no backticks)."""
        tracer = self.tracer
        name = tracer.names.tensor_name(p)
        if name is not None:
            return name
        former = tracer.earlier.name_of(p) if tracer.earlier is not None else None
        return f"the earlier {former}" if former else None

    def in_step(self) -> bool:
        """An optimizer step's call is running, traced (its ops are seen)."""
        return self._open is not None

    def _detail(self, on: bool) -> None:
        self._detailing = on
        try:
            self.tracer._step_detail = on
        except ReferenceError:  # the tracer is gone
            pass

    def _post(self, opt, args, kwargs) -> None:
        if self._detailing:
            self._detail(False)
        opened, self._open = self._open, None
        if opened is None:
            return
        site, span, state = opened
        tracer = self.tracer
        if state[0] == "lifted":
            try:
                self._count_as_before(site, span, opt)  # before the mode is back: nothing here is the user's
            except Exception as exc:
                site.alike = False
                tracer.note(f"an optimizer step past --limit was not counted: {type(exc).__name__}: {exc}")
            finally:
                compat.push_mode(state[1])
            return
        try:
            records = tracer.trace.records
            for i in range(state[4], len(records)):  # what the step made: its updates (a NaN there is the step's)
                records[i].in_step = True
            self._compare(site, state)
        except Exception as exc:
            site.alike = False
            tracer.note(f"an optimizer step was not counted: {type(exc).__name__}: {exc}")

    # ---- deciding ----
    def _may_lift(self, opt, args, kwargs, mode) -> bool:
        tracer = self.tracer
        if tracer.interventions or len(args) > 1 or kwargs:
            return False
        if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
            return False
        if len(_global_optimizer_pre_hooks) > 1 or len(_global_optimizer_post_hooks) > 1:
            return False  # a hook of someone else's would run untraced
        n = compat.mode_stack_len()
        return n > 0 and compat.mode_at(n - 1) is mode

    def _counts(self) -> tuple:
        tracer = self.tracer
        return ("traced", {k: v[0] for k, v in tracer._site_runs.items()}, dict(tracer._span_counts),
                tracer.calls, len(tracer.trace.records), len(tracer.trace.notes))

    def _compare(self, site: _Site, before: tuple) -> None:
        """A traced call ended: what it counted, and whether the next call may run lifted."""
        tracer = self.tracer
        _, runs, spans, calls, records, notes = before
        # the last call recorded in detail (`_detail`) counts as quiet: the next is past --limit, records nothing
        quiet = (len(tracer.trace.records) == records or site.calls == tracer.detail_limit) and len(tracer.trace.notes) == notes
        site_deltas = tuple((k, v[0] - runs.get(k, 0)) for k, v in tracer._site_runs.items() if v[0] != runs.get(k, 0))
        span_deltas = tuple((k, n - spans.get(k, 0)) for k, n in tracer._span_counts.items() if n != spans.get(k, 0))
        done = (site_deltas, span_deltas, tracer.calls - calls)
        site.alike = quiet and done == site.last and all(k in runs for k, _ in site_deltas)
        site.last = done

    def _count_as_before(self, site: _Site, span, opt) -> None:
        """A lifted call: counted as the traced one before it, and kept in the NaN window."""
        if self._compiled and _count_lifted_c is not None:
            _count_lifted_c(self, site, span, opt)
            return
        tracer = self.tracer
        site_deltas, span_deltas, calls = site.last
        occurrence = tracer._span_counts.get(span, 0)
        runs = tracer._site_runs
        for k, n in site_deltas:
            runs[k][0] += n
        counts = tracer._span_counts
        for k, n in span_deltas:
            counts[k] = counts.get(k, 0) + n
        tracer.calls += calls
        if tracer._watching:
            params = [p for g in opt.param_groups for p in g["params"] if isinstance(p, torch.Tensor)]
            tracer.keep_step(opt, params, span, type(opt).__name__ + ".step", occurrence, site.calls - 1)


# ---- zero_grad() and torch's profiler ranges with the mode lifted ----
#: torch's own methods, as at import: only these are wrapped (a user's or a library's replacement
#: runs ops of its own, which must stay traced)
_TORCH_ZERO_GRADS: tuple = tuple((owner, owner.__dict__["zero_grad"]) for owner in (torch.optim.Optimizer, torch.nn.Module))
#: `torch.autograd.profiler.record_function`'s enter and exit: each is a torch.ops call that goes
#: through torch's Python dispatch to the mode (about 5 us each, plain torch's own cost doubled).
#: Every optimizer step opens one (before the step hooks that lift the step itself), and so does a
#: DataLoader's `next()`. A range records no tensor: it runs with the mode lifted too.
_RANGE = torch.autograd.profiler.record_function
_TORCH_RANGES: tuple = tuple((_RANGE, name, _RANGE.__dict__[name]) for name in ("__enter__", "__exit__"))
#: id(mode) -> mode of the running tracers that may lift it (`OptimizerSteps.start`)
_lifting: dict[int, object] = {}
#: (owner class, attribute, torch's method, our wrapper of it) while wrapped
_wrapped: list[tuple[type, str, Callable, Callable]] = []


def _liftable_top():
    """The mode on top of torch's stack when it is a running tracer's that may be lifted, else None."""
    return running_top(_lifting)


def _run_lifted(mode, original: Callable, args, kwargs):
    """`original(*args, **kwargs)` with `mode` (on top of torch's stack) off it, and back after."""
    popped = False
    try:
        compat.pop_mode()
        popped = True
        return original(*args, **kwargs)
    finally:
        if popped:
            compat.push_mode(mode)


def _lifted_zero_grad(original: Callable) -> Callable:
    @functools.wraps(original)
    def zero_grad(self, *args, **kwargs):
        set_to_none = args[0] if args else kwargs.get("set_to_none", True)
        mode = _liftable_top() if set_to_none is True and len(args) + len(kwargs) <= 1 else None
        if mode is None:
            return original(self, *args, **kwargs)
        return _run_lifted(mode, original, (self, *args), kwargs)

    return zero_grad


def _lifted_range(original: Callable) -> Callable:
    @functools.wraps(original)
    def profiler_range(*args, **kwargs):
        mode = running_top(_lifting)  # not `_liftable_top`: tests count the zero_grads' lookups
        if mode is None:
            return original(*args, **kwargs)
        return _run_lifted(mode, original, args, kwargs)

    return profiler_range


def _some(labels) -> str:
    """The first three of `labels`, joined, and how many more."""
    labels = list(labels)
    shown = ", ".join(labels[:3])
    return shown + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")


#: our wrapper of each of torch's methods, made once (`functools.wraps` per tracer start costs
#: more than a lifted call saves)
_WRAPPERS: tuple = (
    *((owner, "zero_grad", original, _lifted_zero_grad(original)) for owner, original in _TORCH_ZERO_GRADS),
    *((owner, name, original, _lifted_range(original)) for owner, name, original in _TORCH_RANGES),
)
#: tracers start and stop in any thread (torch's mode stack is per thread; these lists are not)
_lift_lock = threading.RLock()  # re-entrant: a finalizer that stops a tracer may run inside


def _lift_zero_grads(mode) -> None:
    with _lift_lock:
        _lifting[id(mode)] = mode
        if _wrapped:
            return
        for owner, name, original, wrapper in _WRAPPERS:
            if owner.__dict__.get(name) is not original:
                continue  # replaced by someone: theirs runs as it is, traced
            _wrapped.append((owner, name, original, wrapper))  # first: an interrupt in between leaves nothing unlisted
            setattr(owner, name, wrapper)


def _unlift_zero_grads(mode) -> None:
    with _lift_lock:
        if _lifting.get(id(mode)) is mode:
            del _lifting[id(mode)]
        if _lifting:
            return
        while _wrapped:
            owner, name, original, wrapper = _wrapped[-1]
            if owner.__dict__.get(name) is wrapper:
                setattr(owner, name, original)  # one the user's code put there since stays
            _wrapped.pop()
