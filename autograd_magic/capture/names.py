"""Names for tensors the traced code did not create: the user's namespace.

A tensor from an earlier cell is called by its variable name; a module's
parameter by its path (`model.0.weight`); a module by its path (`model.0`).
The index is built lazily, once per run, the first time a name is needed.
"""

from __future__ import annotations

import types
import weakref
from typing import Optional

import torch


def _remember(index: dict, t: torch.Tensor, name: str) -> None:
    # ids are reused once a tensor dies: keep a weak reference to check identity
    if id(t) not in index or index[id(t)][0]() is not t:
        try:
            index[id(t)] = (weakref.ref(t), name)
        except TypeError:
            pass


def _as_written(path: str) -> str:
    """`m._orig_mod.weight` as the cell writes it: `m.weight` (torch.compile's wrapper forwards its
    attributes to the module it wraps, which it lists as `_orig_mod`)."""
    return path.replace("._orig_mod.", ".").removesuffix("._orig_mod") if "_orig_mod" in path else path


def _lookup(index: dict, t: torch.Tensor) -> Optional[str]:
    hit = index.get(id(t))
    return hit[1] if hit is not None and hit[0]() is t else None


# Exact types no tensor or module can be (their `__class__` cannot be overridden): most of
# a namespace (functions, classes, modules, numbers) is told apart with no isinstance call.
_PLAIN_TYPES = frozenset({
    types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type,
    int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset,
})
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _kind(value) -> Optional[str]:
    """'tensor', 'module' or None: a value whose `__class__` raises (a lazy proxy) is neither."""
    cls = type(value)
    if cls in _PLAIN_TYPES:
        return None
    if cls in _TENSOR_TYPES:
        return "tensor"
    try:
        if isinstance(value, torch.Tensor):
            return "tensor"
        if isinstance(value, torch.nn.Module):
            return "module"
    except Exception:
        pass
    return None


_Module = torch.nn.Module
_LISTING = ("named_modules", "named_parameters", "named_buffers", "_named_members")
_lists_plainly: dict[type, bool] = {}  # module class -> it inherits nn.Module's listing methods


def _plain_listing(cls: type) -> bool:
    plain = _lists_plainly.get(cls)
    if plain is None:
        plain = _lists_plainly[cls] = all(getattr(cls, m, None) is getattr(_Module, m) for m in _LISTING)
    return plain


def _module_tree(root: torch.nn.Module, prefix: str) -> Optional[tuple[list, list, list]]:
    """What `root.named_modules(prefix=)`, `.named_parameters(prefix=)` and `.named_buffers(prefix=)`
    list, in their order and with their removal of duplicates, in one walk of the tree (the three
    generators walk it three times; this runs once per traced run). None when a module in the
    tree lists its members its own way: then its own methods are asked."""
    subs: list = []
    params: list = []
    buffers: list = []
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    seen_buffers: set[int] = set()
    stack = [(prefix, root)]
    while stack:
        path, m = stack.pop()
        if id(m) in seen_modules:
            continue
        if not _plain_listing(type(m)):
            return None
        seen_modules.add(id(m))
        subs.append((path, m))
        d, dot = m.__dict__, f"{path}." if path else ""  # torch's prefix rule
        for k, p in d["_parameters"].items():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                params.append((dot + k, p))
        for k, b in d["_buffers"].items():
            if b is not None and id(b) not in seen_buffers:
                seen_buffers.add(id(b))
                buffers.append((dot + k, b))
        children = d["_modules"]
        if children:
            stack.extend(reversed([(dot + k, c) for k, c in children.items() if c is not None]))
    return subs, params, buffers


