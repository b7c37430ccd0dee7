"""The debugging views of a training cell (issue 16): the NaN/Inf banner, the gradient-flow chart
and the training-loop chart (loss and total gradient norm per backward call).

Pure functions of a Trace (through `explain/debug.py`): the banner's HTML for the static
snapshot, its plain data for the widget, one line for the text view, and the chart as a
compact SVG with no scripts and no styles (presentation attributes only, so the widget's
allowlist sanitizer keeps all of it). Nothing shows when every recorded value and gradient
is finite and no module parameter received a gradient: a classroom cell looks as before.
"""

from __future__ import annotations

import html
import math
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from ..data.debug import IterationScalars, PassFlow
from ..data.trace import Trace
from ..explain.debug import (
    EXPLODING, VANISHING, backward_nonfinite, backward_sentence, first_nonfinite_iteration, flow_summary, grad_flow,
    iteration_sentence, nonfinite_origin, number, operand_sentences, origin_sentence, training, training_summary,
)
from .. import limits

RED_BOX = "background:#ffebe9;color:#82071e;padding:4px 8px;margin:6px 0;border-radius:4px;white-space:pre-wrap"
MUTED = "color:#57606a;font-size:11px"
ROW_MARK = "background:#ffebe9"  # the origin's row in the table
COLORS = {None: "#4c78a8", "vanishing": "#bf8700", "exploding": "#cf222e"}


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


# ---- one look per cell ------------------------------------------------------------------------

_SCOPE: Optional[dict] = None


@contextmanager
def one_look() -> Iterator[None]:
    """Within it, each analysis below is worked out once per trace: the widget's payload, the text
    view and the snapshot of one cell all read the same finished trace (display.show)."""
    global _SCOPE
    outer = _SCOPE
    if outer is None:
        _SCOPE = {}
    try:
        yield
    finally:
        if outer is None:
            _SCOPE = None


def _once(fn: Callable, obj: Any) -> Any:
    if _SCOPE is None:
        return fn(obj)
    hit = _SCOPE.get((fn, id(obj)))
    if hit is None or hit[0] is not obj:  # the object is kept with it: its id can't be reused meanwhile
        hit = _SCOPE[(fn, id(obj))] = (obj, fn(obj))
    return hit[1]


# ---- the banner -------------------------------------------------------------------------------


def anchor(trace: Trace, rid: int) -> str:
    """The id given to record `rid`'s row in the snapshot: unique per cell on one page."""
    return f"agm-nf-{zlib.crc32(trace.source.encode('utf-8', 'replace')):08x}-{rid}"


def text_lines(trace: Trace) -> list[str]:
    """What the text view says first: the forward origin and each pass's first non-finite node."""
    lines = []
    nf = _once(nonfinite_origin, trace)
    if nf is not None:
        lines.append(origin_sentence(nf))
        lines.extend("  " + s for s in operand_sentences(nf))
    found = _once(backward_nonfinite, trace)
    lines.extend(backward_sentence(b, trace) for b in found[: limits.DEBUG_PASSES])
    if len(found) > limits.DEBUG_PASSES:
        lines.append(f"… and {len(found) - limits.DEBUG_PASSES} more backward passes with non-finite gradients")
    bad = _unrecorded_nonfinite(trace)
    if bad is not None:
        lines.append(iteration_sentence(bad))
    return lines


def _unrecorded_nonfinite(trace: Trace) -> Optional[IterationScalars]:
    """The first non-finite backward call, when it ran past --limit (a recorded one is in the banner already)."""
    bad = first_nonfinite_iteration(trace)
    return bad if bad is not None and not bad.recorded else None


def banner_html(trace: Trace) -> str:
    """The snapshot's red box at the top, "" when everything recorded is finite. The origin's
    sentence links to its row (`anchor`), which `mark_origin_row` gives that id."""
    nf = _once(nonfinite_origin, trace)
    found = _once(backward_nonfinite, trace)
    bad = _unrecorded_nonfinite(trace)
    if nf is None and not found and bad is None:
        return ""
    parts = []
    if nf is not None:
        link = f' <a href="#{anchor(trace, nf.record)}" style="color:inherit">(its row)</a>'
        inputs = "".join(f'<div style="{MUTED}">{_esc(s)}</div>' for s in operand_sentences(nf))
        parts.append(f"<div><b>{_esc(origin_sentence(nf))}</b>{link}{inputs}</div>")
    for b in found[: limits.DEBUG_PASSES]:
        parts.append(f"<div>{_esc(backward_sentence(b, trace))}</div>")
    if len(found) > limits.DEBUG_PASSES:
        parts.append(f'<div style="{MUTED}">… and {len(found) - limits.DEBUG_PASSES} more backward passes</div>')
    if bad is not None:
        parts.append(f"<div>{_esc(iteration_sentence(bad))}</div>")
    return f'<div class="am-debug" style="{RED_BOX}">{"".join(parts)}</div>'


