"""The static snapshot: one inline-styled HTML fragment with every section, and the mimebundle.

What GitHub, nbviewer, nbconvert and a page without a kernel show: the table,
the graph (inline SVG, or the DOT text when layout can't run in time), the
backward stepper, the why-explanations and the gradient check. No scripts.
"""

from __future__ import annotations

from typing import Optional

from ..data.trace import Trace
from .html import render_html, section
from .layout import svg_or_fallback_html
from .teach_html import teach_sections


def snapshot_html(trace: Trace, variant: Optional[Trace] = None, graph: bool = True, timeout: Optional[float] = None) -> str:
    """The static snapshot with every section: table, graph, stepper, why, gradient check."""
    sections = []
    if graph:
        try:
            # inline SVG, or the DOT text with a one-line hint when layout can't run in time
            sections.append(section("autograd graph", svg_or_fallback_html(variant or trace, timeout=timeout)))
        except Exception:  # the table still shows; the graph is a bonus here
            pass
    try:
        sections.extend(teach_sections(variant or trace))
    except Exception:  # the explanations are a bonus too; the table always shows
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
    """text/plain and text/html of a trace (and its variant), honouring include/exclude."""
    shown = variant or trace
    bundle = {"text/plain": str(shown), "text/html": snapshot_html(trace, variant=variant, graph=graph, timeout=timeout)}
    if include:
        bundle = {k: v for k, v in bundle.items() if k in include}
    if exclude:
        bundle = {k: v for k, v in bundle.items() if k not in exclude}
    return bundle
