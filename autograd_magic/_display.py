"""Choosing and publishing the view: widget, static snapshot, text.

One mimebundle carries all three, so every front end shows the best it can:
JupyterLab/Notebook 7/VS Code/Colab the widget, GitHub/nbviewer/nbconvert the
inline-styled HTML snapshot, a terminal the text table.
"""

from __future__ import annotations

from typing import Optional

from ._records import Trace


def snapshot_html(trace: Trace, variant: Optional[Trace] = None, graph: bool = True, timeout: Optional[float] = None) -> str:
    """The static snapshot with every section: table, graph, stepper, why, gradient check."""
    from ._html import render_html, section

    sections = []
    if graph:
        try:
            from ._layout import svg_or_fallback_html

            # inline SVG, or the DOT text with a one-line hint when layout can't run in time
            sections.append(section("autograd graph", svg_or_fallback_html(variant or trace, timeout=timeout)))
        except Exception:  # the table still shows; the graph is a bonus here
            pass
    try:
        from ._teach_html import teach_sections

        sections.extend(teach_sections(variant or trace))
    except Exception:
        pass
    return render_html(trace, variant=variant, sections=[s for s in sections if s])


def mimebundle(
    trace: Trace,
    include=None,
    exclude=None,
    variant: Optional[Trace] = None,
    graph: bool = True,
    timeout: Optional[float] = None,
) -> dict:
    shown = variant or trace
    bundle = {"text/plain": str(shown), "text/html": snapshot_html(trace, variant=variant, graph=graph, timeout=timeout)}
    if include:
        bundle = {k: v for k, v in bundle.items() if k in include}
    if exclude:
        bundle = {k: v for k, v in bundle.items() if k not in exclude}
    return bundle


def show(
    trace: Trace,
    variant: Optional[Trace] = None,
    mode: str = "widget",
    graph: bool = True,
    shell=None,
    source=None,
    snapshot=None,
    detail_limit: int = 3,
    layout_timeout: float = 5.0,
) -> None:
    from IPython.display import display

    if mode == "text":
        print(str(variant or trace))
        return
    if mode == "widget" and shell is not None:
        try:
            from ._widget import make_view

            view = make_view(
                trace,
                variant=variant,
                shell=shell,
                source=source,
                snapshot=snapshot,
                graph=graph,
                detail_limit=detail_limit,
                layout_timeout=layout_timeout,
            )
        except ImportError:
            view = None
        if view is not None:
            display(view)
            return
    display(mimebundle(trace, variant=variant, graph=graph, timeout=layout_timeout), raw=True)
