"""The tracer: a TorchFunctionMode that records every tensor op, plus hooks.

For each op that produces a tensor it writes a `Record` (op, inputs,
`grad_fn`, flags, a bounded preview, the exact source span that ran it).
Each backward pass's node order and per-node gradients come from
`Node.register_prehook` / `register_hook`, removed when the pass ends; the
gradient each record received is its node's incoming gradient (records are
matched to nodes as they are made, so no per-tensor hook is needed).
Nothing here changes what the traced code computes: every op is run
exactly as called and hooks only read.
"""

from __future__ import annotations

import math
import re
import sys
import types
import weakref
from types import CodeType
from typing import Any, Callable, Iterable, Optional

import torch
from torch.overrides import TorchFunctionMode

from . import functions, torch_compat as compat
from .backward import BackwardRecorder
from .earlier import CellRecords, EarlierCells, bring_in, stand_in
from .interventions import Intervention
from .names import NameIndex
from .finite import UNINITIALISED, checkable, holds_nonfinite
from .preview import DeviceQueue, activate, preview, preview_quiet, quietly
from .ops import NOT_OPS, grad_fn_name, is_inplace, is_leaf, op_name, tensors_in, writes_out
from ..data.trace import CUT_OPS, DATA_SET, GRAD_SET, REQUIRES_GRAD_SET, Origin, Record, Trace, cut_of, untracked_history
from .sites import SiteFinder
from .source import SourceMap
from .steps import STEP, OptimizerSteps
from .. import limits

_stack_len = compat.mode_stack_len

try:  # optional (setup.py): where it is not built, the mode's handler is `_PyMode`'s
    from ._walk import ModeCore as _ModeCore, configure as _walk_configure
except ImportError:
    _ModeCore = None
try:
    from ._walk import params_state as _params_state_c
except ImportError:
    _params_state_c = None


def purge_stale_modes() -> None:
    """Take off torch's stack any of our modes whose run has ended.

    torch runs a mode's handler inside a generator-based context manager that
    pops the mode and pushes it back in its `finally`. A Ctrl-C landing in
    that context manager's `__exit__` leaves the generator suspended; when it
    is garbage-collected later (often cells later) its `finally` pushes our
    long-finished mode back. Such a mode is inert (`stale`); this removes it,
    keeping every other mode in its place. Called before each cell and each
    traced run.
    """
    n = _stack_len()
    if not any(_is_stale(compat.mode_at(i)) for i in range(n)):
        return
    kept = []
    try:
        while _stack_len() > 0:
            m = compat.pop_mode()
            if not _is_stale(m):
                kept.append(m)
    finally:
        for m in reversed(kept):
            compat.push_mode(m)


def _is_stale(mode) -> bool:
    return isinstance(mode, (_Mode, _PyMode)) and mode.stale


# What a torch function is to the mode, decided once per function object: most calls in a
# training loop are attribute reads (`p.grad`) and writes, which need one dict lookup, not five checks.
_OP, _GET, _PASS, _BACKWARD = 0, 1, 2, 3
_BACKWARD_FUNCS = (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad)
_KINDS: dict = {}
_KINDS_MAX = 8192  # functions made on the fly (rare) are classified each time past this


def _call_kind(func) -> tuple[int, str]:
    try:
        return _KINDS[func]
    except (KeyError, TypeError):  # new, or unhashable
        pass
    name = getattr(func, "__name__", "")
    if any(func is f for f in _BACKWARD_FUNCS):
        kind = _BACKWARD
    elif name in NOT_OPS:
        kind = _PASS
    elif name == "__get__":
        kind = _GET
    else:
        kind = _OP
    entry = (kind, name)
    # torch's own functions only: a user's function or bound method (a closure, a lambda made on the
    # fly) would be kept alive with everything it holds
    if isinstance(func, (types.FunctionType, types.MethodType)) and not (getattr(func, "__module__", None) or "").startswith("torch"):
        return entry
    if len(_KINDS) < _KINDS_MAX:
        try:
            _KINDS[func] = entry
        except TypeError:
            pass
    return entry


# `.data` makes a tensor with no history out of one that may have it: recorded as an op (its row and the
# explanations name the cut), where other attribute reads without a grad_fn are not
_KINDS[torch.Tensor.data.__get__] = (_OP, "__get__")
# `w.data = ...` (a manual SGD step) replaces a tensor's values: recorded as an in-place op on it, so its
# later uses read the new values' row, where a setter otherwise passes through unrecorded
_KINDS[torch.Tensor.data.__set__] = (_OP, DATA_SET)
# `w.requires_grad = False` switches the flag as `w.requires_grad_(False)` does: recorded as that op
_KINDS[torch.Tensor.requires_grad.__set__] = (_OP, REQUIRES_GRAD_SET)
# `b.grad = g`: noted (not a row), so the next backward pass into b says its .grad started from what was assigned
_KINDS[torch.Tensor.grad.__set__] = (_OP, GRAD_SET)


def _grad_fn_quiet(out) -> Optional[str]:
    """`grad_fn_name` with torch-function dispatch off: a user's mode below ours must not see our read."""
    with compat.no_torch_function():
        return grad_fn_name(out)


def _params_state_py(params: list) -> tuple:
    """(the CPU ones, their `.grad`s, their versions, their bytes) of an optimizer's parameters:
    what `keep_step` keeps of a lifted step."""
    params = [p for p in params if p.is_cpu]
    return params, tuple(p.grad for p in params), compat.versions_of(params), sum(p.numel() * p.element_size() for p in params)


def _params_state(params: list) -> tuple:
    """`_params_state_py`, compiled (capture/_walk.c) where built; an inference tensor (no version) goes the Python way."""
    if _params_state_c is not None:
        try:
            return _params_state_c(params)
        except RuntimeError:
            pass
    return _params_state_py(params)


