"""Choosing and publishing the view: widget, static snapshot, text.

One mimebundle carries all three, so every front end shows the best it can:
JupyterLab/Notebook 7/VS Code/Colab the widget, GitHub/nbviewer/nbconvert the
inline-styled HTML snapshot, a terminal the text table.
"""

from __future__ import annotations

from typing import Optional

from ..data.trace import Trace
from ..render.snapshot import mimebundle
from .session import CellSession
from .widget import make_view

__all__ = ["show", "mimebundle"]


def show(
    trace: Trace,
    variant: Optional[Trace] = None,
    mode: str = "widget",
    graph: bool = True,
    session: Optional[CellSession] = None,
    layout_timeout: float = 5.0,
) -> None:
    """Display `trace` (and its variant): the widget when a cell's session backs it, else the snapshot."""
    from IPython.display import display

    if mode == "text":
        print(str(variant or trace))
        return
    if mode == "widget" and session is not None:
        display(make_view(session, variant=variant, graph=graph, layout_timeout=layout_timeout))
        return
    display(mimebundle(trace, variant=variant, graph=graph, timeout=layout_timeout), raw=True)
