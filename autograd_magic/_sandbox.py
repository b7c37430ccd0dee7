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
graph reaches. Their `.grad`, `requires_grad` and value are put back when the
sandbox closes.
"""

from __future__ import annotations

import ast
import copy
import random
import re
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from ._execute import execute
from ._records import Record, Trace, TraceError

BUDGET_BYTES = 64 * 2**20  # copies kept per snapshot; larger objects are copied from the post-run state
_SCAN_NODES = 20000  # objects visited when looking for tensors inside one value
_GRAPH_NODES = 20000  # autograd nodes walked to find the leaves a shared tensor's graph reaches
_SHELL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "_ih", "_oh", "_dh", "_", "__", "___"}
_ATOMIC = (
    types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, int, float, complex, str, bytes,
    bool, type(None), range, torch.dtype, torch.device,
)  # shared as they are: immutable, or (functions) rebound to the sandbox later


class SandboxError(Exception):
    """A variant cannot run faithfully (an object it reads cannot be copied)."""


# ---- RNG and global torch state ----
@dataclass
class RngState:
    torch: Any
    numpy: Any
    python: Any

    @classmethod
    def take(cls) -> "RngState":
        np = sys.modules.get("numpy")
        return cls(torch.get_rng_state(), np.random.get_state() if np is not None else None, random.getstate())

    def put(self) -> None:
        torch.set_rng_state(self.torch)
        np = sys.modules.get("numpy")
        if np is not None and self.numpy is not None:
            np.random.set_state(self.numpy)
        random.setstate(self.python)


def _torch_globals() -> tuple:
    return (torch.is_grad_enabled(), torch.get_default_dtype(), torch.is_anomaly_enabled())


def _put_torch_globals(state: tuple) -> None:
    torch.set_grad_enabled(state[0])
    torch.set_default_dtype(state[1])
    torch.set_anomaly_enabled(state[2])


# ---- what a cell reads ----
def names_read(shell, source: Optional[str]) -> dict[str, int]:
    """Names the cell's text reads -> the first line (1-based in `source`) that reads it."""
    if source is None:
        return {}
    try:
        tree = ast.parse(shell.transform_cell(source) if shell is not None else source)
    except Exception:  # the real run reports the syntax error; guess from the words
        return {m.group(0): 1 for m in re.finditer(r"[A-Za-z_]\w*", source)}
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        target = None
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
            target = node
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            target = node.target  # `x += 1` reads x first
        if target is not None:
            line = getattr(target, "lineno", 1)
            found[target.id] = min(line, found.get(target.id, line))
    return found


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _functions_of(obj: Any, user_ns: dict) -> list[types.FunctionType]:
    """The user's functions behind `obj`: itself, or the methods of a class defined in the notebook."""
    if isinstance(obj, types.FunctionType):
        return [obj] if obj.__globals__ is user_ns else []
    cls = obj if isinstance(obj, type) else type(obj)
    found = []
    for klass in getattr(cls, "__mro__", ()):
        if getattr(klass, "__module__", None) != user_ns.get("__name__", "__main__"):
            continue
        for member in vars(klass).values():
            fn = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
            if isinstance(fn, types.FunctionType) and fn.__globals__ is user_ns:
                found.append(fn)
    return found


def _all_names_read(shell, source: Optional[str], user_ns: dict) -> tuple[dict[str, int], set[str]]:
    """(names the text reads, every namespace name read, transitively through the user's functions)."""
    direct = names_read(shell, source)
    if source is None:
        keys = {k for k in user_ns if isinstance(k, str) and not k.startswith("_")}
        return {}, keys - _SHELL_NAMES
    todo = [n for n in direct if n in user_ns]
    seen = set(todo)
    while todo:
        for fn in _functions_of(user_ns[todo.pop()], user_ns):
            for n in _code_names(fn.__code__):
                if n in user_ns and n not in seen:
                    seen.add(n)
                    todo.append(n)
    return direct, seen - _SHELL_NAMES


# ---- what's inside a value ----
class _Inventory:
    """The tensors (and arrays) inside values: leaves to copy, non-leaves to share, bytes."""

    def __init__(self) -> None:
        self.leaves: dict[int, torch.Tensor] = {}
        self.nonleaves: dict[int, torch.Tensor] = {}
        self.seen: set[int] = set()

    def scan(self, obj: Any) -> int:
        """Bytes a copy of `obj` would take (new tensors and arrays only)."""
        nbytes, stack, visited = 0, [(obj, 0)], 0
        while stack and visited < _SCAN_NODES:
            value, depth = stack.pop()
            if id(value) in self.seen or isinstance(value, _ATOMIC):
                continue
            self.seen.add(id(value))
            visited += 1
            if isinstance(value, torch.Tensor):
                nbytes += self._tensor(value)
                continue
            nbytes += int(getattr(value, "nbytes", 0) or 0) if type(value).__name__ == "ndarray" else 0
            if depth < 6:
                stack.extend((v, depth + 1) for v in _children(value))
        return nbytes

    def _tensor(self, t: torch.Tensor) -> int:
        if t.grad_fn is not None:
            self.nonleaves[id(t)] = t
            return 0
        self.leaves[id(t)] = t
        size = t.numel() * t.element_size()
        g = t.grad
        return size + (g.numel() * g.element_size() if g is not None else 0)


