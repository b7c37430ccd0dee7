"""Re-running a cell for the toggles without touching the user's state.

Before the real run of a `%%autograd` cell, `take_snapshot` copies what the
cell reads (tensors cloned with their `.grad` and `requires_grad`, modules,
containers, what the user's own functions read) and the RNG states. A
variant (`run_variant`) then runs in a `Sandbox`: a namespace built from
fresh copies of that snapshot, so it starts from the state the real run
started from, sees the same random numbers, and leaves the user's namespace,
tensors, grads and RNG states exactly as the real run left them.

Tensors that are not leaves (they have a `grad_fn`) cannot be copied with
their graph; they are shared with the real run, and so are the leaves their
graph reaches, and tensors the user's functions hold in defaults and
closures, and what methods of notebook classes read from the real namespace
(methods are not rebound, their class is shared). Their `.grad`,
`requires_grad`, value and version counter are set to the pre-run state
while the sandbox is open and put back when it closes.

Not covered: non-tensor objects that only methods of notebook classes reach
(they are the real ones), CUDA RNG states, views copied apart from their base.
"""

from __future__ import annotations

import copy
import types
import warnings
from typing import Optional

import torch

from ..capture.torch_compat import set_version, version_of
from ..run.execute import execute
from .interventions import Toggles, external_values, interventions_for, new_leaf
from ..data.trace import Record, Trace, TraceError
from .side_effects import quiet_get_ipython
from .snapshot import (
    BUDGET_BYTES, RngState, Snapshot, copy_live, copy_with_grads, readable_grad, take_snapshot,
)
from .messages import skipped_line, snapshot_missing_line
from .. import limits

__all__ = ["Sandbox", "SandboxError", "Snapshot", "Toggles", "take_snapshot", "run_variant", "BUDGET_BYTES", "RngState"]


class SandboxError(Exception):
    """A variant cannot run faithfully (an object it reads cannot be copied)."""


# ---- global torch state ----
def _torch_globals() -> tuple:
    return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.is_anomaly_enabled())


def _put_torch_globals(state: tuple) -> None:
    torch.set_grad_enabled(state[0])
    torch.set_default_dtype(state[1])
    torch.set_anomaly_enabled(state[2])


def _put_value(t: torch.Tensor, value: torch.Tensor, version: int) -> None:
    """Write `value` into `t` and give it back its version counter.

    The user's graphs saved `t` at that version; with the counter restored,
    their backward still works after the sandbox changed and restored `t`.
    """
    with torch.no_grad():
        t.copy_(value)
    set_version(t, version)


# ---- the sandbox ----
class _Unavailable:
    """Stands in for an object that could not be copied; any use says so."""

    def __init__(self, name: str, why: str):
        object.__setattr__(self, "_message", f"`{name}` is {why}; a sandboxed re-run cannot use it without changing the real object")

    def _fail(self, *args, **kwargs):
        raise SandboxError(object.__getattribute__(self, "_message"))

    __getattr__ = __call__ = __iter__ = __next__ = __enter__ = __len__ = __getitem__ = __bool__ = _fail
    __setattr__ = _fail

    def __repr__(self) -> str:
        return "<unavailable in the sandbox>"


def _rebind(fn: types.FunctionType, ns: dict) -> types.FunctionType:
    """The same function reading its globals from the sandbox namespace."""
    new = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    new.__annotations__ = fn.__annotations__
    return new


