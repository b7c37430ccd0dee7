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
import weakref
from dataclasses import dataclass, field
from typing import Any, Container, Iterable, Optional

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


def copy_with_grads(obj: Any, memo: dict, leaves: Iterable[torch.Tensor], skip: Container = ()) -> Any:
    """deepcopy, then give copied Parameters the `.grad` Parameter.__deepcopy__ drops (not those in `skip`)."""
    result = copy.deepcopy(obj, memo)
    for t in leaves:
        if id(t) in skip:
            continue
        c = memo.get(id(t))
        if isinstance(c, torch.Tensor) and c is not t and t.grad is not None and c.grad is None:
            c.grad = t.grad.detach().clone()
    return result


def copy_live(obj: Any, memo: dict, skip: Container = ()) -> Any:
    """A copy of an object as it is now (too large to keep a copy of before the run); the leaves
    in `skip` get their `.grad` afterwards (their pre-run one), not a copy of the present one."""
    inv = _Inventory()
    inv.scan(obj)
    return copy_with_grads(obj, memo, list(inv.leaves.values()), skip)


# ---- the snapshot ----
def tensor_bytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def on_device(t: torch.Tensor) -> bool:
    """A tensor whose copy would take device memory (anything but the CPU): copied only on opt-in."""
    return t.device.type != "cpu"


class Allowance:
    """Bytes one snapshot may still take; `reserve(n)` says whether `n` more fit (and takes them).

    The notebook's registry (`notebook/session.py`) passes its own, which makes room by
    releasing older cells' snapshots; alone, a snapshot has `budget` to itself.
    """

    def __init__(self, budget: int = BUDGET_BYTES) -> None:
        self.budget = budget
        self.left = budget

    def reserve(self, nbytes: int) -> bool:
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


@dataclass
class PreRun:
    """A tensor's state before the real run, kept with as few copies as the budget allows.

    A value or `.grad` that was not copied is still the pre-run one as long as its version
    counter is unchanged (nothing wrote into it) and, for `.grad`, it is the same tensor:
    a variant then copies it when it runs (transiently). One the real run changed in place
    (an optimizer step, a gradient accumulated into an existing `.grad`) needed its copy.
    """

    ref: Any  # weakref to the tensor
    version: Optional[int]
    requires_grad: bool
    leaf: bool
    value: Optional[torch.Tensor] = None  # a copy of the pre-run value (shared leaves only), else None
    value_kept: bool = False  # True when `value` is that copy
    had_grad: bool = False
    grad: Optional[torch.Tensor] = None  # a copy of the pre-run .grad, when it fitted
    grad_ref: Any = None  # else a weakref to the pre-run .grad itself
    grad_version: Optional[int] = None
    nbytes: int = 0  # the tensor's own bytes
    grad_nbytes: int = 0
    device: str = "cpu"

    def tensor(self) -> Optional[torch.Tensor]:
        return self.ref()

    def lost(self) -> list[str]:
        """What of the pre-run state is gone: "values", "gradients" (empty when a variant can start from it)."""
        t, lost = self.ref(), []
        if t is None:
            return lost  # gone: nothing reads it any more
        if self.leaf and not self.value_kept and version_of(t) != self.version:
            lost.append("values")
        if self.had_grad and self.grad is None:
            g = self.grad_ref() if self.grad_ref is not None else None
            if g is None or version_of(g) != self.grad_version:
                lost.append("gradients")
        return lost

    def pre_grad(self) -> Optional[torch.Tensor]:
        """A fresh copy of the pre-run `.grad` (None when it had none); call only when `lost()` is empty."""
        if not self.had_grad:
            return None
        g = self.grad if self.grad is not None else self.grad_ref()
        return g.detach().clone()


def _weak(t: torch.Tensor):
    return weakref.ref(t)


def pre_run_state(t: torch.Tensor, allowance: Allowance, copy_device: bool, copy_value: bool) -> PreRun:
    """Record `t`'s pre-run state, copying its value (`copy_value`) and `.grad` only where the budget allows."""
    g = readable_grad(t)
    state = PreRun(
        ref=_weak(t), version=version_of(t), requires_grad=t.requires_grad, leaf=t.is_leaf,
        had_grad=g is not None, nbytes=tensor_bytes(t), grad_nbytes=tensor_bytes(g), device=str(t.device),
    )
    copyable = copy_device or not on_device(t)
    if copy_value and t.is_leaf and copyable and allowance.reserve(state.nbytes):
        state.value, state.value_kept = t.detach().clone(), True
    if g is not None:
        if copyable and allowance.reserve(state.grad_nbytes):
            state.grad = g.detach().clone()
        else:
            state.grad_ref, state.grad_version = _weak(g), version_of(g)
    return state