def _cut_input(records: list, rid: int) -> Optional[Record]:
    """The nearest input from outside the cell in `records[rid]`'s history that an earlier cell cut
    off the graph (its record carries that cell's `Origin`), if any."""
    return next((r for r in untracked_history(records, rid) if r.external and r.origin is not None), None)


class _PyMode(TorchFunctionMode):
    """The handler in Python: `_Mode` where the compiled one (capture/_walk.c's ModeCore) is not built."""

    def __init__(self, tracer: "Tracer"):
        super().__init__()
        self.tracer = tracer
        self.stale = False  # set once its run ended: it must never record again

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tracer = self.tracer
        # stale: pushed back after its run by a late finalizer, inert until purged;
        # busy: the tracer's own work (previews, naming) is not the user's
        if self.stale or tracer.busy:
            return func(*args, **(kwargs or {}))
        tracer.calls += 1
        kind, name = _call_kind(func)
        kwargs = kwargs or {}
        if kind == _PASS:
            return func(*args, **kwargs)
        if kind == _BACKWARD:
            return tracer.backward.run(func, args, kwargs)
        if kind == _OP:  # about to change a tensor in place (`x.add_(1)`, `out=x`): one from before the cell is previewed first
            # (`t.grad = g` is named like an in-place op only to reach on_op: it changes no values)
            target = args[0] if args and is_inplace(name, name) and name != GRAD_SET else kwargs.get("out")
            if isinstance(target, torch.Tensor) and tracer.record_of(target) is None:
                tracer.before_inplace(target)
        out = func(*args, **kwargs)
        # Fast exits for what is not a new tensor: attribute reads (p.grad, .shape)
        # and non-tensor results are most calls in an optimizer step.
        if kind == _GET:
            if type(out) is not torch.Tensor:
                return out
            # ours is off the stack in here: nothing would see the read, unless a user's mode is below
            fn = grad_fn_name(out) if _stack_len() == 0 else _grad_fn_quiet(out)
            if fn is None:
                return out
        elif out is None:
            if not name.endswith("_"):
                return out
        elif not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        try:
            return tracer.on_op(func, name, args, kwargs, out)
        except Exception as exc:  # the tracer must never break the user's code
            tracer.op_failed(func, exc)
            return out


if _ModeCore is not None:
    _walk_configure(torch.Tensor, _KINDS, _call_kind, _stack_len, _grad_fn_quiet, torch.is_grad_enabled, limits)
    try:
        from ._walk import configure_passes as _configure_passes
        from . import preview as _preview_module

        _configure_passes(torch.Tensor.backward, torch.nn.Parameter, _preview_module)
    except ImportError:
        pass
    try:  # an op's first runs recorded by the handler itself (`on_op`'s common case; tests compare both)
        from ._walk import configure_records as _configure_records

        _configure_records(Record, op_name, globals())
    except ImportError:
        pass

    class _Mode(_ModeCore, TorchFunctionMode):
        """The tracer's mode: `_PyMode`'s handler, compiled (capture/_walk.c); the same calls go
        the same way (tests run both)."""

        def __init__(self, tracer: "Tracer"):
            super().__init__()
            self.tracer = tracer
            self.stale = False
else:
    _Mode = _PyMode


