"""Where an op came from: the traced code's line and column span, and what ran between.

The walk goes up the Python stack from the op to the first frame of the
traced code (the "anchor": a cell's code, or the block of `with trace()`).
Frames of torch's dispatch and of this package only route the call; any
other frame in between means the op ran inside a call (a function, a
module's forward), so the record is attributed to the call site and marked
`internal`.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from types import CodeType
from typing import Callable, Optional

import torch

from .source import SourceMap

try:  # optional (setup.py): where it is not built, `find` is the Python walk
    from ._walk import Walker as _Walker
except ImportError:
    _Walker = None

# Files whose frames only route a call to its __torch_function__; an op seen
# from them is not "inside" anything of interest.
_DISPATCH_FILES = tuple(
    f"torch{sep}{name}"
    for sep in ("/", "\\")
    for name in ("overrides.py", "_tensor.py", "autograd" + sep + "__init__.py", "utils" + sep + "_contextlib.py")
)
# the package root: frames of any of its modules only route the call
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_OUR_DIR = PACKAGE_DIR
# What a frame's code is to the site walk. Anchors are the traced code's own
# frames: the root (a cell's top level, the block of `with trace()`), or a
# function or method it defines (a `forward` among them).
_ROUTING, _OTHER, _MODULE_CALL, _ANCHOR, _ANCHOR_FORWARD, _ANCHOR_ROOT = 0, 1, 2, 3, 4, 5
_CALL_IMPL = torch.nn.Module._call_impl.__code__  # its frame's `self` is the module being called


def _frame_self(frame) -> Optional[torch.nn.Module]:
    # f_locals builds a dict of the frame's locals (~0.6 us): once per op at most.
    try:
        m = frame.f_locals.get("self")
    except Exception:
        return None
    return m if isinstance(m, torch.nn.Module) else None


def _not_optimized(code: CodeType) -> bool:
    # a cell's top-level code; functions (and methods) it defines are optimized
    return not code.co_flags & inspect.CO_OPTIMIZED


class SiteFinder:
    """`find()` for each op; `module_name` names the nn.Module an op ran in."""

    def __init__(
        self,
        source_map: SourceMap,
        anchor: Callable[[CodeType], bool],
        module_name: Callable[[torch.nn.Module], str],
        root: Callable[[CodeType], bool] = _not_optimized,
    ):
        self.source_map = source_map
        self.anchor = anchor
        self.root = root
        self.module_name = module_name
        self._kinds: dict[int, tuple] = {}  # id(code) -> (code, kind)
        # code -> kind, for a code object seen the first time (a partial, not a bound method: see below)
        self._classify = classify = functools.partial(_code_kind, anchor=anchor, root=root)
        if _Walker is not None:
            # The compiled walk (capture/_walk.c): the same answer as `_find_py`, without the
            # interpreter's cost per frame. Its callbacks hold nothing that holds this finder: no cycle.
            kinds = self._kinds
            walker = _Walker(kinds, classify, getattr(source_map, "_positions", {}), source_map.span, torch.nn.Module,
                             module_name, functools.partial(_enclosing_module, kinds=kinds, classify=classify))
            self.find = walker.find

    def _find_py(self, func_name: str, f=None):
        """(span, internal, key, module) of the current op: the op the frame `f` (default: the
        caller's) handles. `find` is this where the compiled walk is not built.

        `key` tells loop iterations of one op apart from different ops that
        share a span: a module's internals share the span of the line that
        called it, but not the inner instruction or the module's name (two
        layers of a Sequential; a module rebuilt each iteration of a loop is
        the same name each time, so it counts as a loop). `module` is the name
        of the innermost nn.Module being called, read from its `_call_impl`
        frame: module hooks would do it too, but any global module hook sends
        every module call down torch's slow path.
        """
        if f is None:
            f = sys._getframe(1)
        internal = None
        inner = None
        module = None
        kinds = self._kinds
        while f is not None:
            code = f.f_code
            # By id: hashing a code object costs ~0.6 us, and this loop runs
            # per frame per op. The value holds the code, so no id is reused.
            entry = kinds.get(id(code))
            if entry is None:
                entry = kinds[id(code)] = (code, self._classify(code))
            kind = entry[1]
            if kind >= _ANCHOR:
                if module is None and kind != _ANCHOR_ROOT:  # in a function or module the traced code defines
                    module = _frame_self(f) if kind == _ANCHOR_FORWARD else _enclosing_module(f.f_back, kinds, self._classify)
                span = self.source_map.span(f)
                name = self.module_name(module) if module is not None else None
                if inner is None:
                    return span, internal, (span if name is None else (span, None, name)), name
                return span, internal, (span, inner, name), name
            if kind != _ROUTING:
                if internal is None and code.co_name != func_name:
                    internal = getattr(code, "co_qualname", code.co_name)
                    inner = (id(code), f.f_lasti)  # code kept alive by `kinds`
                if kind == _MODULE_CALL and module is None:
                    module = _frame_self(f)
            f = f.f_back
        name = self.module_name(module) if module is not None else None
        return None, internal or "outside the traced code", None, name

    find = _find_py  # replaced per instance by the compiled walk where it is built


def _enclosing_module(f, kinds: dict, classify) -> Optional[torch.nn.Module]:
    """The module whose call runs this frame, up to the traced code's root."""
    while f is not None:
        code = f.f_code
        entry = kinds.get(id(code))
        if entry is None:
            entry = kinds[id(code)] = (code, classify(code))
        kind = entry[1]
        if kind == _MODULE_CALL or kind == _ANCHOR_FORWARD:
            return _frame_self(f)
        if kind == _ANCHOR_ROOT:
            return None
        f = f.f_back
    return None


_HANDLERS = frozenset({"__torch_function__", "__torch_dispatch__"})


def _code_kind(code, anchor: Callable[[CodeType], bool], root: Callable[[CodeType], bool]) -> int:
    """Classified once per code object: the frame walk runs for every op."""
    if code.co_name in _HANDLERS:
        # a user's mode or tensor subclass handling the call routes it, like torch's dispatch does:
        # the op is the traced line's (`y = (x * 3).exp()` inside `with MyMode():`), not the handler's
        return _ROUTING
    if anchor(code):
        if root(code):
            return _ANCHOR_ROOT
        forward = code.co_name == "forward" and code.co_argcount > 0 and code.co_varnames[0] == "self"
        return _ANCHOR_FORWARD if forward else _ANCHOR
    if code is _CALL_IMPL:
        return _MODULE_CALL
    if code.co_filename.startswith(_OUR_DIR) or code.co_filename.endswith(_DISPATCH_FILES):
        return _ROUTING
    return _OTHER