class Sandbox:
    """`with Sandbox(shell, snapshot) as ns:` a namespace to run a variant in.

    On exit the RNG states, torch's global switches and every shared
    tensor's `.grad`, `requires_grad` and value are as they were on entry.
    """

    def __init__(self, shell, snapshot: Optional[Snapshot]):
        self.shell = shell
        self.snapshot = snapshot if snapshot is not None else take_snapshot(shell, None)
        self._saved_rng: Optional[RngState] = None
        self._saved_globals: Optional[tuple] = None
        self._saved_tensors: list[tuple] = []
        self.skipped: list[str] = []  # shell commands and magics this re-run did not run

    def __enter__(self) -> dict:
        snap, user_ns = self.snapshot, self.shell.user_ns
        missing = snap.missing(user_ns)
        if missing:  # the pre-run state is gone (changed in place, no copy): no faithful re-run
            raise SandboxError(snapshot_missing_line(missing, snap.budget))
        self._saved_rng, self._saved_globals = RngState.take(), _torch_globals()
        try:
            self._save_shared()
            ns = dict(user_ns)
            memo = {id(t): t for t in snap.shared.values()}
            ns.update(copy_with_grads(snap.frozen, memo, snap.frozen_leaves))
            for name, ref in snap.shared_refs.items():
                ns[name] = ref()  # the very tensor the real run read (missing() made sure it is alive)
            for name in snap.live:
                if name in user_ns:
                    ns[name] = copy_live(user_ns[name], memo, skip=snap.pre)
            _pre_run_grads(snap, memo)
            for name, why in snap.broken.items():
                ns[name] = _Unavailable(name, why)
            for name, value in list(ns.items()):
                if isinstance(value, types.FunctionType) and value.__globals__ is user_ns:
                    ns[name] = _rebind(value, ns)
            ns["get_ipython"] = quiet_get_ipython(self.shell, self.skipped)  # no shell command or magic runs again
            snap.rng.put()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return ns

    def _save_shared(self) -> None:
        """Remember the post-run state of shared tensors, then put their pre-run state in place."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, t in self.snapshot.shared.items():
                value = t.detach().clone() if t.is_leaf else None
                self._saved_tensors.append((t, readable_grad(t), t.requires_grad, version_of(t), value))
                before = self.snapshot.pre.get(key)
                if before is None:
                    continue
                if t.is_leaf or t.retains_grad:
                    t.grad = before.pre_grad()
                if before.leaf:
                    if before.value_kept and version_of(t) != before.version:
                        _put_value(t, before.value, before.version)
                    if t.requires_grad != before.requires_grad:
                        t.requires_grad_(before.requires_grad)

    def _restore_shared(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t, grad, requires_grad, version, value in self._saved_tensors:
                if t.is_leaf and t.requires_grad != requires_grad:
                    t.requires_grad_(requires_grad)
                if (t.is_leaf or t.retains_grad) and t.grad is not grad:
                    t.grad = grad
                if value is not None and version_of(t) != version:
                    _put_value(t, value, version)
        self._saved_tensors = []

    def __exit__(self, *exc) -> None:
        try:
            self._restore_shared()
        finally:
            if self._saved_globals is not None:
                _put_torch_globals(self._saved_globals)
            if self._saved_rng is not None:
                self._saved_rng.put()


def _pre_run_grads(snap: Snapshot, memo: dict) -> None:
    """Copies made from the present state (`live` names) get their tensors' pre-run `.grad` and requires_grad."""
    for key, state in snap.pre.items():
        if key in snap.shared:
            continue
        c = memo.get(key)
        if not isinstance(c, torch.Tensor) or c is state.tensor():
            continue
        if c.is_leaf and c.requires_grad != state.requires_grad:
            c.requires_grad_(state.requires_grad)
        if c.is_leaf:
            c.grad = state.pre_grad()


# ---- running a variant ----
def find_tensor(ns: dict, path: Optional[str]) -> Optional[torch.Tensor]:
    """`x`, or a module path like `model.0.weight`, in the sandbox namespace."""
    if not path:
        return None
    head, _, rest = path.partition(".")
    obj = ns.get(head)
    if rest and isinstance(obj, torch.nn.Module):
        try:
            return obj.get_parameter(rest)
        except AttributeError:
            try:
                return obj.get_buffer(rest)
            except AttributeError:
                return None
    return obj if isinstance(obj, torch.Tensor) and not rest else None


def _flip_external(ns: dict, records: list[Record], notes: list[str]) -> None:
    for r in records:
        t = find_tensor(ns, r.name)
        if t is None or not t.is_leaf:
            notes.append(f"could not flip requires_grad of {r.label}: it is not a leaf the cell can reach")
            continue
        t.requires_grad_(not t.requires_grad)
        notes.append(f"requires_grad of {r.label} flipped to {t.requires_grad}")


def set_external_value(ns: dict, snapshot: Snapshot, r: Record, value) -> tuple[torch.Tensor, str]:
    """Bind the name of an earlier cell's scalar input, in the sandbox only, to a new leaf holding `value`.

    The user's tensor is never written: the name is rebound in the sandbox's namespace.
    Returns (the new leaf, a line when the sandbox shares the old one with the real run:
    graphs earlier cells built from it keep its real value). Raises SandboxError when the
    name does not hold a leaf the cell can read.
    """
    name = r.name or ""
    old = ns.get(name) if name.isidentifier() else None
    if not isinstance(old, torch.Tensor) or not old.is_leaf:
        raise SandboxError(f"`{r.label}` cannot be set: it is not a tensor the cell reads by name")
    note = ""
    if any(t is old for t in snapshot.shared.values()):
        note = (f"`{r.label}` is your real tensor here (an earlier cell's graph reaches it): the re-run binds the name "
                "to the new value, tensors earlier cells computed from it keep the real one")
    ns[name] = new_leaf(value, old)
    return ns[name], note


def _set_external(ns: dict, snapshot: Snapshot, valued: list, notes: list[str]) -> None:
    for r, value in valued:
        try:
            _, note = set_external_value(ns, snapshot, r, value)
        except SandboxError as exc:
            notes.append(str(exc))
            continue
        if note:
            notes.append(note)


