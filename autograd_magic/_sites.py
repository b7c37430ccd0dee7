"""Where an op came from: the traced code's line and column span, and what ran between.

The walk goes up the Python stack from the op to the first frame of the
traced code (the "anchor": a cell's code, or the block of `with trace()`).
Frames of torch's dispatch and of this package only route the call; any
other frame in between means the op ran inside a call (a function, a
module's forward), so the record is attributed to the call site and marked
`internal`.
"""

from __future__ import annotations

import os
import sys
from types import CodeType
from typing import Callable, Optional

import torch

from ._source import SourceMap

# Files whose frames only route a call to its __torch_function__; an op seen
# from them is not "inside" anything of interest.
_DISPATCH_FILES = tuple(
    f"torch{sep}{name}"
    for sep in ("/", "\\")
    for name in ("overrides.py", "_tensor.py", "autograd" + sep + "__init__.py", "utils" + sep + "_contextlib.py")
)
_OUR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# what a frame's code is to the site walk
_ANCHOR, _ROUTING, _OTHER, _MODULE_CALL, _ANCHOR_FORWARD = 0, 1, 2, 3, 4
_CALL_IMPL = torch.nn.Module._call_impl.__code__  # its frame's `self` is the module being called


def _frame_self(frame) -> Optional[torch.nn.Module]:
    # f_locals builds a dict of the frame's locals (~0.6 us): once per op at most.
    try:
        m = frame.f_locals.get("self")
    except Exception:
        return None
    return m if isinstance(m, torch.nn.Module) else None


class SiteFinder:
    def __init__(self, source_map: SourceMap, anchor: Callable[[CodeType], bool]):
        self.source_map = source_map
        self.anchor = anchor
        self._kinds: dict[int, tuple] = {}  # id(code) -> (code, kind)

    def find(self, func_name: str):
        """(span, internal, key, module) of the current op.

        `key` tells loop iterations of one op apart from different ops run
        inside the same call (a module's internals share the span of the line
        that called it, but not the inner instruction nor the module).
        `module` is the innermost nn.Module being called, read from its
        `_call_impl` frame: module hooks would do it too, but any global
        module hook sends every module call down torch's slow path.
        """
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
                entry = kinds[id(code)] = (code, self._code_kind(code))
            kind = entry[1]
            if kind == _ANCHOR or kind == _ANCHOR_FORWARD:
                if kind == _ANCHOR_FORWARD and module is None:  # a module defined in the traced code
                    module = _frame_self(f)
                span = self.source_map.span(f)
                return span, internal, (span if inner is None else (span, inner, id(module))), module
            if kind >= _OTHER:
                if internal is None and code.co_name != func_name:
                    internal = getattr(code, "co_qualname", code.co_name)
                    inner = (id(code), f.f_lasti)  # code kept alive by `kinds`
                if kind == _MODULE_CALL and module is None:
                    module = _frame_self(f)
            f = f.f_back
        return None, internal or "outside the traced code", None, module

    def _code_kind(self, code) -> int:
        """Classified once per code object: the frame walk runs for every op."""
        if self.anchor(code):
            forward = code.co_name == "forward" and code.co_argcount > 0 and code.co_varnames[0] == "self"
            return _ANCHOR_FORWARD if forward else _ANCHOR
        if code is _CALL_IMPL:
            return _MODULE_CALL
        if code.co_filename.startswith(_OUR_DIR) or code.co_filename.endswith(_DISPATCH_FILES):
            return _ROUTING
        return _OTHER