def with_banner(snapshot: str, trace: Trace) -> str:
    """`snapshot` (render_html's fragment) with the banner at its top and the origin's row marked."""
    banner = banner_html(trace)
    if not banner:
        return snapshot
    nf = _once(nonfinite_origin, trace)
    if nf is not None:
        row = f'<tr data-record="{nf.record}">'
        snapshot = snapshot.replace(row, f'<tr data-record="{nf.record}" id="{anchor(trace, nf.record)}" style="{ROW_MARK}">', 1)
    at = snapshot.find("</style>")
    at = at + len("</style>") if at >= 0 else snapshot.find(">") + 1
    return snapshot[:at] + banner + snapshot[at:]


# ---- the widget's data ------------------------------------------------------------------------


def debug_payload(trace: Trace) -> Optional[dict[str, Any]]:
    """The banner and chart for the widget as plain strings (the page sets them as text; the SVG
    goes through its sanitizer), None when there is nothing to show."""
    nf = _once(nonfinite_origin, trace)
    found = _once(backward_nonfinite, trace)
    flows = _once(grad_flow, trace)
    chart = training_section(trace)
    bad = _unrecorded_nonfinite(trace)
    if nf is None and not found and not flows and chart is None and bad is None:
        return None
    out: dict[str, Any] = {"forward": None, "backward": [], "more_backward": 0, "flow": None, "training": None}
    if nf is not None:
        out["forward"] = {"text": origin_sentence(nf), "id": nf.record, "inputs": operand_sentences(nf)}
    for b in found[: limits.DEBUG_PASSES]:
        ids = list(dict.fromkeys(b.targets + b.records))
        out["backward"].append({"text": backward_sentence(b, trace), "pass": b.pass_index, "id": ids[0] if ids else None})
    out["more_backward"] = max(0, len(found) - limits.DEBUG_PASSES)
    if bad is not None:
        out["backward"].append({"text": iteration_sentence(bad), "pass": None, "id": None})
    if chart is not None:
        out["training"] = {"svg": chart[0], "summary": chart[1]}
    if flows:
        out["flow"] = flow_payload(flows)
    return out


def flow_payload(flows: list[PassFlow]) -> dict[str, Any]:
    """The gradient-flow chart of the last pass; with several passes, the last DEBUG_FLOW_PASSES
    of them (`passes`), which the widget switches between, the last one first shown."""
    if len(flows) == 1:
        return {"svg": _once(flow_svg, flows[0]), "summary": flow_summary(flows[0])}
    shown = flows[-limits.DEBUG_FLOW_PASSES:]
    left = len(flows) - len(shown)
    more = f" ({left} earlier passes: trace.grad_flow() has each)" if left else ""
    passes = [{"pass": f.pass_index, "label": f"pass {f.pass_index + 1}", "svg": _once(flow_svg, f),
               "summary": flow_summary(f) + more} for f in shown]
    return {"passes": passes, "selected": len(passes) - 1}


def flow_section(trace: Trace, earlier_bytes: int = limits.DEBUG_FLOW_EARLIER_BYTES,
                 ) -> Optional[tuple[str, str, list[tuple[str, str, str]]]]:
    """(SVG, summary text, earlier passes) for the snapshot's gradient-flow section, None when no
    parameter got a gradient. The last pass is drawn first; `earlier` holds the passes before it
    that the widget can switch to as well (DEBUG_FLOW_PASSES in all), latest first, each as
    (label, SVG, summary), as long as their drawings fit in `earlier_bytes` together."""
    flows = _once(grad_flow, trace)
    if not flows:
        return None
    flow = flows[-1]
    earlier, room = [], earlier_bytes
    for f in reversed(flows[-limits.DEBUG_FLOW_PASSES:-1]):
        svg = _once(flow_svg, f)
        room -= len(svg)
        if room < 0:
            break
        earlier.append((f"pass {f.pass_index + 1}", svg, flow_summary(f) + _flagged_text(f)))
    text = flow_summary(flow)
    if len(flows) > 1:
        text += f" (the last of {len(flows)} passes"
        if earlier:
            text += f"; the {len(earlier)} before it folded below" if len(earlier) > 1 else "; the one before it folded below"
        text += ")" if len(earlier) + 1 == len(flows) else "; trace.grad_flow() has each)"
    return _once(flow_svg, flow), text + _flagged_text(flow), earlier


