"""Choosing and publishing the view: widget, static snapshot, text.

A traced cell publishes two outputs: the widget (its text/plain empty)
and the snapshot (HTML with one scoped style sheet, and the text table) marked with the
widget's model id. Lab's widget renderer has no fallback when the widget's
model is missing (a reloaded notebook whose widget state was not saved): it
says "model not found" and shows nothing else of that output, so the snapshot
cannot live in the widget's own mimebundle. Where the widget draws, its front
end hides the snapshot next to it; elsewhere (GitHub, nbviewer, nbconvert, a
reloaded page) the snapshot shows.
"""

from __future__ import annotations

from typing import Optional

from ..data.trace import Trace
from ..render.snapshot import mimebundle
from .session import CellSession
from .widget import AutogradView, make_view

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
        view = make_view(session, variant=variant, graph=graph, layout_timeout=layout_timeout)
        if isinstance(view, AutogradView):
            # two outputs: the widget, then its snapshot. The widget goes out first, so the page
            # draws it while the snapshot (the whole static page) is still being built.
            display(view)
            display(view.snapshot())
        else:
            display(view)
        return
    display(mimebundle(trace, variant=variant, graph=graph, timeout=layout_timeout), raw=True)