def _detach_notes(cut: list[Record]) -> list[str]:
    """What detaching by source span means for ops inside calls and in loops."""
    notes = []
    for r in cut:
        if r.internal and not r.external and r.span is not None:
            notes.append(f"{r.label} ran inside {r.internal}: the whole call on its line is detached")
        if r.span is not None and r.occurrence:
            notes.append(f"{r.label} ran in a loop: every run of that expression is detached")
    return notes


def _failed(original: Trace, error: TraceError, no_grad: bool, detached: list[str]) -> Trace:
    return Trace(
        source=original.source, error=error, grad_mode="no_grad" if no_grad else "enabled",
        detached=detached, first_line=original.first_line, variant_of=original,
    )


def _blocked(snapshot: Snapshot, first_line: int) -> Optional[TraceError]:
    """An error when the cell itself reads something the sandbox could not copy."""
    for name, line in sorted(snapshot.read.items(), key=lambda item: item[1]):
        if name in snapshot.broken:
            return TraceError(
                type="SandboxError",
                message=f"cannot re-run this cell in a sandbox: it reads `{name}`, {snapshot.broken[name]}. "
                "Re-running it would change the real object, so this variant was not run.",
                line=line + first_line - 1,
                expr=name,
            )
    return None


def _explain_freed_graph(trace: Trace, snapshot: Snapshot) -> None:
    err = trace.error
    if err is None or "backward through the graph a second time" not in err.message or not snapshot.shared_names:
        return
    names = ", ".join(snapshot.shared_names)
    err.message = (
        f"this cell uses {names}, computed in an earlier cell; the real run's backward() freed that graph, "
        "so a re-run cannot go backward through it again. Put the forward pass in the same cell as "
        f"backward() to use this toggle. (torch said: {err.message})"
    )


def run_variant(
    shell,
    source: str,
    original: Trace,
    snapshot: Optional[Snapshot],
    toggles: Toggles = Toggles(),
    *,
    detail_limit: int = limits.DETAIL_LIMIT,
    first_line: int = 2,
    probe=None,
) -> Trace:
    """Re-run `source` in a sandbox with `toggles`; the variant's Trace, never an exception.

    Record ids in `toggles` are those of `original`. `first_line` is the
    editor line of the body's first line (2 under a `%%autograd` line).
    `probe` (the explorer's) adds `probe.interventions`, and is called with
    `probe.before(ns)` before the cell runs and `probe.after(ns, trace)` while the
    sandbox is still open (to differentiate the re-run's graph).
    """
    names = list(toggles.detach_names)
    notes: list[str] = []
    try:
        interventions, cut, flip_outside = interventions_for(toggles, original.records)
        names += [r.name for r in cut if r.span is None and r.name]
        notes += _detach_notes(cut)
        if snapshot is None:
            snapshot = take_snapshot(shell, source)
            notes.append("no snapshot was taken before the real run: this variant starts from the state it left")
        notes += snapshot.notes
        blocked = _blocked(snapshot, first_line)
        if blocked is not None:
            failed = _failed(original, blocked, toggles.no_grad, names)
            failed.notes = notes
            return failed
        sandbox = Sandbox(shell, snapshot)
        with sandbox as ns:
            _flip_external(ns, flip_outside, notes)
            _set_external(ns, snapshot, external_values(toggles, original.records), notes)
            if probe is not None:
                probe.before(ns)
                interventions = interventions + list(probe.interventions)
            run = execute(
                shell, source, first_line=first_line, namespace=ns, interventions=interventions,
                display=False, capture=True, detail_limit=detail_limit,
            )
            if probe is not None:
                probe.after(ns, run.trace)
        trace = run.trace
        notes.append(skipped_line(sandbox.skipped, variant=True))
        hits = {"".join(h.split()) for h in trace.detached}  # names, and expressions without their spaces
        notes += [f"--detach {n}: nothing in the cell is named or written `{n}`, so nothing was detached for it"
                  for n in toggles.detach_names if "".join(n.split()) not in hits]
    except SandboxError as exc:  # the pre-run state is gone: said in one line
        return _failed(original, TraceError(type="SandboxError", message=str(exc)), toggles.no_grad, names)
    except Exception as exc:
        error = TraceError(type="SandboxError", message=f"the sandboxed re-run failed: {type(exc).__name__}: {exc}")
        return _failed(original, error, toggles.no_grad, names)
    trace.variant_of = original
    trace.grad_mode = "no_grad" if toggles.no_grad else "enabled"
    cut_here = [r for r in cut if r.span is not None]
    if not trace.detached and (names or cut_here):
        trace.detached = names + [r.expr or r.label for r in cut_here]
    trace.flipped = [r.label for r in original.records if r.id in set(toggles.flip_ids)]
    _explain_freed_graph(trace, snapshot)
    trace.notes.extend(n for n in notes if n not in trace.notes)
    return trace
