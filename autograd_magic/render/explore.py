"""The explorer drawn: the output against one input (inline SVG), the Jacobian, their words.

One renderer for both views: the snapshot embeds `curve_svg`'s drawing and
`jacobian_html`'s table; the widget's payload (`explore_payload`) carries the
same SVG text, which the page rebuilds through its SVG allowlist, and the
Jacobian as strings the page sets with `textContent`. So the static and the
live view can't disagree on a number or a word.

The drawing is small on purpose (a saved notebook keeps one per input): one
path for the curve (coordinates to a tenth of a pixel, a gap where the output
was not finite), the current point, the tangent whose slope is the gradient
torch computed, the central-difference secant dashed, a few tick labels and
the caption "slope 93 at x = 2". No scripts, links, styles or event
attributes: only elements and attributes the page's sanitizer keeps.
Pure: reads only `data.explore`.
"""

from __future__ import annotations

import html
import math
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

from .. import limits
from ..data.explore import Curve, Exploration, Jacobian

# The drawing's frame, in SVG user units (pixels at 100 %). The captions ("slope 93 at x = 2",
# the secant's) are text beside the drawing, in the widget and the snapshot alike, in the colours of
# their lines: readable where an image is not shown, selectable, found by a search.
WIDTH, HEIGHT = 320, 160
LEFT, RIGHT, TOP, BOTTOM = 46, 312, 8, 142
TANGENT_SPAN = 0.3  # the tangent and the secant reach this fraction of the x range each side of x0
CURVE, TANGENT, SECANT, AXIS = "#0969da", "#cf222e", "#8250df", "#8c959f"
LABEL_CHARS = 24  # an input's or output's name in the drawing; longer ones are cut with "…"
OK = "color:#1a7f37;font-weight:600"
BAD = "color:#cf222e;font-weight:600"
MUTED = "color:#57606a;font-size:11px"


# ---- numbers and words ---------------------------------------------------------------------


def number(v: Optional[float]) -> str:
    """A number as the views say it: 93, 22, 0.5, 93.17, 1.2e-05 (four significant digits)."""
    if v is None:
        return "—"
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    text = f"{v:.4g}"
    return "0" if text == "-0" else text


def _short(label: str, limit: int = LABEL_CHARS) -> str:
    label = str(label)
    return label if len(label) <= limit else label[: limit - 1] + "…"


def slope_caption(curve: Curve) -> str:
    """"slope 93 at x = 2": the gradient torch computed at the point shown."""
    where = f"at {curve.input_label} = {number(curve.x0)}"
    if curve.slope is None or not math.isfinite(curve.slope):
        return f"no finite gradient {where}" if curve.slope is not None else f"no gradient {where}"
    return f"slope {number(curve.slope)} {where}"


def secant_caption(curve: Curve) -> str:
    """"secant (h = 0.1): 93.17": the central difference beside autograd's slope ("" when not computed)."""
    if curve.secant is None or curve.h is None:
        return ""
    return f"secant (h = {number(curve.h)}): {number(curve.secant)}"


def vector_text(values: Optional[Sequence[Optional[float]]], limit: int = limits.EXPLORE_VECTOR_SHOWN) -> str:
    """[10, 14, 18, …] with at most `limit` entries, then how many there are in all."""
    if values is None:
        return "—"
    shown = ", ".join(number(v) for v in list(values)[:limit])
    more = f", … ({len(values)} in all)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _shape(shape: Sequence[int]) -> str:
    return " × ".join(str(s) for s in shape) if shape else "scalar"


# ---- the curve -----------------------------------------------------------------------------


def _finite(v: Optional[float]) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _c(v: float) -> str:
    """A pixel coordinate to a tenth, without a trailing .0 (bytes: a notebook keeps them)."""
    text = f"{v:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


class _Frame:
    """Data coordinates -> the plot box's pixels (y grows downwards in SVG)."""

    def __init__(self, x_lo: float, x_hi: float, y_lo: float, y_hi: float) -> None:
        self.x_lo, self.x_hi, self.y_lo, self.y_hi = x_lo, x_hi, y_lo, y_hi

    def px(self, x: float) -> float:
        return LEFT + (x - self.x_lo) / (self.x_hi - self.x_lo) * (RIGHT - LEFT)

    def py(self, y: float) -> float:
        return BOTTOM - (y - self.y_lo) / (self.y_hi - self.y_lo) * (BOTTOM - TOP)

    def clip(self, x0: float, y0: float, slope: float, x_a: float, x_b: float) -> Optional[tuple[float, float, float, float]]:
        """The part of the line y = y0 + slope (x - x0), x in [x_a, x_b], inside the box (None: outside)."""
        lo, hi = max(x_a, self.x_lo), min(x_b, self.x_hi)
        if slope != 0:
            ends = sorted(x0 + (y - y0) / slope for y in (self.y_lo, self.y_hi))
            lo, hi = max(lo, ends[0]), min(hi, ends[1])
        elif not self.y_lo <= y0 <= self.y_hi:
            return None
        if not lo < hi:
            return None
        return lo, y0 + slope * (lo - x0), hi, y0 + slope * (hi - x0)


