"""What a variant needs, taken before the real run: copies of what the cell reads, RNG states.

`take_snapshot` finds the names a cell reads (its own text, and the globals
the user's functions it calls read, transitively), copies them (tensors
cloned with `.grad` and `requires_grad`, modules, containers) within a size
budget, and records the tensors that must be shared with the real run
instead: non-leaf tensors (their graph cannot be copied) and the leaves
their graph reaches, with their pre-run `.grad`.
"""

from __future__ import annotations

import ast
import copy
import random
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from ..capture.torch_compat import version_of
from .. import limits

BUDGET_BYTES = limits.SNAPSHOT_BYTES
_SCAN_NODES = limits.SNAPSHOT_SCAN
_GRAPH_NODES = limits.SNAPSHOT_GRAPH
_CONTAINERS = (dict, list, tuple, set, frozenset)
_SHELL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "_ih", "_oh", "_dh", "_", "__", "___"}
_ATOMIC = (
    types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, int, float, complex, str, bytes,
    bool, type(None), range, torch.dtype, torch.device,
)  # shared as they are: immutable, or (functions) rebound to the sandbox later

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
    bound: set[str] = set()  # names the cell itself has surely bound by now: reading them reads the cell's value
    for stmt in tree.body:
        for node in ast.walk(stmt):
            target = None
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
                target = node
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                target = node.target  # `x += 1` reads x first
            if target is not None and target.id not in bound:
                line = getattr(target, "lineno", 1)
                found[target.id] = min(line, found.get(target.id, line))
        bound = (bound | _surely_binds(stmt)) - _unbinds(stmt)
    return found