@dataclass
class Snapshot:
    """What a variant needs to start from the state the real run started from."""

    rng: RngState
    read: dict[str, int]  # names the cell's text reads -> first line reading it
    frozen: dict[str, Any] = field(default_factory=dict)  # pre-run copies
    frozen_leaves: list = field(default_factory=list)  # leaf tensors inside `frozen`
    live: list[str] = field(default_factory=list)  # not copied up front: copied from the present state
    broken: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be copied
    # shared with the real run, held weakly: a snapshot never keeps a tensor (or its graph) alive
    shared: "weakref.WeakValueDictionary[int, torch.Tensor]" = field(default_factory=weakref.WeakValueDictionary)
    # pre-run state of shared tensors and of the leaves inside `live` names (their copies get it)
    pre: dict[int, PreRun] = field(default_factory=dict)
    live_objects: dict[str, Any] = field(default_factory=dict)  # live name -> weakref to its pre-run object
    shared_refs: dict[str, Any] = field(default_factory=dict)  # name bound to a shared tensor -> weakref to it
    shared_names: list[str] = field(default_factory=list)  # names of shared non-leaf tensors
    device: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (a device, bytes on devices)
    copy_device: bool = False
    notes: list[str] = field(default_factory=list)
    nbytes: int = 0  # bytes the snapshot's copies hold
    budget: int = BUDGET_BYTES

    def missing(self, user_ns: dict) -> list[tuple[str, str, int]]:
        """Why a variant cannot start from the pre-run state now: (what, kind, bytes) with kind
        "values", "gradients", "replaced" (a live name bound to another object) or "device"."""
        found: dict[tuple[str, str], int] = {}
        if not self.copy_device:
            for name, (dev, nbytes) in self.device.items():
                found[(name, "device:" + dev)] = nbytes
        for name, ref in self.live_objects.items():
            if ref is not None and ref() is not user_ns.get(name, _GONE):
                found[(name, "replaced")] = 0
        for name, ref in self.shared_refs.items():
            if ref() is None:  # rebound, and the tensor the cell read is gone
                found[(name, "replaced")] = 0
        owners = None
        for key, state in self.pre.items():
            for kind in state.lost():
                if owners is None:
                    owners = _owners(user_ns, self)
                what = owners.get(key, "tensors its graph reaches")
                found[(what, kind)] = found.get((what, kind), 0) + (state.nbytes if kind == "values" else state.grad_nbytes)
        return [(what, kind, n) for (what, kind), n in found.items()]


_GONE = object()


def _owners(user_ns: dict, snap: "Snapshot") -> dict[int, str]:
    """id of a tensor -> the name it is reached by in the namespace (`m`, `x`), for messages."""
    owners: dict[int, str] = {}
    for name, obj in list(user_ns.items()):
        if not isinstance(name, str) or name.startswith("_"):
            continue
        if isinstance(obj, torch.Tensor):
            owners.setdefault(id(obj), name)
        elif isinstance(obj, torch.nn.Module):
            try:
                for t in list(obj.parameters()) + list(obj.buffers()):
                    owners.setdefault(id(t), name)
            except Exception:
                pass
    return owners


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


def _watchable(obj: Any) -> bool:
    """A live object whose whole state is in tensors with version counters: variants from it are exact."""
    return isinstance(obj, (torch.Tensor, torch.nn.Module))