def _y_range(curve: Curve) -> tuple[float, float]:
    ys = [y for y in curve.ys if _finite(y)]
    if _finite(curve.y0):
        ys.append(curve.y0)
    if not ys:
        return -1.0, 1.0
    lo, hi = min(ys), max(ys)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # a flat curve: a band around its value
        pad = max(1.0, abs(hi) * 0.1)
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.06
    return lo - pad, hi + pad


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """About `count` round numbers (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step and len(ticks) < 3 * count:
        ticks.append(0.0 if abs(k * step) < 1e-12 * step else k * step)
        k += 1
    return ticks


def _path(curve: Curve, frame: _Frame) -> str:
    """One path of the finite points in order; a point that is None (or not finite) starts a new piece."""
    pieces, run = [], []
    for x, y in zip(curve.xs, curve.ys):
        if _finite(x) and _finite(y):
            run.append(f"{_c(frame.px(x))},{_c(frame.py(y))}")
        elif run:
            pieces.append(run)
            run = []
    if run:
        pieces.append(run)
    # a lone point draws nothing as a line: repeat it, and round caps show it as a dot
    d = "".join("M" + " ".join(p if len(p) > 1 else p * 2) for p in pieces)
    return f'<path class="agm-curve" d="{d}" fill="none" stroke="{CURVE}" stroke-width="1.6" stroke-linecap="round"/>' if d else ""


def _line(seg: Optional[tuple], frame: _Frame, cls: str, color: str, dash: str = "") -> str:
    if seg is None:
        return ""
    xa, ya, xb, yb = seg
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line class="{cls}" x1="{_c(frame.px(xa))}" y1="{_c(frame.py(ya))}" x2="{_c(frame.px(xb))}" '
        f'y2="{_c(frame.py(yb))}" stroke="{color}" stroke-width="1.2"{dashed}/>'
    )


def _axes(frame: _Frame) -> str:
    box = f'<path d="M{LEFT},{TOP}V{BOTTOM}H{RIGHT}" fill="none" stroke="{AXIS}"/>'
    ticks = []
    for x in nice_ticks(frame.x_lo, frame.x_hi):
        px = _c(frame.px(x))
        ticks.append(f'<path d="M{px},{BOTTOM}v3" stroke="{AXIS}"/><text x="{px}" y="{BOTTOM + 13}" text-anchor="middle">{_esc(number(x))}</text>')
    for y in nice_ticks(frame.y_lo, frame.y_hi, 3):
        py = _c(frame.py(y))
        ticks.append(f'<path d="M{LEFT - 3},{py}h3" stroke="{AXIS}"/><text x="{LEFT - 5}" y="{_c(frame.py(y) + 3)}" text-anchor="end">{_esc(number(y))}</text>')
    return box + "".join(ticks)


def curve_svg(curve: Curve) -> str:
    """The output against one input over the curve's xs: the tangent at (x0, y0) and the secant."""
    xs = [x for x in curve.xs if _finite(x)]
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if _finite(curve.x0) and not xs:
        x_lo, x_hi = curve.x0 - 1, curve.x0 + 1
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    frame = _Frame(x_lo, x_hi, *_y_range(curve))
    parts = [_axes(frame), _path(curve, frame)]
    here = _finite(curve.x0) and _finite(curve.y0) and x_lo <= curve.x0 <= x_hi
    if here:
        reach = TANGENT_SPAN * (x_hi - x_lo)
        a, b = curve.x0 - reach, curve.x0 + reach
        if _finite(curve.secant):
            parts.append(_line(frame.clip(curve.x0, curve.y0, curve.secant, a, b), frame, "agm-secant", SECANT, "4 3"))
        if _finite(curve.slope):
            parts.append(_line(frame.clip(curve.x0, curve.y0, curve.slope, a, b), frame, "agm-tangent", TANGENT))
        parts.append(f'<circle class="agm-point" cx="{_c(frame.px(curve.x0))}" cy="{_c(frame.py(curve.y0))}" r="3" fill="{TANGENT}"/>')
    names = f"{_short(curve.output_label)} against {_short(curve.input_label)}"
    parts.append(f'<text x="{LEFT + 4}" y="{TOP + 10}" fill="#57606a">{_esc(names)}</text>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'font-family="Helvetica,Arial,sans-serif" font-size="10">{"".join(parts)}</svg>'
    )