def _flagged_text(flow: PassFlow, limit: int = 6) -> str:
    out = []
    for flag in ("exploding", "vanishing"):
        hit = [p for p in flow.params if p.flag == flag]
        if hit:
            names = ", ".join(f"{p.label} ({number(p.norm)})" for p in hit[:limit])
            out.append(f"{flag}: {names}" + (f" and {len(hit) - limit} more" if len(hit) > limit else ""))
    return ("\n" + "\n".join(out)) if out else ""


# ---- the chart --------------------------------------------------------------------------------

ROW, LABEL_CHARS, CHAR_W, BAR_W, VALUE_W, TOP = 13, 34, 6, 240, 104, 44


def _bars(flow: PassFlow, limit: int) -> tuple[list[tuple], str, int]:
    """(bars as (label, norm, flag, record id or None), what a bar is, bars left out)."""
    if len(flow.params) <= limit:
        return [(p.label, p.norm, p.flag, p.record) for p in flow.params], "parameter", 0
    items = [(m.module, m.norm, m.flag, m.params[0]) for m in flow.modules]
    what = "module"
    if not items or len(items) > 4 * limit:  # a few huge modules, or none: the parameters, cut
        items, what = [(p.label, p.norm, p.flag, p.record) for p in flow.params], "parameter"
    if len(items) <= limit:
        return items, what, 0
    half = limit // 2
    return items[:half] + [None] + items[-half:], what, len(items) - 2 * half


def flow_svg(flow: PassFlow) -> str:
    """The gradient norms of one pass as horizontal bars on a log scale, flagged ones coloured;
    at most DEBUG_FLOW_BARS bars (one per module past that) and DEBUG_FLOW_BYTES bytes."""
    limit = limits.DEBUG_FLOW_BARS
    while True:
        svg = _draw(flow, *_bars(flow, limit))
        if len(svg) <= limits.DEBUG_FLOW_BYTES or limit <= 4:
            return svg
        limit //= 2


def _scale(norms: list[float]) -> tuple[float, float]:
    """log10 of the chart's left edge and right edge: every positive finite norm fits."""
    positive = [n for n in norms if n is not None and math.isfinite(n) and n > 0]
    if not positive:
        return -1.0, 0.0
    hi = math.ceil(math.log10(max(positive)))
    lo = math.floor(math.log10(min(positive)))
    return min(lo, hi - 1), hi if hi > lo else lo + 1


def _draw(flow: PassFlow, bars: list, what: str, left_out: int) -> str:
    norms = [b[1] for b in bars if b is not None]
    lo, hi = _scale(norms)
    label_w = CHAR_W * min(LABEL_CHARS, max([len(b[0]) for b in bars if b is not None] + [8])) + 8
    width = max(500, label_w + BAR_W + VALUE_W)  # the legend needs 500
    height = TOP + ROW * len(bars) + 6
    x = lambda v: label_w + BAR_W * (math.log10(v) - lo) / (hi - lo)  # noqa: E731
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica,Arial,sans-serif" font-size="10">',
        f'<text x="2" y="10" fill="#1f2328">gradient norm per {what}, pass {flow.pass_index + 1}, log scale</text>',
        f'<rect x="2" y="15" width="8" height="8" fill="{COLORS["vanishing"]}"/>'
        f'<text x="13" y="22" fill="#57606a">vanishing: &lt; {VANISHING:g} × the largest</text>'
        f'<rect x="170" y="15" width="8" height="8" fill="{COLORS["exploding"]}"/>'
        f'<text x="181" y="22" fill="#57606a">exploding: &gt; {EXPLODING:g} × the norm of its own value, or non-finite</text>',
    ]
    step = max(1, math.ceil((hi - lo) / 8))
    for d in range(int(lo), int(hi) + 1, step):  # a grid line per decade (or per few)
        gx = round(x(10.0 ** d), 1)
        out.append(f'<line x1="{gx}" y1="{TOP - 8}" x2="{gx}" y2="{height - 4}" stroke="#d0d7de"/>')
        out.append(f'<text x="{gx}" y="{TOP - 10}" fill="#57606a" text-anchor="middle">1e{d}</text>')
    for i, bar in enumerate(bars):
        y = TOP + ROW * i
        if bar is None:
            out.append(f'<text x="{label_w - 4}" y="{y + 9}" fill="#57606a" text-anchor="end">… {left_out} more</text>')
            continue
        out.append(_bar(bar, y, label_w, x))
    out.append("</svg>")
    return "".join(out)


