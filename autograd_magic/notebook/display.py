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
from ..render.debug import one_look
from ..render.snapshot import mimebundle, prefetch_graph
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

    if mode == "text":  # the real run, then the variant against it, as the other views show them
        print(str(trace) + (f"\n\n{variant}" if variant is not None else ""))
        return
    if mode == "widget" and session is not None:
        with one_look():  # the view, the text and the snapshot read the same trace: its analyses are made once
            _show_widget(trace, variant, graph, session, layout_timeout)
        return
    with one_look():
        bundle = mimebundle(trace, variant=variant, graph=graph, timeout=layout_timeout)
    display(bundle, raw=True)


def _show_widget(trace: Trace, variant: Optional[Trace], graph: bool, session: CellSession, layout_timeout: float) -> None:
    from IPython.display import display

    # the snapshot's graph layout starts first: Graphviz (another process) works while the view is built
    try:
        dots = prefetch_graph(variant or trace, layout_timeout) if graph else None
    except Exception:  # the snapshot draws its graph (or says why not) as ever
        dots = None
    view = make_view(session, variant=variant, graph=graph, layout_timeout=layout_timeout)
    if isinstance(view, AutogradView):
        view.snapshot_dots = dots
        # two outputs: the widget, then its snapshot. The widget goes out first, so the page
        # draws it while the snapshot (the whole static page) is still being built.
        display(view)
        display(view.snapshot())
    else:
        display(view)
