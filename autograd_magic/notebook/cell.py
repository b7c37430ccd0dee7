"""What `%%autograd` does with a cell, once its options are parsed.

Run the cell for real under the recorder (the user's namespace, output and
errors are those of a plain run), make the variant the options ask for, run
the gradient check if asked, store the Trace for `-o`, show the view, and
finally re-raise the cell's own error with our frames trimmed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Optional

from ..run.execute import trim_traceback
from ..variants.interventions import Toggles
from .display import show
from .session import CellSession
from .. import limits

NO_TENSOR_NOTE = "%%autograd: no tensor operations ran in this cell, nothing to show."


@dataclass(frozen=True)
class CellOptions:
    output: Optional[str] = None  # -o NAME
    toggles: Toggles = Toggles()  # --no-grad, --detach
    check: bool = False
    mode: str = "widget"  # "widget", "static", "text" or "quiet"
    graph: bool = True
    detail_limit: int = limits.DETAIL_LIMIT
    layout_timeout: float = limits.LAYOUT_SECONDS
    auto: bool = False  # traced by `%autograd on`, not by a written `%%autograd` line
    copy_device: bool = False  # --copy-device: re-runs may copy tensors on a GPU (or another device)
    snapshot_bytes: int = limits.NOTEBOOK_SNAPSHOT_BYTES  # the notebook's one budget for re-run snapshots

    @property
    def rerunnable(self) -> bool:
        """A snapshot is taken only when something can re-run the cell: the widget, a variant, the check."""
        return self.mode == "widget" or self.toggles.any or self.check


def trace_cell(shell: Any, cell: str, options: CellOptions) -> None:
    __tracebackhide__ = True
    session, run = CellSession.run(
        shell, cell, detail_limit=options.detail_limit, rerunnable=options.rerunnable, first_line=1 if options.auto else 2,
        copy_device=options.copy_device, snapshot_bytes=options.snapshot_bytes,
    )
    trace = session.trace
    # a variant that can't run at all is said in the view's note (`rerun_blocked`), not raised
    variant = session.rerun(options.toggles) if options.toggles.any and not session.rerun_blocked else None
    if options.check and run.error is None:
        session.check()
    if options.output:
        shell.user_ns[options.output] = variant or trace
    if options.mode != "widget":
        session.close()  # nothing will re-run it: its snapshot goes now
    if options.mode == "quiet":
        pass
    elif not trace.records and not trace.passes and run.error is None:
        if not options.auto:  # a notebook traced throughout: cells without tensors show nothing
            _no_tensor_note()
    else:
        show(trace, variant=variant, mode=options.mode, graph=options.graph, session=session,
             layout_timeout=options.layout_timeout)
    if run.error is not None:
        trim_traceback(shell, run.error, run.filename)
        raise run.error


def _no_tensor_note() -> None:
    """A note, not an empty table; displayed, so the cell's own stdout stays its own."""
    from IPython.display import display

    display({"text/plain": NO_TENSOR_NOTE, "text/html": f"<p><em>{html.escape(NO_TENSOR_NOTE)}</em></p>"}, raw=True)