def _bar(bar: tuple, y: int, label_w: int, x) -> str:
    label, norm, flag, rid = bar
    shown = label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"
    color = COLORS[flag]
    g = f'<g id="p{rid}">' if rid is not None else "<g>"
    g += f'<text x="{label_w - 4}" y="{y + 9}" fill="#1f2328" text-anchor="end">{_esc(shown)}</text>'
    if norm is not None and not math.isfinite(norm):
        end = label_w + BAR_W
        g += f'<rect x="{label_w}" y="{y + 1}" width="{BAR_W}" height="{ROW - 3}" fill="{color}" fill-opacity="0.35"/>'
    elif norm:
        end = max(label_w + 1, round(x(norm), 1))
        g += f'<rect x="{label_w}" y="{y + 1}" width="{round(end - label_w, 1)}" height="{ROW - 3}" fill="{color}"/>'
    else:
        end = label_w
    note = number(norm) + (f" {flag}" if flag else "")
    g += f'<text x="{end + 3}" y="{y + 9}" fill="{color if flag else "#57606a"}">{_esc(note)}</text>'
    return g + "</g>"



# ---- the training-loop chart: loss and total gradient norm per backward call ---------------------

CHART_W, PANEL_H, LEFT, TOP_PAD, GAP = 420, 64, 58, 18, 26
NAN_COLOR, LOSS_COLOR, NORM_COLOR = "#cf222e", "#4c78a8", "#8250df"


def training_section(trace: Trace) -> Optional[tuple[str, str]]:
    """(SVG, summary) of the training chart, None for fewer than two backward calls."""
    iterations = training(trace)
    if len(iterations) < 2:
        return None
    return training_svg(iterations), training_summary(iterations, trace.iterations_left_out)


def _sample(iterations: list[IterationScalars], limit: int) -> list[IterationScalars]:
    """At most about `limit` of them, evenly spread; the first non-finite one and the last always kept."""
    if len(iterations) <= limit:
        return list(iterations)
    step = len(iterations) / limit
    keep = {int(i * step) for i in range(limit)} | {len(iterations) - 1}
    bad = next((k for k, it in enumerate(iterations) if not it.finite), None)
    if bad is not None:
        keep.add(bad)
    return [iterations[k] for k in sorted(keep)]


def training_svg(iterations: list[IterationScalars]) -> str:
    """Two small line charts over the backward calls: the loss (linear) above, the total gradient
    norm (log scale) below; a non-finite value is a red mark at the panel's top, recorded passes
    are dots. At most DEBUG_CHART_POINTS points a line and DEBUG_CHART_BYTES bytes."""
    limit = limits.DEBUG_CHART_POINTS
    while True:
        svg = _chart(iterations, _sample(iterations, limit))
        if len(svg) <= limits.DEBUG_CHART_BYTES or limit <= 20:
            return svg
        limit //= 2


def _finite(v: Optional[float]) -> bool:
    return v is not None and math.isfinite(v)