class NameIndex:
    def __init__(self, namespace: Optional[dict]):
        self.namespace = namespace if namespace is not None else {}
        self._tensors: Optional[dict[int, str]] = None
        self._modules: Optional[dict[int, str]] = None
        self._unnamed: dict[int, str] = {}  # modules not in the namespace: survives rebuilds
        self._stale = True  # the namespace may hold names the index lacks
        self._roots: Optional[list] = None  # names holding a module, and the namespace then:
        self._roots_at: tuple = ()  # (its size, the sum of its values' ids)
        # which module each name held before the run: a name bound to a new one was built by it
        self._modules_before = {name: id(v) for name, v in list(self.namespace.items()) if _kind(v) == "module"}

    def built_here(self, path: str) -> Optional[str]:
        """The top-level name of `path` (`model` of `model.0.weight`) when the run bound it to a
        module it did not hold before, else None."""
        root = path.split(".", 1)[0]
        value = self.namespace.get(root)
        if "." in path and _kind(value) == "module" and self._modules_before.get(root) != id(value):
            return root
        return None

    def touch(self) -> None:
        """The traced code bound a name: the next failed lookup looks again."""
        self._stale = True

    def _build(self) -> None:
        tensors: dict[int, str] = {}
        modules: dict[int, str] = {}
        for name, value in list(self.namespace.items()):
            if not isinstance(name, str) or name.startswith("_"):  # globals()[1] = ... is legal
                continue
            kind = _kind(value)
            if kind == "tensor":
                _remember(tensors, value, name)
            elif kind == "module":
                try:
                    found = _module_tree(value, name)
                    if found is None:  # a module class that lists its members its own way
                        found = (value.named_modules(prefix=name), value.named_parameters(prefix=name),
                                 value.named_buffers(prefix=name))
                    subs, params, buffers = found
                    for path, sub in subs:
                        modules.setdefault(id(sub), _as_written(path))
                    for path, p in params:
                        _remember(tensors, p, _as_written(path))
                    for path, b in buffers:
                        _remember(tensors, b, _as_written(path))
                except Exception:
                    continue
        self._tensors, self._modules = tensors, modules
        self._built_size = len(self.namespace)
        self._stale = False

    def _module_roots(self) -> list:
        """The namespace's (name, module) pairs; the names are looked for again only once some
        name holds another value (each unnamed module's first op looks its path up)."""
        values = list(self.namespace.values())
        at = (len(values), sum(map(id, values)))  # C loops: any name bound to another value moves it
        if self._roots is None or at != self._roots_at:
            self._roots = [
                name for name, value in list(self.namespace.items())
                if isinstance(name, str) and not name.startswith("_") and _kind(value) == "module"
            ]
            self._roots_at = at
        get = self.namespace.get
        return [(name, get(name)) for name in self._roots]

    def _module_paths(self) -> dict[int, str]:
        """id(module) -> its path, for every module reachable from the namespace (as `_build`).
        The module trees are walked each time (`net.append(...)` binds no name)."""
        modules: dict[int, str] = {}
        for name, value in self._module_roots():
            try:
                for path, sub in value.named_modules(prefix=name):
                    modules.setdefault(id(sub), _as_written(path))
            except Exception:
                continue
        return modules

    def _changed(self) -> bool:
        return self._stale or len(self.namespace) != self._built_size

    def tensor_name(self, t: torch.Tensor) -> Optional[str]:
        if self._tensors is None:
            self._build()
        name = _lookup(self._tensors, t)
        if name is None and self._changed():
            # the traced code bound new names (e.g. built a model) since the last look
            self._build()
            name = _lookup(self._tensors, t)
        return name

    def module_name(self, m: torch.nn.Module) -> str:
        if self._modules is None:
            self._build()
        name = self._modules.get(id(m)) or self._unnamed.get(id(m))
        if name is None:
            # A module created by the traced code itself (`model = ...`, or
            # `net.append(...)`, which binds no name): look again, once per module.
            # Only the modules are walked again (not every parameter and buffer):
            # each op of a module the namespace does not hold comes here once per run.
            self._modules = self._module_paths()
            name = self._modules.get(id(m))
            if name is None:  # made inside a function: remember, don't search again
                name = self._unnamed[id(m)] = type(m).__name__
        return name

    def learn(self, t: torch.Tensor, name: str) -> None:
        if self._tensors is not None:
            _remember(self._tensors, t, name)

    def requires_grad_tensors(self, modules: bool = True) -> list[tuple[str, torch.Tensor]]:
        """Namespace tensors (and, with `modules`, modules' parameters) that take part in autograd."""
        if self._tensors is None:
            self._build()
        found = []
        for name, value in list(self.namespace.items()):
            if not isinstance(name, str) or name.startswith("_"):
                continue
            kind = _kind(value)
            if kind == "tensor" and value.requires_grad:
                found.append((name, value))
            elif kind == "module" and modules:
                try:
                    found.extend((_as_written(p), t) for p, t in value.named_parameters(prefix=name) if t.requires_grad)
                except Exception:
                    continue
        return found