def _surely_binds(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement always binds when it completes (conditional and loop bindings excluded).

    A cell that re-runs `loss = f(x); loss.backward()` reads its own `loss`, not the
    one the previous run left; counting that as a read would share the old graph
    (and every parameter it reaches) with the sandbox.
    """
    names: set[str] = set()
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
        targets = [stmt.target]
    elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names if a.name != "*"}
    else:
        return names
    stack = list(targets)
    while stack:
        t = stack.pop()
        if isinstance(t, ast.Name):
            names.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            stack.extend(t.elts)
        elif isinstance(t, ast.Starred):
            stack.append(t.value)
    return names


def _unbinds(stmt: ast.stmt) -> set[str]:
    return {t.id for t in stmt.targets if isinstance(t, ast.Name)} if isinstance(stmt, ast.Delete) else set()


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _classes_of(obj: Any) -> set[type]:
    if isinstance(obj, type):
        return {obj}
    if isinstance(obj, torch.nn.Module):
        try:
            return {type(m) for m in obj.modules()}  # a user's layer inside nn.Sequential
        except Exception:
            pass
    return {type(obj)}


def _functions_of(obj: Any, user_ns: dict) -> list[tuple[types.FunctionType, bool]]:
    """The user's functions behind `obj`, each with True when it is a method of a notebook class.

    Functions are rebound to the sandbox; methods are not (the class is
    shared), so what a method reads comes from the real namespace.
    """
    if isinstance(obj, types.FunctionType):
        return [(obj, False)] if obj.__globals__ is user_ns else []
    found = []
    main = user_ns.get("__name__", "__main__")
    for cls in _classes_of(obj):
        for klass in getattr(cls, "__mro__", ()):
            if getattr(klass, "__module__", None) != main:
                continue
            for member in vars(klass).values():
                fn = getattr(member, "__func__", None) or getattr(member, "fget", None) or member
                if isinstance(fn, types.FunctionType) and fn.__globals__ is user_ns:
                    found.append((fn, True))
    return found


def _all_names_read(shell, source: Optional[str], user_ns: dict) -> tuple[dict[str, int], set[str], set[str]]:
    """(names the text reads, names read in the sandbox, names read from the real namespace).

    The text and the user's functions (rebound to the sandbox) read the
    sandbox; methods of classes defined in the notebook, and whatever they
    call, read the real namespace.
    """
    direct = names_read(shell, source)
    if source is None:
        keys = {k for k in user_ns if isinstance(k, str) and not k.startswith("_")}
        return {}, keys - _SHELL_NAMES, set()
    sandboxed: set[str] = set()
    real: set[str] = set()
    todo = [(n, False) for n in direct if n in user_ns]
    while todo:
        name, is_real = todo.pop()
        bucket = real if is_real else sandboxed
        if name in bucket:
            continue
        bucket.add(name)
        for fn, is_method in _functions_of(user_ns[name], user_ns):
            todo.extend((n, is_real or is_method) for n in _code_names(fn.__code__) if n in user_ns)
    return direct, sandboxed - _SHELL_NAMES, real - _SHELL_NAMES


# ---- what's inside a value ----
class _Inventory:
    """The tensors (and arrays) inside values: leaves to copy, non-leaves to share, bytes."""

    def __init__(self) -> None:
        self.leaves: dict[int, torch.Tensor] = {}
        self.nonleaves: dict[int, torch.Tensor] = {}
        self.seen: set[int] = set()

    def scan(self, obj: Any) -> tuple[int, bool]:
        """(bytes a copy of `obj` would take, whether the whole object was walked)."""
        nbytes, stack, visited = 0, [(obj, 0)], 0
        while stack:
            if visited >= _SCAN_NODES:
                return nbytes, False
            value, depth = stack.pop()
            if id(value) in self.seen or isinstance(value, _ATOMIC):
                continue
            self.seen.add(id(value))
            visited += 1
            if isinstance(value, torch.Tensor):
                nbytes += self._tensor(value)
                continue
            nbytes += int(getattr(value, "nbytes", 0) or 0) if type(value).__name__ == "ndarray" else 0
            if isinstance(value, _CONTAINERS) and len(value) > _SCAN_NODES:
                return nbytes, False  # too many items to walk before every cell: copy it later
            if depth < 6:
                try:
                    children = _children(value)
                except Exception:  # an object that resists inspection: copy it, hope for the best
                    continue
                stack.extend((v, depth + 1) for v in children)
        return nbytes, True

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


def readable_grad(t: torch.Tensor) -> Optional[torch.Tensor]:
    if not (t.is_leaf or t.retains_grad):
        return None  # reading a non-leaf's .grad only warns
    return t.grad


def copy_with_grads(obj: Any, memo: dict, leaves: Iterable[torch.Tensor]) -> Any:
    """deepcopy, then give copied Parameters the `.grad` Parameter.__deepcopy__ drops."""
    result = copy.deepcopy(obj, memo)
    for t in leaves:
        c = memo.get(id(t))
        if isinstance(c, torch.Tensor) and c is not t and t.grad is not None and c.grad is None:
            c.grad = t.grad.detach().clone()
    return result


def copy_live(obj: Any, memo: dict) -> Any:
    """A copy of an object as it is now (too large to keep a copy of before the run)."""
    inv = _Inventory()
    inv.scan(obj)
    return copy_with_grads(obj, memo, list(inv.leaves.values()))


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
    # pre-run (version, value, requires_grad) of shared leaves, to undo the real run's in-place changes
    shared_leaves: dict[int, tuple] = field(default_factory=dict)
    shared_names: list[str] = field(default_factory=list)  # names of shared non-leaf tensors
    notes: list[str] = field(default_factory=list)
    nbytes: int = 0


def _function_state(fn: types.FunctionType) -> list:
    """What a user function holds besides its globals: defaults and closure cells."""
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return [fn.__defaults__, fn.__kwdefaults__, cells]


def _share(snap: Snapshot, tensors: Iterable[torch.Tensor]) -> None:
    """Tensors the sandbox uses as they are (non-leaves, what their graphs reach, function defaults)."""
    for t in tensors:
        snap.shared[id(t)] = t
        if t.grad_fn is not None:
            for leaf in graph_leaves(t):
                snap.shared[id(leaf)] = leaf


def take_snapshot(shell, source: Optional[str], budget: int = BUDGET_BYTES) -> Snapshot:
    """Copy what `source` will read, and the RNG states, before the real run.

    `source=None` copies every variable (used when no snapshot was taken).
    Never called on anything but the shell's namespace; it only reads it.
    """
    user_ns = shell.user_ns
    direct, names, real = _all_names_read(shell, source, user_ns)
    snap = Snapshot(rng=RngState.take(), read={n: l for n, l in direct.items() if n in user_ns})
    inv, held = _Inventory(), _Inventory()
    sizes: dict[str, int] = {}
    for name in sorted(real):  # read by methods from the real namespace: shared, restored afterwards
        held.scan(user_ns[name])
    for name in sorted(names - real):
        obj = user_ns.get(name)
        for fn, _ in _functions_of(obj, user_ns) if isinstance(obj, types.FunctionType) else ():
            held.scan(_function_state(fn))
        if isinstance(obj, _ATOMIC):
            continue
        before = len(inv.nonleaves)
        size, complete = inv.scan(obj)
        sizes[name] = size if complete else budget + 1  # too big to walk: too big to copy up front
        if len(inv.nonleaves) > before:
            snap.shared_names.append(name)
    _share(snap, list(inv.nonleaves.values()) + list(held.leaves.values()) + list(held.nonleaves.values()))
    for t in snap.shared.values():
        g = readable_grad(t)
        snap.shared_grads[id(t)] = g.detach().clone() if g is not None else None
        if t.is_leaf:
            snap.shared_leaves[id(t)] = (version_of(t), t.detach().clone(), t.requires_grad)
            snap.nbytes += t.numel() * t.element_size()
    _freeze(snap, user_ns, sizes, [t for t in inv.leaves.values() if id(t) not in snap.shared], budget)
    return snap


def _freeze(snap: Snapshot, user_ns: dict, sizes: dict[str, int], leaves: list, budget: int) -> None:
    """Copy each name within the budget; one memo keeps shared objects shared between names."""
    memo = {id(t): t for t in snap.shared.values()}
    for name, size in sizes.items():
        if snap.nbytes + size > budget:
            snap.live.append(name)
            snap.notes.append(
                f"{name} is too large to copy before every run"
                + (f" ({size / 2**20:.0f} MB)" if size <= budget else "")
                + ": variants start from the state the real run left it in"
            )
            continue
        try:
            snap.frozen[name] = copy_with_grads(user_ns[name], memo, leaves)
            snap.nbytes += size
        except Exception as exc:
            kind = type(user_ns[name]).__name__
            snap.broken[name] = f"a {kind}, which cannot be copied ({type(exc).__name__}: {exc})"
    snap.frozen_leaves = [memo[id(t)] for t in leaves if id(t) in memo]