def _chart(everything: list[IterationScalars], shown: list[IterationScalars]) -> str:
    first, last = everything[0].index, everything[-1].index
    span = max(1, last - first)
    x = lambda i: round(LEFT + CHART_W * (i - first) / span, 1)  # noqa: E731
    width = LEFT + CHART_W + 12
    height = TOP_PAD + 2 * PANEL_H + GAP + 18
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Helvetica,Arial,sans-serif" font-size="10">',
        '<text x="2" y="10" fill="#1f2328">per backward call: loss, and total gradient norm (log scale); '
        f'<tspan fill="{NAN_COLOR}">× NaN/Inf</tspan>, ● recorded</text>',
    ]
    top = TOP_PAD
    out.append(_panel(shown, [it.loss for it in shown], "loss", top, x, log=False, color=LOSS_COLOR))
    out.append(_panel(shown, [it.grad_norm for it in shown], "grad norm", top + PANEL_H + GAP, x, log=True, color=NORM_COLOR))
    axis_y = top + 2 * PANEL_H + GAP + 12
    out.append(f'<text x="{LEFT}" y="{axis_y}" fill="#57606a">{first + 1}</text>')
    out.append(f'<text x="{LEFT + CHART_W}" y="{axis_y}" fill="#57606a" text-anchor="end">{last + 1} (backward call)</text>')
    bad = next((it for it in everything if not it.finite), None)
    if bad is not None:
        bx = x(bad.index)
        out.append(f'<line x1="{bx}" y1="{top}" x2="{bx}" y2="{top + 2 * PANEL_H + GAP}" stroke="{NAN_COLOR}" '
                   'stroke-dasharray="3,2"/>')
        out.append(f'<text x="{bx}" y="{axis_y}" fill="{NAN_COLOR}" text-anchor="middle">{bad.index + 1}</text>')
    out.append("</svg>")
    return "".join(out)


def _panel(shown: list[IterationScalars], values: list, title: str, top: int, x, log: bool, color: str) -> str:
    """One panel: its frame, its scale's two ends, the line (broken where a value is missing),
    dots for recorded passes and red marks for non-finite values."""
    usable = [v for v in values if _finite(v) and (not log or v > 0)]
    out = [f'<rect x="{LEFT}" y="{top}" width="{CHART_W}" height="{PANEL_H}" fill="none" stroke="#d0d7de"/>',
           f'<text x="{LEFT - 4}" y="{top + PANEL_H // 2 + 3}" fill="{color}" text-anchor="end">{_esc(title)}</text>']
    if usable:
        lo, hi = min(usable), max(usable)
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        y = lambda v: round(top + PANEL_H - 3 - (PANEL_H - 6) * (((math.log10(v) if log else v) - lo) / (hi - lo)), 1)  # noqa: E731
        shown_lo = number(10 ** lo if log else lo)
        shown_hi = number(10 ** hi if log else hi)
        out.append(f'<text x="{LEFT - 4}" y="{top + 8}" fill="#57606a" text-anchor="end">{shown_hi}</text>')
        out.append(f'<text x="{LEFT - 4}" y="{top + PANEL_H}" fill="#57606a" text-anchor="end">{shown_lo}</text>')
        run: list[str] = []
        for it, v in zip(shown, values):
            if _finite(v) and (not log or v > 0):
                run.append(f"{x(it.index)},{y(v)}")
                continue
            out.append(_line(run, color))
            run = []
        out.append(_line(run, color))
        for it, v in zip(shown, values):
            if it.recorded and _finite(v) and (not log or v > 0):
                out.append(f'<circle cx="{x(it.index)}" cy="{y(v)}" r="2.5" fill="{color}"/>')
    out.extend(_nonfinite_marks(shown, values, top, x))
    return "".join(out)


def _nonfinite_marks(shown: list[IterationScalars], values: list, top: int, x) -> list[str]:
    """A red × where a run of non-finite values starts, and a red band along the panel's top while it lasts."""
    out, start = [], None
    for k, v in enumerate(values + [0.0]):
        bad = v is not None and not math.isfinite(v)
        if bad and start is None:
            start = k
        elif not bad and start is not None:
            x0, x1, cy = x(shown[start].index), x(shown[k - 1].index), top + 5
            if x1 > x0:
                out.append(f'<rect x="{x0}" y="{top}" width="{round(x1 - x0, 1)}" height="2" fill="{NAN_COLOR}"/>')
            out.append(f'<path d="M{x0 - 3},{cy - 3}L{x0 + 3},{cy + 3}M{x0 - 3},{cy + 3}L{x0 + 3},{cy - 3}" '
                       f'stroke="{NAN_COLOR}" stroke-width="1.5"/>')
            start = None
    return out


def _line(points: list[str], color: str) -> str:
    if len(points) < 2:
        return ""
    return f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="1.5"/>'
