"""`autograd_magic.trace()`: the engine without IPython, or inside a cell.

    import autograd_magic as am
    with am.trace() as t:
        y = 2 * x ** 4 + x ** 3
        y.backward()
    print(t)             # a text table of every intermediate
    t.records[0].expr    # 'x ** 4'

The block's own lines are the traced code; calls it makes are attributed to
the line that made them. Names come from the block's variables at its end.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from ..data.trace import Trace
from ..capture.source import SourceMap
from ..capture.torch_compat import set_grad_enabled
from ..capture.tracer import Tracer
from .. import limits


class trace:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Record every tensor op run inside the `with` block."""

    def __init__(self, detail_limit: int = limits.DETAIL_LIMIT, no_grad: bool = False):
        self.detail_limit = detail_limit
        self.no_grad = no_grad
        self._tracer: Optional[Tracer] = None
        self._frame = None
        self._grad_before = True

    def __enter__(self) -> Trace:
        frame = sys._getframe(1)
        code = frame.f_code
        namespace = {**frame.f_globals, **frame.f_locals}
        self._frame = frame
        self._tracer = Tracer(
            SourceMap(code.co_filename),
            anchor=lambda c: c is code,
            root=lambda c: c is code,
            namespace=namespace,
            detail_limit=self.detail_limit,
        )
        self._grad_before = torch.is_grad_enabled()
        try:
            if self.no_grad:
                set_grad_enabled(False)
            self._tracer.start()
        except BaseException:  # e.g. Ctrl-C while starting: __exit__ will not run
            set_grad_enabled(self._grad_before)
            raise
        return self._tracer.trace

    def __exit__(self, exc_type, exc, tb) -> bool:
        tracer, frame = self._tracer, self._frame
        self._frame = None
        tracer.final_namespace = _tensor_names(frame)
        try:
            trace = tracer.stop()
        finally:
            if self.no_grad:
                set_grad_enabled(self._grad_before)
        for rid, name in tracer.final_names().items():
            if trace.records[rid].name is None:
                trace.records[rid].name = name
        if exc is not None:
            from ..data.trace import TraceError

            line = None
            t = tb
            while t is not None:
                if t.tb_frame is frame:
                    line = t.tb_lineno
                t = t.tb_next
            trace.error = TraceError(type=exc_type.__name__, message=str(exc), line=line)
        return False  # never swallow the block's exception


def _tensor_names(frame) -> dict[int, str]:
    """id(tensor) -> variable name, for the block's variables at its end."""
    by_id: dict[int, str] = {}
    for name, value in {**frame.f_globals, **frame.f_locals}.items():
        if isinstance(name, str) and isinstance(value, torch.Tensor) and not name.startswith("_"):
            by_id.setdefault(id(value), name)
    return by_id