class Tracer:
    """Records one run of traced code into a `Trace`.

    `anchor` decides which frames are the traced code itself (a cell's
    frames, or the block of a `with trace()`); ops called from deeper frames
    are attributed to the anchor's call site and marked `internal`.
    """

    # a loop's `loss.backward()` past --limit in the compiled handler's own steps (capture/_walk.c's
    # `pass_fast`), where it is built; the same reads as backward.py's `_run_unrecorded` (tests switch it off)
    _fast_passes = True

    def __init__(
        self,
        source_map: SourceMap,
        anchor: Callable[[CodeType], bool],
        namespace: Optional[dict] = None,
        detail_limit: int = limits.DETAIL_LIMIT,
        interventions: Iterable[Intervention] = (),
        root: Optional[Callable[[CodeType], bool]] = None,
        earlier: Optional[EarlierCells] = None,
    ):
        self.source_map = source_map
        self.names = NameIndex(namespace)
        # `root`: which anchor frames are the traced code's top level (default: not a function)
        self.sites = SiteFinder(source_map, anchor, self.names.module_name, **({"root": root} if root else {}))
        source = getattr(source_map, "source", None)
        self.trace = Trace(source=source if source is not None else "\n".join(source_map.lines))
        self.detail_limit = detail_limit
        # A variant's changes (detach, flip, cast, nudge); the real run has none and only reads.
        self.interventions = tuple(interventions)
        self._cutters = tuple(iv for iv in self.interventions if iv.cuts)
        self._replacers = tuple(iv for iv in self.interventions if iv.replaces)
        self._detaching = bool(self._cutters)
        # inside an optimizer step call within --limit (capture/steps.py): its ops are recorded whatever
        # their own counts (its loop over the parameters runs one update op per parameter)
        self._step_detail = False
        self.keeps_graphs = any(iv.keeps_graphs for iv in self.interventions)
        self.detach_hits: set[str] = set()
        # Records of earlier traced cells, brought in when this run's backward reaches them
        self.earlier = earlier
        # (id of the earlier cell's CellRecords, its record id) -> record id here: not the execution count,
        # which two cells share when run with store_history=False (nbclient, run_cell from code)
        self.brought: dict[tuple[int, int], int] = {}
        self._refs_at_end: dict[int, weakref.ref] = {}
        self.backward = BackwardRecorder(self)
        self.steps = OptimizerSteps(self)  # a loop's optimizer steps past the limit, run with the mode lifted
        self._by_tensor: dict[int, tuple[weakref.ref, int]] = {}
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # record id -> (tensor ref, version)
        self._site_runs: dict[tuple, list] = {}  # site key -> [runs so far, id of its first record]
        self._span_counts: dict[tuple, int] = {}
        self._mode: Optional[_Mode] = None
        self._noted: set[str] = set()
        self.busy = False
        self.calls = 0  # the traced code's torch calls so far: what may have touched a tensor
        self.backward_calls = 0  # backward calls so far: a NaN found past --limit says how many came before it
        self._final_names: dict[int, str] = {}
        self.final_namespace: Optional[dict] = None  # set by trace() to name records at the end
        # device tensors' previews: reduced on the device, read back in batches (no sync per op)
        self.device_previews = DeviceQueue()
        self._outer_queue: Optional[DeviceQueue] = None
        self._queue_on = False
        # ops past the detail limit since the last backward call, checked for NaN/Inf only when
        # that call's loss is not finite (issue 16; see `check_window`), until the first is found
        self._watching = True
        self._window: list[tuple] = []
        self._window_bytes = 0  # what the window keeps alive: bounded, or an inference loop would hold every output
        self._grads_at, self._grad_names = -1, {}  # `_leaf_grad_name`'s lookup, as of that many backward calls
        # (id, torch calls then, preview) of a tensor an in-place op is about to change (`before_inplace`)
        self._before: Optional[tuple] = None
        self._ns_grads_at, self._ns_grads = -1, {}  # `_namespace_grad_owner`'s, likewise
        self._grad_sets: dict[int, tuple] = {}  # id(t) -> (t's ref, line) of `t.grad = ...` since its last pass

    # ---- lifecycle ----
    def start(self) -> "Tracer":
        try:
            purge_stale_modes()
            self._outer_queue, self._queue_on = activate(self.device_previews), True
            self._mode = _Mode(self)
            self._mode.__enter__()
            functions.install(self._mode)
            self.steps.start()
            # Importing dynamo just to set a stance costs ~70 MB: only when compiled
            # code may run (dynamo already loaded, or the traced source compiles).
            if "torch._dynamo" in sys.modules or "compile" in self.trace.source:
                compat.hold_eager(self)  # released by stop(), also after a Ctrl-C half-way through
        except BaseException:  # a Ctrl-C half-way through: leave nothing pushed or registered
            self.stop()
            raise
        return self

    def stop(self) -> Trace:
        """Pop the mode and remove every hook; safe to call twice and on any error."""
        try:
            self.steps.stop()
            if self._mode is not None:
                functions.uninstall(self._mode)
            self._pop_mode()
            if self._window:  # the ops after the last backward call (or a cell with none): checked now
                self.check_window()
        finally:
            self._window = []
            compat.release_eager(self)  # the last tracer running puts back the stance the first found
            try:
                try:
                    self._finish_records()
                finally:
                    try:
                        self._end_device_previews()
                    finally:
                        self.backward.finish_iterations()  # after the previews are filled: it reads them
            finally:
                if self.earlier is not None:  # weak: the cells after this one find its live tensors
                    self._refs_at_end = {rid: ref for rid, (ref, _) in self._live.items()}
                self._by_tensor.clear()
                self._live.clear()
                self._grad_names, self._ns_grads = {}, {}
                # the recorder's way back is weak from now on: no cycle keeps the run's records
                # (and their arrays) alive until the garbage collector runs, nor makes it run
                self.backward.tracer = weakref.proxy(self)
        return self.trace

    def _end_device_previews(self) -> None:
        """Read the queued device previews back (one transfer) and give the queue slot back."""
        try:
            self.device_previews.flush()
        finally:
            if self._queue_on:
                activate(self._outer_queue)
                self._queue_on = False

    def _pop_mode(self) -> None:
        mode = self._mode
        if mode is None:
            return
        # A user's mode entered in the traced code and never exited sits above
        # ours: lift it off, remove ours, and put it back where it was.
        # `self._mode` is cleared only once ours is off the stack, so a stop()
        # interrupted half-way (Ctrl-C) can simply be called again.
        mode.stale = True  # from now on it records nothing, wherever it is
        above = []
        try:
            while compat.mode_stack_len() > 0:
                top = compat.pop_mode()
                if top is mode:
                    self._mode = None
                    break
                if not _is_stale(top):  # an earlier run's mode pushed back late: drop it
                    above.append(top)
            else:
                self._mode = None  # no longer on the stack at all
        finally:
            for m in reversed(above):
                compat.push_mode(m)

    def op_failed(self, func, exc: Exception) -> None:
        """Our bookkeeping of an op raised: noted; the user's code goes on with the op's output."""
        self.note(f"tracer skipped an op ({op_name(func)}): {type(exc).__name__}: {exc}")

    def note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.trace.notes.append(text)

    # ---- where an op came from ----
    def site(self, func_name: str):
        """(span, internal) of the current op: the traced code's frame and what ran between."""
        span, internal, _, _ = self.sites.find(func_name)
        return span, internal

    # ---- records ----
    def record_of(self, t: torch.Tensor) -> Optional[int]:
        entry = self._by_tensor.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def record_for(self, t: torch.Tensor, name: Optional[str] = None, from_earlier: bool = False) -> int:
        """The record of `t`: its own, or (`from_earlier`, for what a backward pass reaches) an
        earlier traced cell's, or a new external one. A forward op's input from an earlier cell
        stays one external record: re-runs of this cell can then share it with the real run."""
        rid = self.record_of(t)
        if rid is not None:
            return rid
        rid = self._from_earlier_cell(t) if from_earlier else None
        return rid if rid is not None else self._external(t, name)

    @quietly  # also reached from the fast path, outside `_record_op`
    def _input_record(self, t: torch.Tensor, span, internal: Optional[str], inplace: bool) -> int:
        return self._input_record_quiet(t, span, internal, inplace)

    def _input_record_quiet(self, t: torch.Tensor, span, internal: Optional[str], inplace: bool) -> int:
        """An op's input; a parameter first seen filled in place inside a call of this cell
        (a module's `__init__` initialising it) was created by that call, not outside the cell."""
        entry = self._by_tensor.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        if not inplace or internal is None or not isinstance(t, torch.nn.Parameter) or self._known_parameter(t):
            return self._external_quiet(t, None)  # `record_for`: it has no record of its own
        # a module's new parameter filled in place (init_): its row shows the values it was given,
        # not the memory before (`before_inplace`)
        self._before = None
        rid = self._external_quiet(t, None)
        rec = self.trace.records[rid]
        rec.created_by, rec.line = self.source_map.text(span), span[0] if span else None
        return rid

    def _grad_set(self, args, found: Optional[tuple]) -> None:
        """`t.grad = g` in the cell: the next backward pass into `t` adds to what it assigned."""
        t = args[0] if args else None
        if not isinstance(t, torch.Tensor):
            return
        try:
            span = (found if found is not None else self.sites.find("__set__"))[0]
            self._grad_sets[id(t)] = (weakref.ref(t), span[0] if span else None)
        except Exception:  # bookkeeping only: the pass then says .grad was kept or changed
            pass

    def grad_assigned(self, t: torch.Tensor) -> Optional[tuple]:
        """(line,) when the cell assigned `t.grad` since the last pass into `t` (taken: once per assignment)."""
        hit = self._grad_sets.pop(id(t), None)
        return (hit[1],) if hit is not None and hit[0]() is t else None

    def _known_parameter(self, t: torch.nn.Parameter) -> bool:
        """A parameter from before the cell that a call changes in place (an optimizer's step, a
        function of the user's): not one a module's `__init__` is filling, which no name reaches yet."""
        return self.steps.in_step() or self.names.tensor_name(t) is not None

    def _from_earlier_cell(self, t: torch.Tensor) -> Optional[int]:
        """`t` was made by an earlier traced cell (`y` in `y.backward()`): bring its record in."""
        if self.earlier is None:
            return None
        try:
            fn = t.grad_fn
            found = self.earlier.find(compat.node_key(fn)) if fn is not None else None
            if found is None:
                return None
            cell, outs = found
            rid = next((r for out_nr, r in outs if out_nr == t.output_nr), None)
            if rid is None:
                return None
            here = bring_in(self, cell, rid)
        except Exception as exc:  # bookkeeping only: the tensor is then shown as external
            self.note(f"could not bring in a record of an earlier cell: {type(exc).__name__}: {exc}")
            return None
        self._adopt(self.trace.records[here], t)
        return here

    def bring_in_node(self, key: tuple) -> None:
        """A backward pass reached a node an earlier traced cell made: bring its records in."""
        found = self.earlier.find(key) if self.earlier is not None else None
        if found is None:
            return
        cell, outs = found
        for _, rid in outs:
            if (id(cell), rid) not in self.brought:
                bring_in(self, cell, rid)

    def stand_in_node(self, key: tuple) -> None:
        """This run's external records of a node an earlier traced cell made take on that cell's
        records: its op, source and cell, and what it was computed from (brought in)."""
        found = self.earlier.find(key) if self.earlier is not None else None
        if found is None:
            return
        cell, outs = found
        for out_nr, rid in self.backward.node_records.get(key, []):
            src = next((r for o, r in outs if o == out_nr), None)
            if src is not None and (id(cell), src) not in self.brought:
                stand_in(self, cell, src, self.trace.records[rid])

    def cell_records(self, cell: int) -> CellRecords:
        """This run's records as an earlier cell for the cells that follow: only those it made
        (an external input, or a record brought in, belongs to the cell that made it)."""
        records = self.trace.records
        own = lambda rid: not records[rid].external and records[rid].cell is None  # noqa: E731
        by_node = {k: [(o, r) for o, r in v if own(r)] for k, v in self.backward.node_records.items()}
        outer = {r: (k, o) for k, v in self.backward.node_records.items() for o, r in v
                 if records[r].external and records[r].cell is None}
        return CellRecords(
            cell=cell, trace=self.trace, by_node={k: v for k, v in by_node.items() if v},
            tensors=dict(self._refs_at_end), outer=outer, cuts=self._cuts(cell), made=self._made(cell),
            names=self._names_at_end(),
        )

    def _names_at_end(self) -> dict[int, str]:
        """This run's live tensors by a name each had in it (a later cell that meets one no name
        holds any more calls it by that name: "earlier w")."""
        records, seen, out = self.trace.records, set(), {}
        for rid in sorted(self._refs_at_end):
            t = self._refs_at_end[rid]()
            name = records[rid].name or self._final_names.get(rid) or records[rid].former
            if t is None or not name or id(t) in seen:
                continue
            seen.add(id(t))
            out[rid] = name
        return out

    def _made(self, cell: int) -> dict[int, tuple[int, Optional[int]]]:
        """This run's live tensors by the record that made each (the first of an in-place chain)."""
        records, seen, out = self.trace.records, set(), {}
        for rid in sorted(self._refs_at_end):
            t = self._refs_at_end[rid]()
            r = records[rid]
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if not r.external and r.cell is None and r.line is not None:
                out[rid] = (cell, r.line)
        return out

    def _cuts(self, cell: int) -> dict[int, Origin]:
        """This run's live tensors that something in it cut off the graph: `CellRecords.cuts`."""
        records, out = self.trace.records, {}
        for rid, ref in self._refs_at_end.items():
            r = records[rid]
            if r.requires_grad or r.external or r.cell is not None or ref() is None:
                continue
            found = cut_of(records, rid)
            if found is not None:
                c, src = found
                out[rid] = Origin(cell=cell, how="no_grad" if c.op not in CUT_OPS else c.op, line=c.line, expr=c.expr,
                                  source=src.label, via=c.label if c.id != rid else None)
                continue
            ext = _cut_input(records, rid)  # computed from an input an earlier cell cut: that cut, carried on
            if ext is not None:
                o = ext.origin
                out[rid] = Origin(cell=cell, how=o.how, line=o.line, expr=o.expr, source=o.source,
                                  via=o.via or ext.label, cut_cell=o.cut_cell or o.cell)
        return out

    def _adopt(self, rec: Record, t: torch.Tensor) -> bool:
        """A live tensor is known by `rec` from now on (its .grad is read at the end)."""
        try:
            ref = weakref.ref(t)
        except TypeError:
            return False
        self._by_tensor[id(t)] = (ref, rec.id)
        self._live[rec.id] = (ref, compat.version_of(t))
        return True

    @quietly
    def _external(self, t: torch.Tensor, name: Optional[str]) -> int:
        return self._external_quiet(t, name)

    def before_inplace(self, t: torch.Tensor) -> None:
        """An in-place op is about to change `t`, which no record has yet (a tensor from before the
        cell, `x.add_(1)` or `w -= lr * w.grad` in the cell after the one that made it): its values
        now, for the record the op's use of it makes, which shows it before the change. Both handlers
        call this before the op; nothing else runs in between (the same call count). Its flags too:
        `x.requires_grad_()` switches requires_grad on, `x.add_(w)` gives a leaf a grad_fn."""
        try:
            with compat.no_torch_function():  # our reads are not the user's ops (a mode of theirs below ours)
                flags = (t.requires_grad, grad_fn_name(t), is_leaf(t))
                version = compat.version_of(t)
            self._before = (id(t), self.calls, preview(t), flags, version)
        except Exception:  # the record then shows it as after the op
            self._before = None

    def _external_quiet(self, t: torch.Tensor, name: Optional[str]) -> int:
        before = self._before
        if before is not None and before[0] == id(t) and before[1] == self.calls:
            shown, (requires_grad, grad_fn, leaf), self._before = before[2], before[3], None
        else:  # the op's other inputs come first in `torch.mul(a, b, out=c)`: c's is kept for c
            shown, requires_grad, grad_fn, leaf = preview_quiet(t), t.requires_grad, grad_fn_name(t), is_leaf(t)
            before = None
        name = name or self.names.tensor_name(t)
        leaf_grad = False
        if name is None and self.backward.last_span is not None:  # the `.grad` of a leaf this cell's backward reached?
            name = self._leaf_grad_name(t)
            leaf_grad = name is not None  # an optimizer's update reads it
        grad_of = None
        if name is None and not t.requires_grad:  # the `.grad` of a namespace tensor, left by earlier backward calls?
            grad_of = self._namespace_grad_owner(t)
            if grad_of is not None:
                name = f"{grad_of}.grad"
        elif leaf_grad:
            grad_of = name[: -len(".grad")]
        rec = Record(
            id=len(self.trace.records),
            op="external",
            name=name,
            external=True,
            grad_fn=grad_fn,
            requires_grad=requires_grad,
            is_leaf=leaf,
            grad_enabled=torch.is_grad_enabled(),
            preview=shown,
            grad_of=grad_of,
            origin=self.earlier.origin_of(t) if self.earlier is not None and not requires_grad else None,
            made_in=self.earlier.made_in(t) if self.earlier is not None else None,
        )
        if leaf_grad:
            self._made_by_backward(rec)
        else:
            made = self.backward.grad_results.get(id(t))
            if made is not None and made[0]() is t:  # what an autograd.grad call of this cell returned
                self._made_by_backward(rec, made[1])
        self._add(rec, t)
        live = self._live.get(rec.id) if before is not None else None
        if live is not None:  # its row is from before the op: the op's change counts as a later one
            self._live[rec.id] = (live[0], before[4])
        return rec.id

    def _leaf_grad_name(self, t: torch.Tensor) -> Optional[str]:
        """`model.0.weight.grad` when `t` is the `.grad` of a leaf this run recorded (read by an
        optimizer's update), else None. The leaves' gradients are looked up once per backward call."""
        if self._grads_at != self.backward_calls:
            self._grads_at, self._grad_names = self.backward_calls, {}
            for ref, _ in list(self.backward.leaf_records.values()):
                leaf = ref()
                g = leaf.grad if leaf is not None else None
                if g is not None:  # weak both: the lookup keeps no parameter alive
                    self._grad_names[id(g)] = (weakref.ref(g), ref)
        hit = self._grad_names.get(id(t))
        leaf = hit[1]() if hit is not None and hit[0]() is t else None
        if leaf is None:
            return None
        leaf_name = self.names.tensor_name(leaf)
        return f"{leaf_name}.grad" if leaf_name else None

    def superseded(self, pairs: list) -> None:
        """Each (tensor, record id): a newer record is that tensor's now (a custom Function's apply
        took over what its forward returned); the older one keeps its value, but is no longer the
        tensor's at the end (its name, its .grad)."""
        for t, rid in pairs:
            now = self.record_of(t)
            if now != rid:
                self._live.pop(rid, None)
                self.trace.records[rid].became = now

    def _namespace_grad_owner(self, t: torch.Tensor) -> Optional[str]:
        """The name of the namespace tensor (or module parameter) whose `.grad` is `t`, if one's is.
        Their gradients are looked up once per backward call of this run (a call makes new ones)."""
        if self._ns_grads_at != self.backward_calls:
            self._ns_grads_at, self._ns_grads = self.backward_calls, {}
            for name, leaf in self.names.requires_grad_tensors(modules=True)[: limits.NAMESPACE_GRADS]:
                try:
                    g = leaf.grad if leaf.is_leaf or leaf.retains_grad else None
                    if g is not None:
                        self._ns_grads[id(g)] = (weakref.ref(g), name)
                except (RuntimeError, TypeError):  # a no_grad view whose base changed in place: is_leaf raises
                    continue
        hit = self._ns_grads.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def _add(self, rec: Record, t: torch.Tensor) -> None:
        self.trace.records.append(rec)
        if self._adopt(rec, t) and t.requires_grad:
            self.backward.note_record(rec.id, t)

    def on_op(self, func, func_name: str, args, kwargs, out, found: Optional[tuple] = None):
        """Record `out`; ops past the detail limit of their site only count (a loop's later runs).
        `found`: the op's site, where the compiled handler has walked already (a case its own
        fast path for a loop's later runs leaves to this one)."""
        if func_name == GRAD_SET:
            self._grad_set(args, found)
            return out
        if func_name == "__get__":
            # Properties: only those that make a new differentiable tensor (.T, .real);
            # __torch_function__ has checked the grad_fn already.
            if not isinstance(out, torch.Tensor) or self.record_of(out) is not None:
                return out
        if isinstance(out, torch.Tensor):
            outs = [out]
        elif isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
            outs = list(out)
        elif out is None and args and is_inplace(func_name, op_name(func)):
            outs = list(tensors_in(args[0]))  # __setitem__, _foreach_*_ return nothing
        else:
            return out
        span, internal, key, module = found if found is not None else self.sites.find(func_name)
        site = self._site_runs.get(key)
        if site is None:
            site = self._site_runs[key] = [0, None]
        count = site[0]  # runs of this very op: the detail limit
        site[0] = count + 1
        occurrence = self._span_counts.get(span, 0)  # runs of anything at this span: a unique key
        self._span_counts[span] = occurrence + 1
        if count >= self.detail_limit and key is not None and not self._step_detail:
            # The fast path of a loop's later runs: no preview, only a finiteness check until
            # the first NaN/Inf (how many ran is read off `_site_runs` at the end).
            if self._watching and outs:
                entry = (func, func_name, args, kwargs, out, outs, span, internal, key, occurrence, module, site, count)
                if _stack_len() == 0:  # ours is off the stack in here: nothing would see our reads
                    self._keep_for_nan_search(entry, outs)
                else:
                    with compat.no_torch_function():  # our reads (device, size, version) are not the user's ops
                        self._keep_for_nan_search(entry, outs)
            first = site[1]
            # later uses link to the loop's first record of this site; an in-place op's tensor is
            # not the loop's value (init_ over a module's parameters): it keeps a record of its own
            if is_inplace(func_name, func_name) or writes_out(kwargs):
                if internal is not None:
                    for t in outs:  # a module's parameter initialised in a loop (RNN cells)
                        if type(t) is torch.nn.Parameter and self.record_of(t) is None:
                            self._input_record(t, span, internal, True)
            elif first is not None:
                for t in outs:
                    self._by_tensor[id(t)] = (weakref.ref(t), first)
            return self._maybe_detach(span, None, out) if self._detaching else out
        return self._record_op(func, func_name, args, kwargs, out, outs, span, internal, key, occurrence, module, site)

    def _keep_for_nan_search(self, entry: tuple, outs: list) -> None:
        """A later run's op, kept (its inputs and outputs, a reference each) until the next backward
        call says whether its loss is finite: a cheap append, where checking each op costs more."""
        first = outs[0]
        if not first.is_cpu:
            self._watching = False  # a device value read on the host would wait for the device at each op
            self.note(f"ops past the limit on {first.device.type} are not checked for NaN/Inf (that would wait "
                      "for the device); the loss and gradient norm of each iteration still are")
            return
        window = self._window
        window.append((entry, torch.is_grad_enabled(), compat.versions_of(outs), self.backward_calls))
        # numel * element_size, not nbytes: a sparse tensor has no nbytes; most ops have one output
        if len(outs) == 1:
            self._window_bytes += first.numel() * first.element_size()
        else:
            self._window_bytes += sum(t.numel() * t.element_size() for t in outs)
        if len(window) >= limits.FINITE_WINDOW or self._window_bytes >= limits.FINITE_WINDOW_BYTES:
            self.check_window()

    def keep_step(self, opt, params: list, span, internal: str, occurrence: int, count: int) -> None:
        """An optimizer step run with the mode lifted (`capture/steps.py`), in the NaN window in its
        place: its outputs are the optimizer's CPU parameters (as for ops past the limit), each with
        the gradient it was updated from, kept as an update op's inputs would be."""
        with compat.no_torch_function():
            params, grads, versions, nbytes = _params_state(params)
            if not params:
                return
            entry = (opt.step, STEP, grads, {}, None, params, span, internal, None, occurrence, None, [count, None], count)
            self._window.append((entry, False, versions, self.backward_calls))
            self._window_bytes += nbytes
        if len(self._window) >= limits.FINITE_WINDOW or self._window_bytes >= limits.FINITE_WINDOW_BYTES:
            self.check_window()

    def loss_is_finite(self, roots, loss: Optional[float] = None) -> bool:
        """Whether the tensors a backward call differentiates hold only finite values (CPU ones;
        a device tensor is not read here: that would wait for the device). `loss`: the value of
        the single one-element root, already read."""
        if loss is not None and len(roots) == 1:
            return math.isfinite(loss)
        for t in roots:
            if not isinstance(t, torch.Tensor) or not checkable(t):
                continue
            if t.numel() == 1:  # a loss: one number read, no array made
                if not math.isfinite(t.item()):
                    return False
            elif holds_nonfinite(t):
                return False
        return True

    @quietly
    def before_backward(self, roots, loss: Optional[float] = None) -> None:
        """Called as each backward call starts: the ops past the limit since the previous one are
        searched for the first NaN/Inf when this call's loss is not finite, else let go. A NaN or
        an Inf that reaches the loss is found in the iteration where it first does."""
        self.before_backward_quiet(roots, loss)

    def before_backward_quiet(self, roots, loss: Optional[float] = None) -> None:
        """`before_backward` for callers already inside `quietly` (a loop's passes past the limit)."""
        if not self._window:
            return
        try:
            finite = self.loss_is_finite(roots, loss)  # our reads of the loss: torch-function dispatch is off
            if finite:
                self._window.clear()
                self._window_bytes = 0
            else:
                self.check_window()
        except Exception as exc:
            self._drop_window(exc)

    @quietly
    def check_window(self) -> None:
        """Check each kept op's outputs in the order they ran; record the first that holds a NaN
        or an Inf in full, with its inputs as they are now (unchanged since, by their versions)."""
        window, self._window, self._window_bytes = self._window, [], 0
        try:
            with compat.no_torch_function():  # our reads are not the user's ops (a mode of theirs may be on)
                self._search_window(window)
        except Exception as exc:
            self._drop_window(exc)

    def _search_window(self, window: list) -> None:
        for entry, grad_enabled, versions, backward_calls in window:
            func, func_name, args, kwargs, out, outs, span, internal, key, occurrence, module, site, count = entry
            if func_name in UNINITIALISED:  # leftover memory, not a value anyone computed
                continue
            for i, (t, v) in enumerate(zip(outs, versions)):
                if checkable(t) and compat.version_of(t) == v and holds_nonfinite(t):
                    self._watching = False  # the first one of the cell's later runs
                    if func_name == STEP:  # a lifted optimizer step: the parameter it made non-finite, from its gradient
                        args, outs = tuple(g for g in args[i:i + 1] if g is not None), [t]
                        rid = self.record_of(t)
                        # a model built by this cell has its parameters named when the run ends: asked now
                        name = (self.trace.records[rid].name if rid is not None else None) or self.names.tensor_name(t)
                        for g in args:  # named as the parameter's gradient, not "external"
                            grad = self.trace.records[self.record_for(g, name=f"{name}.grad" if name else None)]
                            if name and grad.external and grad.grad_of is None:
                                grad.grad_of = name
                            self._made_by_backward(grad)
                    self._record_op(func, func_name, args, kwargs, out, outs, span, internal, key, occurrence,
                                    module, site, past_limit=count, grad_enabled=grad_enabled,
                                    iteration=backward_calls if backward_calls else None,
                                    inplace=True if func_name == STEP else None)
                    return

    def _made_by_backward(self, rec: Record, span=None) -> None:
        """A gradient first seen as an optimizer's input (its update, or a lifted step) was made by
        this cell's latest backward call (the loop's `loss.backward()`), or `span`'s (an autograd.grad
        call's result): shown on that line, not among tensors from outside the cell, and not as made
        under no_grad (the update reads it so)."""
        span = span if span is not None else self.backward.last_span
        if rec.external and rec.created_by is None and rec.line is None and span is not None:
            rec.created_by, rec.line, rec.grad_enabled = self.source_map.text(span), span[0], True

    def _drop_window(self, exc: Exception) -> None:
        self._watching = False
        self._window = []
        self.note(f"ops past the limit were not checked for NaN/Inf: {type(exc).__name__}: {exc}")

    @quietly
    def _record_op(self, func, func_name, args, kwargs, out, outs, span, internal, key, occurrence, module, site,
                   past_limit: Optional[int] = None, grad_enabled: Optional[bool] = None,
                   iteration: Optional[int] = None, inplace: Optional[bool] = None):
        """The compiled handler records the common case itself (capture/_walk.c's `first_run`: one exact
        tensor out of a first run, no variant, no mode below ours): a change here goes there too.
        `past_limit`: the op's run count, when it is recorded past the detail limit (the first
        NaN/Inf of a loop's later runs): its inputs are previewed as they are now, since their
        records show their first run, and the run is never changed (no variant's replacement)."""
        op = op_name(func)
        if inplace is None:
            inplace = is_inplace(func_name, op) or writes_out(kwargs)
        inputs = []
        tensors = []
        input_record = self._input_record_quiet  # already quiet in here
        given = args
        if kwargs:
            written = kwargs.get("out")
            if written is not None:  # `out=c`: c's old values are not an input, but its row (before) is what changes
                for t in tensors_in(written):
                    input_record(t, span, internal, inplace)
            given = (*args, *(v for k, v in kwargs.items() if k != "out" or v is None))
        for a in given:
            if isinstance(a, torch.Tensor):
                tensors.append(a)
                inputs.append(input_record(a, span, internal, inplace))
            elif isinstance(a, (list, tuple)):
                for t in tensors_in(a):
                    tensors.append(t)
                    inputs.append(input_record(t, span, internal, inplace))
        seen_inputs = [preview_quiet(t) for t in tensors] if past_limit is not None else []
        expr = self.source_map.text(span)
        if grad_enabled is None:
            grad_enabled = torch.is_grad_enabled()
        for i, t in enumerate(outs):
            mutated = self.record_of(t) if inplace else None
            rec = Record(
                id=len(self.trace.records),
                op=op,
                expr=expr,
                line=span[0] if span else None,
                span=span,
                occurrence=occurrence,
                grad_fn=grad_fn_name(t),
                requires_grad=t.requires_grad,
                is_leaf=is_leaf(t),
                grad_enabled=grad_enabled,
                inplace=inplace,
                mutates=mutated,
                inputs=inputs,
                output_index=i if len(outs) > 1 else None,
                internal=internal,
                module=module,
                preview=preview_quiet(t),
                run=past_limit,
                iteration=iteration,
                input_previews=seen_inputs,
            )
            if mutated is not None:
                rec.name = self.trace.records[mutated].name
                if op == DATA_SET:  # no version counter sees it: the tensor's earlier row is marked here
                    self.trace.records[mutated].version_changed = True
            if key is not None and site[1] is None:
                site[1] = rec.id
            self._add(rec, t)
        if past_limit is not None:  # found after the fact: the cell already has this op's output
            return out
        if self._replacers and isinstance(out, torch.Tensor):
            for iv in self._replacers:
                replaced = iv.replace_output(self.trace.records[-1], out)
                if replaced is not None and replaced is not out:
                    rec = self.trace.records[-1]
                    self._by_tensor[id(replaced)] = (weakref.ref(replaced), rec.id)
                    if replaced.is_leaf and replaced.requires_grad and self._adopt(rec, replaced):
                        self.backward.note_record(rec.id, replaced)  # a new leaf: its .grad is the record's
                    out = replaced
        return self._maybe_detach(span, expr, out) if self._detaching else out

    def _maybe_detach(self, span, expr, out):
        if not isinstance(out, torch.Tensor):
            return out
        key = "".join((expr or self.source_map.text(span) or "").split())
        if any(iv.cuts_expression(span, key) for iv in self._cutters):
            self.detach_hits.add(key)
            return self._detached(out)
        return out

    @quietly  # also reached from the fast path, outside `_record_op`
    def _detached(self, t: torch.Tensor) -> torch.Tensor:
        d = t.detach()
        rid = self.record_of(t)
        if rid is not None:
            rec = self.trace.records[rid]
            rec.detached = True
            self._by_tensor[id(d)] = (weakref.ref(d), rid)
        return d

    @quietly
    def bind(self, names: tuple, value: Any) -> Any:
        """Called by the rewritten `name = expr`: names the record, may detach it."""
        if self.busy:
            return value
        self.busy = True
        self.names.touch()
        try:
            if isinstance(value, torch.Tensor):
                return self._bind_one(names[0], value) if len(names) == 1 else value
            if isinstance(value, (tuple, list)) and len(value) == len(names):
                items = [self._bind_one(n, v) if n and isinstance(v, torch.Tensor) else v for n, v in zip(names, value)]
                if any(a is not b for a, b in zip(items, value)):
                    return type(value)(items) if isinstance(value, list) else tuple(items)
        except Exception as exc:
            self.note(f"tracer could not name a value: {type(exc).__name__}: {exc}")
        finally:
            self.busy = False
        return value

    def _bind_one(self, name: Optional[str], t: torch.Tensor) -> torch.Tensor:
        if name is None:
            return t
        rid = self.record_of(t)
        if rid is None:
            rid = self.record_for(t)  # a namespace name (`h = w` is still w) wins
        rec = self.trace.records[rid]
        if rec.name is None:
            rec.name = name
        self.names.learn(t, name)
        if self._detaching and any(iv.cuts_name(name) for iv in self._cutters):
            self.detach_hits.add(name)
            return self._detached(t)
        return t

    # ---- the end of a run ----
    def repeats(self) -> dict[int, int]:
        """First record of a loop site -> how many of its runs were not kept."""
        limit = self.detail_limit
        return {first: runs - limit for runs, first in self._site_runs.values() if first is not None and runs > limit}

    def final_names(self) -> dict[int, str]:
        """Record id -> name for live tensors found in `final_namespace` at stop."""
        return dict(self._final_names)

    def _created_by_binding(self, rec: Record) -> None:
        """A parameter of a module this run bound to a name (`model = ...`, also one made by
        deep copies, as TransformerEncoder's layers are) was created on that line."""
        root = self.names.built_here(rec.name)
        if root is None:
            return
        pattern = re.compile(rf"^\s*{re.escape(root)}\s*(:[^=]*)?=[^=]")
        for i, line in enumerate(self.source_map.lines):
            if pattern.match(line):
                rec.created_by, rec.line = line.strip(), i + 1
                return

    @quietly
    def _finish_records(self) -> None:
        self.busy = True  # the mode is popped already; this guards a user's mode below ours
        records = self.trace.records
        self._final_names = {}
        for rid, (ref, version) in list(self._live.items()):
            t = ref()
            if t is None:
                continue
            rec = records[rid]
            if self.final_namespace is not None and id(t) in self.final_namespace:
                self._final_names[rid] = self.final_namespace[id(t)]
            if rec.external and rec.created_by is None and rec.name and isinstance(t, torch.nn.Parameter):
                self._created_by_binding(rec)
            if rec.name is None:
                # e.g. the parameters of a model built by this very cell
                rec.name = self.names.tensor_name(t)
                if rec.name is None and self.earlier is not None and rid not in self._final_names:
                    rec.former = self.earlier.name_of(t)  # no name holds it now: the one it had
            try:
                if compat.version_of(t) != version:
                    rec.version_changed = True
                if t.is_leaf or t.retains_grad:
                    rec.retains_grad = bool(t.retains_grad)
                    g = t.grad
                    if g is not None:
                        rec.attr_grad = self.backward.grad_seen(t, g) or preview_quiet(g)
                    if rec.grads:
                        rec.grad_after = self.backward.grad_since_last_pass(t, g)
            except Exception:
                pass
        self.trace.repeats = self.repeats()
        self.trace.detached = sorted(self.detach_hits)