def _children(value: Any) -> list:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, torch.optim.Optimizer):
        return [list(value.state.values()), value.param_groups]
    d = getattr(value, "__dict__", None)
    return list(d.values()) if isinstance(d, dict) else []


def graph_leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors whose `.grad` a backward from `t` would accumulate into."""
    stack, seen, leaves = [t.grad_fn], set(), []
    while stack and len(seen) < _GRAPH_NODES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(var, torch.Tensor):
            leaves.append(var)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return leaves


def _grad_of(t: torch.Tensor) -> Optional[torch.Tensor]:
    if not (t.is_leaf or t.retains_grad):
        return None  # reading a non-leaf's .grad only warns
    return t.grad


def _copy(obj: Any, memo: dict, leaves: Iterable[torch.Tensor]) -> Any:
    """deepcopy, then give copied Parameters the `.grad` Parameter.__deepcopy__ drops."""
    result = copy.deepcopy(obj, memo)
    for t in leaves:
        c = memo.get(id(t))
        if isinstance(c, torch.Tensor) and c is not t and t.grad is not None and c.grad is None:
            c.grad = t.grad.detach().clone()
    return result


# ---- the snapshot ----
@dataclass
class Snapshot:
    """What a variant needs to start from the state the real run started from."""

    rng: RngState
    read: dict[str, int]  # names the cell's text reads -> first line reading it
    frozen: dict[str, Any] = field(default_factory=dict)  # pre-run copies
    frozen_leaves: list = field(default_factory=list)  # leaf tensors inside `frozen`
    live: list[str] = field(default_factory=list)  # too large: copied from the post-run state
    broken: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be copied
    shared: dict[int, torch.Tensor] = field(default_factory=dict)  # shared with the real run
    shared_grads: dict[int, Optional[torch.Tensor]] = field(default_factory=dict)  # their pre-run .grad
    shared_names: list[str] = field(default_factory=list)  # names of shared non-leaf tensors
    notes: list[str] = field(default_factory=list)
    nbytes: int = 0


def take_snapshot(shell, source: Optional[str], budget: int = BUDGET_BYTES) -> Snapshot:
    """Copy what `source` will read, and the RNG states, before the real run."""
    user_ns = shell.user_ns
    direct, names = _all_names_read(shell, source, user_ns)
    snap = Snapshot(rng=RngState.take(), read={n: l for n, l in direct.items() if n in user_ns})
    inv = _Inventory()
    sizes = {}
    for name in sorted(names):
        obj = user_ns.get(name)
        if not isinstance(obj, _ATOMIC):
            sizes[name] = inv.scan(obj)
    for t in inv.nonleaves.values():
        snap.shared[id(t)] = t
        for leaf in graph_leaves(t):
            snap.shared[id(leaf)] = leaf
    for t in snap.shared.values():
        g = _grad_of(t)
        snap.shared_grads[id(t)] = g.detach().clone() if g is not None else None
    snap.shared_names = sorted(n for n in sizes if isinstance(user_ns[n], torch.Tensor) and id(user_ns[n]) in inv.nonleaves)
    memo = {id(t): t for t in snap.shared.values()}
    copied = [t for t in inv.leaves.values() if id(t) not in snap.shared]
    for name, size in sizes.items():
        if snap.nbytes + size > budget:
            snap.live.append(name)
            snap.notes.append(
                f"{name} is too large to copy before every run ({size / 2**20:.0f} MB): "
                "variants start from the state the real run left it in"
            )
            continue
        try:
            snap.frozen[name] = _copy(user_ns[name], memo, copied)
            snap.nbytes += size
        except Exception as exc:
            snap.broken[name] = f"a {type(user_ns[name]).__name__}, which cannot be copied ({type(exc).__name__}: {exc})"
    snap.frozen_leaves = [memo[id(t)] for t in copied if id(t) in memo]
    return snap


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

    def __enter__(self) -> dict:
        snap, user_ns = self.snapshot, self.shell.user_ns
        self._saved_rng, self._saved_globals = RngState.take(), _torch_globals()
        self._save_shared()
        try:
            ns = dict(user_ns)
            memo = {id(t): t for t in snap.shared.values()}
            ns.update(_copy(snap.frozen, memo, snap.frozen_leaves))
            for name in snap.live:
                if name in user_ns:
                    ns[name] = copy.deepcopy(user_ns[name], memo)
            for name, why in snap.broken.items():
                ns[name] = _Unavailable(name, why)
            for name, value in list(ns.items()):
                if isinstance(value, types.FunctionType) and value.__globals__ is user_ns:
                    ns[name] = _rebind(value, ns)
            snap.rng.put()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return ns

    def _save_shared(self) -> None:
        """Remember the post-run state of shared tensors, then put their pre-run `.grad` in place."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, t in self.snapshot.shared.items():
                value = t.detach().clone() if t.is_leaf else None
                self._saved_tensors.append((t, _grad_of(t), t.requires_grad, t._version, value))
                pre = self.snapshot.shared_grads.get(key)
                if t.is_leaf or t.retains_grad:
                    t.grad = pre.clone() if pre is not None else None

    def _restore_shared(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t, grad, requires_grad, version, value in self._saved_tensors:
                if t.is_leaf and t.requires_grad != requires_grad:
                    t.requires_grad_(requires_grad)
                if (t.is_leaf or t.retains_grad) and t.grad is not grad:
                    t.grad = grad
                if value is not None and t._version != version:
                    with torch.no_grad():
                        t.copy_(value)
                    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
                    if setter is not None:  # saved-tensor checks in the user's graphs stay valid
                        try:
                            setter((t,), (version,))
                        except TypeError:
                            setter(t, version)
        self._saved_tensors = []

    def __exit__(self, *exc) -> None:
        try:
            self._restore_shared()
        finally:
            if self._saved_globals is not None:
                _put_torch_globals(self._saved_globals)
            if self._saved_rng is not None:
                self._saved_rng.put()


# ---- running a variant ----
def _find_tensor(ns: dict, path: Optional[str]) -> Optional[torch.Tensor]:
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


def _flip_hook(targets: list[Record]):
    """An output_hook flipping requires_grad of the leaves the cell itself creates."""
    keys = {(r.span, r.occurrence, r.output_index) for r in targets}

    def hook(record: Record, t: torch.Tensor):
        if (record.span, record.occurrence, record.output_index) not in keys:
            return None
        if t.is_leaf:
            t.requires_grad_(not t.requires_grad)  # same object: the tracer keeps following it
            out = t
        else:
            out = t.detach().requires_grad_(not t.requires_grad)
        record.requires_grad, record.is_leaf, record.grad_fn = out.requires_grad, True, None
        return out

    return hook


def _flip_external(ns: dict, records: list[Record], notes: list[str]) -> None:
    for r in records:
        t = _find_tensor(ns, r.name)
        if t is None or not t.is_leaf:
            notes.append(f"could not flip requires_grad of {r.label}: it is not a leaf the cell can reach")
            continue
        t.requires_grad_(not t.requires_grad)
        notes.append(f"requires_grad of {r.label} flipped to {t.requires_grad}")


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
    *,
    no_grad: bool = False,
    detach: Iterable[str] = (),
    detach_records: Iterable[int] = (),
    flip_requires_grad: Iterable[int] = (),
    detail_limit: int = 3,
    first_line: int = 2,
) -> Trace:
    """Re-run `source` in a sandbox with toggles; the variant's Trace, never an exception.

    `detach` are names or expression texts, `detach_records` and
    `flip_requires_grad` record ids of `original`. `first_line` is the editor
    line of the body's first line (2 under a `%%autograd` line).
    """
    names = list(detach)
    notes: list[str] = []
    try:
        recs = original.records
        cut = [recs[i] for i in detach_records if 0 <= i < len(recs)]
        spans = [r.span for r in cut if r.span is not None]
        names += [r.name for r in cut if r.span is None and r.name]
        flips = [recs[i] for i in flip_requires_grad if 0 <= i < len(recs)]
        made_here = [r for r in flips if r.span is not None and not r.external]
        if snapshot is None:
            snapshot = take_snapshot(shell, source)
            notes.append("no snapshot was taken before the real run: this variant starts from the state it left")
        notes += snapshot.notes
        blocked = _blocked(snapshot, first_line)
        if blocked is not None:
            return _failed(original, blocked, no_grad, names)
        with Sandbox(shell, snapshot) as ns:
            _flip_external(ns, [r for r in flips if r not in made_here], notes)
            run = execute(
                shell, source, first_line=first_line, namespace=ns, no_grad=no_grad, detach=names,
                detach_spans=spans, display=False, capture=True, detail_limit=detail_limit,
                output_hook=_flip_hook(made_here) if made_here else None, sandbox=True,
            )
        trace = run.trace
    except Exception as exc:
        error = TraceError(type="SandboxError", message=f"the sandboxed re-run failed: {type(exc).__name__}: {exc}")
        return _failed(original, error, no_grad, names)
    trace.variant_of = original
    trace.grad_mode = "no_grad" if no_grad else "enabled"
    if not trace.detached and (names or spans):
        trace.detached = names + [r.expr or r.label for r in cut if r.span is not None]
    _explain_freed_graph(trace, snapshot)
    trace.notes.extend(n for n in notes if n not in trace.notes)
    return trace
