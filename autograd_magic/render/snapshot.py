"""The static snapshot: one HTML fragment with every section, and the mimebundle.

What GitHub, nbviewer, nbconvert and a page without a kernel show: the table,
the graph (inline SVG, or the DOT text when layout can't run in time), the
first backward steps, the explanations that matter and the gradient check.
No scripts.

A traced cell writes this into the notebook file, so it is a summary bounded in
bytes whatever the model (`limits.SNAPSHOT_*`): each part has its budget (see
html.py and teach_html.py), the graph is redrawn with fewer nodes when its SVG
is too large, and if the whole still exceeds `SNAPSHOT_HTML_BYTES` the last
sections give way, each to one line saying the live widget has it. Only what is
shown is built.
"""

from __future__ import annotations

import html as _html
import re
from typing import Optional

from .. import limits
from ..data.explore import TOO_BIG
from ..data.trace import Trace
from .debug import flow_section, training_section, with_banner
from .dot import render_dot
from .explore import at_point, explore_html
from .html import render_html, section
from .layout import layout, prefetch
from .teach_html import teach_parts

LEFT_OUT = "Left out of this snapshot to keep the notebook small ({size} KB); the live widget shows it."


def snapshot_html(
    trace: Trace, variant: Optional[Trace] = None, graph: bool = True, timeout: Optional[float] = None,
    dots: Optional["GraphDots"] = None,
) -> str:
    """The static snapshot: table, graph, first backward steps, why, gradient check, within its byte budget.

    `dots`: the graph's DOT from `prefetch_graph` (its layout started earlier)."""
    shown = variant or trace
    parts: list[tuple[str, str, bool]] = []  # (title, body, open), in the order shown; the graph goes first
    folded = False  # whether the gradient-flow section folds earlier passes (they give way first)
    try:  # issue 16: loss and total gradient norm per backward call (only for two calls or more)
        chart = training_section(shown)
        if chart is not None:
            parts.append(("training loop", _flow_html(*chart), True))
    except Exception:  # a bonus like the graph
        pass
    try:  # issue 16: the parameters' gradient norms, the last pass drawn (nothing without parameters)
        flow = flow_section(shown)
        if flow is not None:
            parts.append(("gradient flow", _flow_body(flow), True))
            folded = bool(flow[2])
    except Exception:  # a bonus like the graph
        pass
    try:
        body = explore_section(trace, variant)
        if body:
            parts.append(("explore", body, True))
    except Exception:  # the explorer is a bonus as well: a drawing that fails leaves the rest
        pass
    try:
        parts.extend(teach_parts(shown))
    except Exception:  # the explanations are a bonus too; the table always shows
        pass
    base = render_html(trace, variant=variant)  # the sections go last, just inside its closing tag
    try:
        base = with_banner(base, shown)  # the first NaN/Inf, at the top (nothing when all is finite)
    except Exception:
        pass
    if graph:  # built last: a layout started early (`prefetch_graph`) has had the longest to run
        try:
            body = graph_html(shown, timeout=timeout, dots=dots)
            if body:
                parts.insert(0, ("autograd graph", body, True))
        except Exception:  # the table still shows; the graph is a bonus here
            pass
    sections = [section(t, b, o) for t, b, o in parts]
    if folded and len(base) + sum(len(s) for s in sections) > limits.SNAPSHOT_HTML_BYTES:
        try:  # past the budget, the gradient flow's earlier passes give way first: the last one stays
            i = next(i for i, part in enumerate(parts) if part[0] == "gradient flow")
            parts[i] = ("gradient flow", _flow_body(flow_section(shown, earlier_bytes=0)), True)
            sections[i] = section(*parts[i])
        except Exception:
            pass
    # past the budget, the last sections give way first: the why, the steps, then the graph
    for i in range(len(sections) - 1, -1, -1):
        if len(base) + sum(len(s) for s in sections) <= limits.SNAPSHOT_HTML_BYTES:
            break
        title, body, _ = parts[i]
        note = _html.escape(LEFT_OUT.format(size=max(1, len(body) // 1000)))
        sections[i] = section(title, f"<i>{note}</i>", open=False)
    assert base.endswith("</div>")
    return base[: -len("</div>")] + "".join(sections) + "</div>"


def explore_section(trace: Trace, variant: Optional[Trace] = None) -> str:
    """The explorer at the values of the run shown (a variant's point on the real run's curves),
    each curve an image of its SVG (as the graph is, so Lab's sanitizer keeps it); "" when empty."""
    real = getattr(trace, "exploration", None)
    shown = getattr(variant, "exploration", None) if variant is not None else None
    if real is None:
        exploration = shown
    else:
        exploration = at_point(real, shown, variant=variant is not None)
    if exploration is None or not _worth_a_section(exploration):
        return ""
    return explore_html(exploration, picture=_curve_image)


def _worth_a_section(exploration) -> bool:
    """A curve with points or a Jacobian (computed, or said why not). An explorer that could only say
    why it can't re-run repeats the view's own line about toggles, and a Jacobian too big to compute
    (a model's weights) says only that: the widget says them, the snapshot does not spend bytes on them."""
    j = exploration.jacobian
    return any(c.xs for c in exploration.curves) or (j is not None and (bool(j.rows) or not j.note.startswith(TOO_BIG)))


def _curve_image(svg: str) -> str:
    return f'<img src="{svg_data_uri(svg)}" alt="the output plotted against the input" style="max-width:100%;height:auto">'


class GraphDots:
    """The snapshot graph's DOT for one run: the whole graph's, and the smaller drawing's when asked."""

    def __init__(self, shown: Trace) -> None:
        self.shown = shown
        self.dot = render_dot(shown)
        self._small: Optional[str] = None

    @property
    def small(self) -> str:
        if self._small is None:
            self._small = render_dot(self.shown, max_nodes=limits.SNAPSHOT_GRAPH_SMALL)
        return self._small


# A graph's compacted SVG takes about 2 to 2.6 characters per character of its DOT: past this
# much DOT the smaller drawing is likely needed too, and its layout is started with the first.
_LIKELY_TOO_BIG = limits.SNAPSHOT_GRAPH_BYTES // 2


def prefetch_graph(shown: Trace, timeout: Optional[float] = None) -> GraphDots:
    """The snapshot graph's DOT, its layout started now in the layout worker (render/layout.py),
    so that Graphviz works while the view and the rest of the snapshot are built; `graph_html`
    given these `dots` reads the answer. The SVG is the same either way."""
    dots = GraphDots(shown)
    try:
        if prefetch(dots.dot, timeout) and len(dots.dot) > _LIKELY_TOO_BIG:
            prefetch(dots.small, timeout)
    except Exception:  # only a head start: graph_html lays it out as ever
        pass
    return dots


def graph_html(shown: Trace, timeout: Optional[float] = None, dots: Optional[GraphDots] = None) -> str:
    """The graph for the snapshot: the widget's drawing when its SVG fits the budget, else a
    smaller one (fewer nodes, the rest folded), else the DOT text cut short; "" when none fits."""
    if dots is None or dots.shown is not shown:
        dots = GraphDots(shown)
    dot = dots.dot
    result = layout(dot, timeout)
    if result.svg is not None:
        svg = compact_svg(result.svg)
        if len(svg) > limits.SNAPSHOT_GRAPH_BYTES:
            small = layout(dots.small, timeout)
            if small.svg is None:
                return _dot_html(dot, small.hint)
            svg = compact_svg(small.svg)
            if len(svg) > limits.SNAPSHOT_GRAPH_SMALL_BYTES:
                return f"<i>{_html.escape(LEFT_OUT.format(size=len(svg) // 1000))}</i>"
            note = (
                f"A smaller drawing: at most {limits.SNAPSHOT_GRAPH_SMALL} nodes, the rest folded; "
                "the live widget draws the whole graph."
            )
            return f'<div style="color:#57606a;font-size:11px">{_html.escape(note)}</div>' + _svg_box(svg)
        return _svg_box(svg)
    return _dot_html(dot, result.hint)


_DOUBLE_QUOTED = re.compile(r'="([^"\']*)"')


def svg_data_uri(svg: str) -> str:
    """`svg` as a `data:image/svg+xml,` URI, ready for a double-quoted attribute.

    Only what a data URI and the attribute need is escaped (`%`, `#`, `"`, `&`), and
    attribute values are re-quoted with `'`, so the drawing grows by a few percent only."""
    body = _DOUBLE_QUOTED.sub(r"='\1'", svg)
    body = body.replace("%", "%25").replace("#", "%23").replace('"', "%22").replace("\n", "%0A")
    return "data:image/svg+xml," + body.replace("&", "&amp;")


def _svg_box(svg: str) -> str:
    # an image, not inline SVG: JupyterLab's sanitizer (an untrusted, shared notebook) drops
    # inline <svg> and leaves its texts run together, but keeps a data: image; an image also
    # runs nothing, whatever the drawing says
    return (
        '<div class="am-graph" style="overflow:auto;max-width:100%">'
        f'<img src="{svg_data_uri(svg)}" alt="the autograd graph" style="max-width:100%;height:auto"></div>'
    )


def _flow_body(flow: tuple) -> str:
    """The last pass drawn; the ones before it (the widget's pass buttons) folded beneath it."""
    svg, summary, earlier = flow
    return _flow_html(svg, summary) + "".join(section(label, _flow_html(s, text), open=False) for label, s, text in earlier)


def _flow_html(svg: str, summary: str) -> str:
    # an image, like the graph (see _svg_box); its text said once more below it, readable anywhere
    return (
        f'<img src="{svg_data_uri(svg)}" alt="{_html.escape(summary.splitlines()[0])}" style="max-width:100%;height:auto">'
        f'<div style="color:#57606a;font-size:11px;white-space:pre-wrap">{_html.escape(summary)}</div>'
    )


def _dot_html(dot: str, hint: Optional[str]) -> str:
    cut = len(dot) > limits.SNAPSHOT_DOT_CHARS
    text = dot[: limits.SNAPSHOT_DOT_CHARS] + ("\n… (cut short; the live widget has the whole graph)" if cut else "")
    return (
        '<div class="am-graph am-graph-fallback">'
        f'<p style="margin:0 0 4px 0;color:#8a6d3b">{_html.escape(hint or "")}</p>'
        '<pre style="max-height:24em;overflow:auto;font-size:11px;white-space:pre">'
        f"{_html.escape(text)}</pre></div>"
    )


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_BETWEEN = re.compile(r">\s+<")
_TITLE = re.compile(r"<title>[^<]*</title>")
_ID = re.compile(r' id="(?:graph|node|edge|clust)\d+"')
_GEOMETRY = re.compile(r' (points|d|x|y)="([^"]*)"')
_NUMBER = re.compile(r"-?\d+\.\d+")
_CLASS = re.compile(r'(<g) class="[^"]*"')
_SIZE = re.compile(r' font-size="(\d+)\.00"')
# what every <text> of Graphviz's says: said once on the <svg> instead (SVG inherits them)
_HOISTED = (' xml:space="preserve"', ' text-anchor="start"', ' font-family="Helvetica,sans-Serif"')


def _round(m: "re.Match") -> str:  # a point is 1/72 inch: whole points draw the same graph
    value = _NUMBER.sub(lambda n: "%d" % round(float(n.group())), m.group(2))
    return f' {m.group(1)}="{value}"'


def compact_svg(svg: str) -> str:
    """Graphviz's SVG drawn the same in fewer bytes: no comments, tooltips (`<title>`), ids or
    blank space between tags; coordinates to whole points; the attributes every text repeats said
    once on the root (inherited). Only attribute values Graphviz wrote are touched."""
    svg = _BETWEEN.sub("><", _COMMENT.sub("", svg)).strip()
    svg = _ID.sub("", _TITLE.sub("", svg))
    svg = _CLASS.sub(r"\1", svg).replace(' stroke="none"', "")  # classes serve the widget; none is SVG's default
    svg = _GEOMETRY.sub(_round, svg)
    svg = _SIZE.sub(r' font-size="\1"', svg)
    svg = svg.replace(' fill="#000000"', "").replace("scale(1 1) rotate(0) ", "")  # SVG's defaults
    svg = svg.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "") if "xlink:" not in svg else svg
    if svg.count("<g>") == svg.count("</g>") - 1:  # the bare groups of nodes and edges, not the root
        svg = svg.replace("<g>", "")
        last = svg.rfind("</g>")
        svg = svg[:last].replace("</g>", "") + svg[last:]
    hoisted = [a for a in _HOISTED if svg.count(a) > 1]
    for a in hoisted:
        svg = svg.replace(a, "")
    if hoisted and svg.startswith("<svg "):
        svg = "<svg" + "".join(hoisted) + svg[4:]
    return svg


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
