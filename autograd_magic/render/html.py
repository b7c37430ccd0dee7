"""The static HTML snapshot: what GitHub, nbviewer, nbconvert and widget-less front ends show.

An inline-styled fragment with no scripts and no external CSS: a header,
the table of intermediates grouped by source line (internal ops folded in
`<details>` under their call line), the backward passes, the error, notes,
and any extra sections other views add (graph SVG, backward stepper,
why-explanations) through `render_html(..., sections=...)` or `section()`.
With a variant, the variant's table is shown against the original run and
every changed cell is highlighted with what it was.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..data.identity import match_records
from ..explain.wording import variant_description
from .html_table import (
    COLUMNS, ERROR, GROUP, MONO, MUTED, TD, esc, full_row, header_row, row,
)
from ..data.trace import Record, Trace, TraceError
from .. import limits

BOX = (
    "font-family:-apple-system,BlinkMacSystemFont,'Segoe UI',Helvetica,Arial,sans-serif;font-size:13px;"
    "color:#1f2328;background:#ffffff;border:1px solid #d0d7de;border-radius:6px;padding:8px;"
    "overflow-x:auto;max-width:100%;line-height:1.4"
)
TABLE = "border-collapse:collapse;margin:6px 0;font-size:12px;color:#1f2328"
MAX_ROWS = limits.SNAPSHOT_ROWS


def render_html(
    trace: Trace,
    variant: Optional[Trace] = None,
    sections: Iterable[str] = (),
    graph: bool = False,
    graph_timeout: Optional[float] = None,
) -> str:
    """The snapshot of `trace`, or of `variant` compared with `trace`.

    `sections` are extra HTML fragments (already escaped by their makers)
    appended in order; `graph=True` adds the Graphviz SVG when it can be laid
    out. Both are the hooks for the graph, the stepper and the explanations.
    """
    if variant is None and trace.variant_of is not None:  # a variant on its own: compare with its original
        trace, variant = trace.variant_of, trace
    shown = variant if variant is not None else trace
    parts = [header(trace, variant), error_box(shown.error)]
    parts.append(table(shown, trace if variant is not None else None))
    if variant is not None:
        parts.append(missing_from_variant(trace, variant))
    parts.append(passes_list(shown))
    parts.append(notes_list(shown))
    if graph:
        parts.append(graph_section(shown, timeout=graph_timeout))
    parts.extend(sections)
    return f'<div class="autograd-magic" style="{BOX}">' + "".join(p for p in parts if p) + "</div>"


# ---- hooks for other views ----
def section(title: str, body_html: str, open: bool = True) -> str:
    """A titled, foldable block for extra content (the title is escaped, the body is trusted HTML)."""
    flag = " open" if open else ""
    return (
        f'<details{flag} style="margin-top:8px"><summary style="cursor:pointer;font-weight:600">{esc(title)}'
        f'</summary><div style="margin-top:4px">{body_html}</div></details>'
    )


def graph_section(trace: Trace, timeout: Optional[float] = None) -> str:
    """The autograd graph as inline SVG, or "" when Graphviz is unavailable or too slow."""
    try:
        svg = trace.to_svg(timeout=timeout)
    except Exception:
        return ""
    if not svg or "<script" in svg.lower():  # never let a script into the static view
        return ""
    return section("autograd graph", svg)


# ---- header, error, lists ----
def counts(trace: Trace) -> str:
    shown = sum(1 for r in trace.records if not (r.internal and not r.external))
    text = f"{shown} tensors, {len(trace.passes)} backward pass" + ("" if len(trace.passes) == 1 else "es")
    folded = len(trace.records) - shown
    return text + (f" ({folded} more inside calls)" if folded else "")


def header(trace: Trace, variant: Optional[Trace]) -> str:
    shown = variant if variant is not None else trace
    line = f"<b>autograd trace</b> · {esc(counts(shown))}"
    if variant is not None:
        line += (
            f' · <b style="color:#9a6700">variant: {esc(variant_description(variant))}</b>'
            f' <span style="{MUTED}">(highlighted cells differ from the real run; your variables are unchanged)</span>'
        )
        if trace.error is not None:
            line += f'<div style="{MUTED}">the real run failed: {esc(trace.error.type)}: {esc(trace.error.message)}</div>'
    return f"<div>{line}</div>"


def error_text(error: TraceError) -> str:
    where = f" (line {error.line})" if error.line is not None else ""
    return f"{error.type}{where}: {error.message}"


def error_box(error: Optional[TraceError]) -> str:
    """The error at the top; it also appears in the table at its line."""
    if error is None:
        return ""
    return (
        f'<div style="{ERROR};padding:4px 8px;margin:6px 0;border-radius:4px;white-space:pre-wrap">'
        f"<b>{esc(error.type)}</b>{esc(' at line ' + str(error.line) if error.line is not None else '')}: "
        f"{esc(error.message)}</div>"
    )


def passes_list(trace: Trace) -> str:
    if not trace.passes:
        return ""
    items = []
    for p in trace.passes:
        where = f"line {p.line}: " if p.line is not None else ""
        text = f"backward pass {p.index + 1} ({p.kind}) — {where}"
        item = esc(text) + (f'<code style="{MONO}">{esc(p.expr)}</code>' if p.expr else "")
        item += esc(f" — {len(p.steps)} nodes")
        if p.error:
            item += f' — <span style="{ERROR}">{esc(p.error)}</span>'
        items.append(f"<li>{item}</li>")
    return f'<div style="margin-top:6px"><b>backward passes</b><ul style="margin:2px 0">{"".join(items)}</ul></div>'


def notes_list(trace: Trace) -> str:
    if not trace.notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in trace.notes)
    return f'<div style="{MUTED};margin-top:6px">notes<ul style="margin:2px 0">{items}</ul></div>'


def missing_from_variant(original: Trace, variant: Trace) -> str:
    """Tensors the real run made that the variant never reached (it stopped earlier)."""
    matched = match_records(original, variant)
    missing = [r for r in original.records if r.id not in matched and not (r.internal and not r.external)]
    if not missing:
        return ""
    names = ", ".join(r.label for r in missing)
    return f'<div style="{MUTED}">not made in the variant: <code style="{MONO}">{esc(names)}</code></div>'


# ---- the table ----
def line_order(trace: Trace) -> list[Optional[int]]:
    """Source lines that have rows, an error or a backward pass; outside-the-cell tensors first."""
    lines = {r.line for r in trace.records}
    lines |= {p.line for p in trace.passes if p.line is not None}
    if trace.error is not None and trace.error.line is not None:
        lines.add(trace.error.line)
    return sorted(lines, key=lambda n: (n is not None, n or 0))


def group_header(trace: Trace, line: Optional[int]) -> str:
    if line is None:
        text = "from outside the cell (earlier cells, the namespace)"
        return f'<tr><th colspan="{len(COLUMNS)}" style="{GROUP}"><i>{esc(text)}</i></th></tr>'
    source = trace.source_line(line)
    code = f' <code style="white-space:pre">{esc(source)}</code>' if source.strip() else ""
    return f'<tr><th colspan="{len(COLUMNS)}" style="{GROUP}"><span style="{MUTED}">line {line}</span>{code}</th></tr>'


def folded(records: list[Record], trace: Trace, originals: dict[int, Record], compare: bool) -> str:
    """Ops that ran inside functions and modules, folded under their call line."""
    if not records:
        return ""
    where = sorted({r.internal for r in records if r.internal})
    rows = "".join(row(r, trace, originals.get(r.id), compare) for r in records)
    summary = f"{len(records)} op{'s' if len(records) != 1 else ''} inside " + ", ".join(where)
    inner = (
        f'<details><summary style="cursor:pointer;{MUTED}">{esc(summary)}</summary>'
        f'<table style="{TABLE};width:100%">{rows}</table></details>'
    )
    return full_row(inner)


def line_extras(trace: Trace, line: Optional[int]) -> str:
    out = []
    for p in trace.passes:
        if p.line == line and line is not None:
            text = f"↳ backward pass {p.index + 1}: {len(p.steps)} nodes"
            out.append(full_row(f'<span style="{MUTED}">{esc(text)}</span>'))
    err = trace.error
    if err is not None and err.line == line and line is not None:
        out.append(full_row(f'<span style="white-space:pre-wrap">{esc(error_text(err))}</span>', f"{TD};{ERROR}"))
    return "".join(out)


def _fits(records: list[Record], budget: int) -> tuple[list[Record], int]:
    """The records that fit in the row budget (internals fold as a block: all or none), and how many not."""
    visible = [r for r in records if not (r.internal and not r.external)]
    inside = [r for r in records if r.internal and not r.external]
    shown = visible[: max(budget, 0)]
    if len(shown) + len(inside) <= budget:
        shown += inside
    return shown, len(records) - len(shown)


def table(trace: Trace, original: Optional[Trace] = None, max_rows: int = MAX_ROWS) -> str:
    """The rows of `trace`, grouped by line; against `original` when it is a variant."""
    originals: dict[int, Record] = {}
    if original is not None:
        originals = {vid: original.records[oid] for oid, vid in match_records(original, trace).items()}
    compare = original is not None
    groups = trace.lines()
    body, budget, left_out = [], max_rows, 0
    for line in line_order(trace):
        shown, missed = _fits(groups.get(line, []), budget)
        budget, left_out = budget - len(shown), left_out + missed
        extras = line_extras(trace, line)
        if not shown and not extras:
            continue
        visible = [r for r in shown if not (r.internal and not r.external)]
        inside = [r for r in shown if r.internal and not r.external]
        rows = "".join(row(r, trace, originals.get(r.id), compare) for r in visible)
        body.append(
            "<tbody>" + group_header(trace, line) + rows + folded(inside, trace, originals, compare) + extras + "</tbody>"
        )
    if left_out:
        text = f"{left_out} more tensors are not shown here (the interactive view and str(trace) show them all)"
        body.append("<tbody>" + full_row(f'<span style="{MUTED}">{esc(text)}</span>') + "</tbody>")
    if not trace.records:
        body.append("<tbody>" + full_row(f'<span style="{MUTED}">no tensors were made</span>') + "</tbody>")
    return f'<table style="{TABLE}">{header_row()}{"".join(body)}</table>'