# ---- the Jacobian --------------------------------------------------------------------------


def _cells(values: Optional[Sequence[Optional[float]]], n: int) -> Optional[list[str]]:
    if values is None:
        return None
    values = list(values)
    return [number(v) for v in values[:n]] + (["…"] if len(values) > n else [])


def jacobian_parts(jac: Jacobian) -> dict[str, Any]:
    """The Jacobian as the words and numbers both views show (strings only: the page sets them as text).

    One grid: J's rows (each led by its entry of v when backward was given one), then v·J and
    the leaf's .grad as two more rows under J's columns, so the eye compares them entry by
    entry. At most EXPLORE_JACOBIAN_SHOWN rows and columns, "…" marking the rest and the
    title giving the whole shape."""
    n = limits.EXPLORE_JACOBIAN_SHOWN
    rows_in = jac.rows or []
    cols = max((len(r) for r in rows_in), default=0)
    v = list(jac.v) if jac.v is not None else None
    rows = [
        {"label": number(v[i]) if v is not None and i < len(v) else "", "cells": _cells(r, n)}
        for i, r in enumerate(rows_in[:n])
    ]
    if len(rows_in) > n:
        rows.append({"label": "⋮" if v is not None else "", "cells": ["⋮"] * (min(cols, n) + (cols > n))})
    out, inp = _short(jac.output_label), _short(jac.input_label)
    title = f"∂{out}/∂{inp}"
    if rows_in:
        title += f": {len(rows_in)} × {cols} ({out}: {_shape(jac.out_shape)}, {inp}: {_shape(jac.in_shape)}, flattened)"
        if len(rows_in) > n or cols > n:
            title += f"; the first {min(len(rows_in), n)} × {min(cols, n)} shown"
    if v is not None:
        title += "; each row led by its entry of v (what backward() was given)"
    product = "v·J" if v is not None else "the Jacobian row"
    verdict = ""
    if jac.agrees is True:
        verdict = f"{product} equals {inp}.grad ✓"
    elif jac.agrees is False:
        verdict = f"{product} differs from {inp}.grad ✗"
    return {
        "title": title,
        "rows": rows,
        "vj": _cells(jac.vj, n) if v is not None else None,  # without a v (a scalar output) v·J is J's one row
        "grad": _cells(jac.grad, n),
        "grad_label": f"{inp}.grad",
        "verdict": verdict,
        "agrees": jac.agrees,
        "note": _clip(jac.note),
    }