def take_snapshot(
    shell, source: Optional[str], budget: int = BUDGET_BYTES, *, allowance: Optional[Allowance] = None,
    copy_device: bool = False,
) -> Snapshot:
    """Copy what `source` will read, and the RNG states, before the real run.

    Copies take at most `budget` bytes (or what `allowance` grants: the notebook's one budget);
    what doesn't fit is recorded by version counter (`PreRun`), and tensors on a device other
    than the CPU are never copied unless `copy_device`. `source=None` copies every variable
    (used when no snapshot was taken). Never called on anything but the shell's namespace; it
    only reads it.
    """
    allowance = allowance if allowance is not None else Allowance(budget)
    user_ns = shell.user_ns
    direct, names, real = _all_names_read(shell, source, user_ns)
    snap = Snapshot(
        rng=RngState.take(), read={n: l for n, l in direct.items() if n in user_ns}, copy_device=copy_device,
        budget=allowance.budget,
    )
    inv, held = _Inventory(), _Inventory()
    sizes: dict[str, int] = {}
    leaves_of: dict[str, list[torch.Tensor]] = {}
    complete_of: dict[str, bool] = {}
    for name in sorted(real):  # read by methods from the real namespace: shared, restored afterwards
        held.scan(user_ns[name])
    for name in sorted(names - real):
        obj = user_ns.get(name)
        for fn, _ in _functions_of(obj, user_ns) if isinstance(obj, types.FunctionType) else ():
            held.scan(_function_state(fn))
        if isinstance(obj, _ATOMIC):
            continue
        before, first_leaf = len(inv.nonleaves), len(inv.leaves)
        size, complete = inv.scan(obj)
        leaves_of[name] = list(inv.leaves.values())[first_leaf:]
        complete_of[name] = complete
        sizes[name] = size if complete else allowance.budget + 1  # too big to walk: too big to copy up front
        if len(inv.nonleaves) > before:
            snap.shared_names.append(name)
    _share(snap, list(inv.nonleaves.values()) + list(held.leaves.values()) + list(held.nonleaves.values()))
    for key, t in snap.shared.items():
        snap.pre[key] = state = pre_run_state(t, allowance, copy_device, copy_value=True)
        snap.nbytes += tensor_bytes(state.value) + tensor_bytes(state.grad)
        if on_device(t):
            _note_device(snap, "tensors its graph reaches", t)
    leaves = [t for t in inv.leaves.values() if id(t) not in snap.shared]
    for name, found in leaves_of.items():
        for t in found:
            if on_device(t) and id(t) not in snap.shared:
                _note_device(snap, name, t)
    _freeze(snap, user_ns, sizes, leaves, allowance, leaves_of, complete_of)
    return snap


def _note_device(snap: Snapshot, name: str, t: torch.Tensor) -> None:
    dev, nbytes = snap.device.get(name, (str(t.device), 0))
    snap.device[name] = (dev, nbytes + tensor_bytes(t) + tensor_bytes(readable_grad(t)))


def _freeze(
    snap: Snapshot, user_ns: dict, sizes: dict[str, int], leaves: list, allowance: Allowance,
    leaves_of: dict[str, list], complete_of: dict[str, bool],
) -> None:
    """Copy each name within the budget; one memo keeps shared objects shared between names.

    A name that doesn't fit (or holds device tensors, without opt-in) is live: a variant copies it
    from the present state. When it is a tensor or a module, its leaves' pre-run state is
    recorded (`PreRun`), so that copy is exact while nothing changed them in place."""
    memo = {id(t): t for t in snap.shared.values()}
    for name, size in sizes.items():
        obj = user_ns[name]
        if isinstance(obj, torch.Tensor) and id(obj) in snap.shared:
            # the tensor itself, no copy: kept alive (a cell may rebind the name it reads, `z = z.mean()`)
            # when its bytes fit the budget, else held weakly (a variant needs it still alive)
            nbytes = tensor_bytes(obj)
            if allowance.reserve(nbytes):
                snap.frozen[name] = obj
                snap.nbytes += nbytes
            else:
                snap.shared_refs[name] = weakref.ref(obj)
            continue
        on_dev = name in snap.device and not snap.copy_device
        if on_dev or not allowance.reserve(size):
            snap.live.append(name)
            if complete_of.get(name) and _watchable(obj):
                try:
                    snap.live_objects[name] = weakref.ref(obj)
                except TypeError:
                    snap.live_objects[name] = None
                for t in leaves_of.get(name, ()):
                    if id(t) not in snap.pre:
                        snap.pre[id(t)] = pre_run_state(t, Allowance(0), False, copy_value=False)
            elif not on_dev:
                snap.notes.append(
                    f"{name} is too large to copy before every run"
                    + (f" ({size / 2**20:.0f} MB)" if size <= allowance.budget else "")
                    + ": variants start from the state the real run left it in"
                )
            continue
        try:
            snap.frozen[name] = copy_with_grads(obj, memo, leaves)
            snap.nbytes += size
        except Exception as exc:
            kind = type(obj).__name__
            snap.broken[name] = f"a {kind}, which cannot be copied ({type(exc).__name__}: {exc})"
    snap.frozen_leaves = [memo[id(t)] for t in leaves if id(t) in memo]