def _clip(text: str, limit: int = limits.WIDGET_TEXT) -> str:
    text = str(text or "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def jacobian_html(jac: Jacobian) -> str:
    """The Jacobian as a small table (bounded), v·J and .grad as rows under its columns, the verdict."""
    parts = jacobian_parts(jac)
    # a first column: v's entries, or "J" when the rows below it (v·J, .grad) need their names
    lead = any(r["label"] for r in parts["rows"]) or parts["vj"] is not None or parts["grad"] is not None

    def tr(label: str, cells: list[str], head: bool = False) -> str:
        first = (f"<th>{_esc(label)}</th>" if head else f"<td>{_esc(label)}</td>") if lead or head else ""
        return "<tr>" + first + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>"

    body = [tr(r["label"], r["cells"]) for r in parts["rows"]]
    if body and not any(r["label"] for r in parts["rows"]):
        body[0] = tr("J", parts["rows"][0]["cells"], head=True)
    if parts["vj"] is not None:
        body.append(tr("v·J", parts["vj"], head=True))
    if parts["grad"] is not None:
        body.append(tr(parts["grad_label"], parts["grad"], head=True))
    out = [f"<div><b>Jacobian</b> {_esc(parts['title'])}</div>"]
    if body:
        out.append(f'<table class="m" style="table-layout:auto">{"".join(body)}</table>')
    if parts["verdict"]:
        out.append(f'<div style="{OK if parts["agrees"] else BAD}">{_esc(parts["verdict"])}</div>')
    if parts["note"]:
        out.append(f'<div style="{MUTED}">{_esc(parts["note"])}</div>')
    return f'<div class="agm-jacobian">{"".join(out)}</div>'


# ---- the snapshot's section ----------------------------------------------------------------


def inline_svg(svg: str) -> str:
    return svg


def curve_html(curve: Curve, picture: Callable[[str], str] = inline_svg) -> str:
    """One curve: its drawing (`picture` embeds the SVG text), then the caption as text."""
    words = [(slope_caption(curve), TANGENT), (secant_caption(curve), SECANT)]
    caption = " · ".join(f'<span style="color:{colour}">{_esc(w)}</span>' for w, colour in words if w)
    note = f'<div style="{MUTED}">{_esc(_clip(curve.note, limits.SNAPSHOT_TEXT_CHARS))}</div>' if curve.note else ""
    return f'<div class="agm-curve-box">{picture(curve_svg(curve))}<div class="m">{caption}</div>{note}</div>'


LEFT_OUT = "{what} left out of this snapshot to keep the notebook small; the live widget shows it."


def explore_html(
    exploration: Exploration,
    picture: Callable[[str], str] = inline_svg,
    budget: int = limits.EXPLORE_SNAPSHOT_BYTES,
) -> str:
    """Every curve, then the Jacobian, then the note, within `budget` bytes: past it the
    Jacobian, then the last curves, give way to a line each saying so."""
    curves = [curve_html(c, picture) for c in exploration.curves]
    jac = jacobian_html(exploration.jacobian) if exploration.jacobian is not None else ""
    note = f'<div style="{MUTED}">{_esc(_clip(exploration.note, limits.SNAPSHOT_TEXT_CHARS))}</div>' if exploration.note else ""

    def size() -> int:
        return sum(map(len, curves)) + len(jac) + len(note)

    if jac and size() > budget:
        jac = f'<div style="{MUTED}">{_esc(LEFT_OUT.format(what="The Jacobian"))}</div>'
    dropped = 0
    while curves and size() > budget:
        curves.pop()
        dropped += 1
    if dropped:
        what = f"{dropped} curve" + ("s" if dropped > 1 else "")
        curves.append(f'<div style="{MUTED}">{_esc(LEFT_OUT.format(what=what.capitalize()))}</div>')
    return "".join(curves) + jac + note


# ---- one run's point on the real run's curves ----------------------------------------------


VARIANT_WITHOUT_EXPLORATION = "The curves and the Jacobian are the real run's: this variant has none of its own."


def at_point(real: Exploration, shown: Optional[Exploration], variant: bool = False) -> Exploration:
    """What a view shows for a run with an input moved: the real run's controls and curves' range
    (a variant's curves may come without xs and ys), the shown run's points, tangents, Jacobian.
    A `variant` with no exploration of its own shows the real run's, saying so."""
    if shown is None and variant and not real.empty:
        return replace(real, note=" ".join(filter(None, [real.note, VARIANT_WITHOUT_EXPLORATION])))
    if shown is None or shown is real:
        return real
    by_input = {c.input: c for c in real.curves}
    curves = []
    for c in shown.curves:
        base = by_input.get(c.input)
        if not c.xs and base is not None:
            c = replace(c, xs=list(base.xs), ys=list(base.ys), slopes=list(base.slopes))
        curves.append(c)
    return Exploration(
        inputs=real.inputs or shown.inputs,
        output=shown.output if shown.output is not None else real.output,
        output_label=shown.output_label or real.output_label,
        curves=curves,
        jacobian=shown.jacobian,
        note=shown.note,
    )


# ---- the widget's payload ------------------------------------------------------------------


def _json_number(v: Optional[float]) -> Optional[float]:
    """JSON has no NaN or infinity (the page's parser refuses them): those travel as None."""
    return float(v) if _finite(v) else None


def explore_payload(exploration: Optional[Exploration], values: Optional[dict[int, float]] = None) -> Optional[dict[str, Any]]:
    """What the page's Explore section draws: each input's control (at `values` where the
    slider moved it, else the cell's value), each curve's SVG and numbers, the Jacobian's strings."""
    if exploration is None:
        return None
    values = values or {}
    inputs = [
        {
            "record": i.record,
            "label": _short(i.label, 80),
            "value": _json_number(i.value),
            "current": _json_number(values.get(i.record, i.value)),
            "lo": _json_number(i.lo),
            "hi": _json_number(i.hi),
            "step": _json_number(i.step),
            "external": bool(i.external),
        }
        for i in exploration.inputs
    ]
    curves = [
        {
            "input": c.input,
            "svg": curve_svg(c),
            "x0": _json_number(c.x0),
            "y0": _json_number(c.y0),
            "slope": _json_number(c.slope),
            "secant": _json_number(c.secant),
            "h": _json_number(c.h),
            "caption": slope_caption(c),
            "secant_text": secant_caption(c),
            "note": _clip(c.note),
        }
        for c in exploration.curves
    ]
    return {
        "inputs": inputs,
        "output_label": _short(exploration.output_label, 80),
        "curves": curves,
        "jacobian": jacobian_parts(exploration.jacobian) if exploration.jacobian is not None else None,
        "note": _clip(exploration.note),
    }
