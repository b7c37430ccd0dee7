"""The static HTML snapshot: what GitHub, nbviewer, nbconvert and widget-less front ends show.

A fragment with no scripts: a header, the table of intermediates grouped by
source line (internal ops folded in `<details>` under their call line), the
backward passes, the error, notes, and any extra sections other views add
(graph SVG, backward stepper, why-explanations) through
`render_html(..., sections=...)` or `section()`. With a variant, the variant's
table is shown against the original run and every changed cell is highlighted
with what it was.

It is a summary bounded in bytes (`limits.SNAPSHOT_*`), whatever the model:
large values show their head and exact statistics, numbered blocks that repeat
the same tensors (`layers.0` … `layers.5`) are listed once, ops inside one call
are capped, rows stop at a byte budget; each cut says what was left out and
that the live widget has it all. Styling: see `html_table`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from ..data.identity import match_records
from ..explain.wording import variant_description
from .html_table import (
    COLUMNS, CSS, ERROR, MUTED, TABLE_LAYOUT, esc, full_row, header_row, muted, row,
)
from ..data.trace import Record, Trace, TraceError
from .. import limits

BOX = (
    "font-family:system-ui,'Segoe UI',Helvetica,Arial,sans-serif;font-size:13px;"
    "color:#1f2328;background:#ffffff;border:1px solid #d0d7de;border-radius:6px;padding:8px;"
    "overflow-x:auto;max-width:100%;line-height:1.4"
)
MAX_ROWS = limits.SNAPSHOT_ROWS
WIDGET_HAS_ALL = "the live widget shows them all"


def render_html(
    trace: Trace,
    variant: Optional[Trace] = None,
    sections: Iterable[str] = (),
    graph: bool = False,
    graph_timeout: Optional[float] = None,
    css: bool = True,
) -> str:
    """The snapshot of `trace`, or of `variant` compared with `trace`.

    `sections` are extra HTML fragments (already escaped by their makers)
    appended in order; `graph=True` adds the Graphviz SVG when it can be laid
    out. Both are the hooks for the graph, the stepper and the explanations.
    `css` writes the snapshot's short style sheet (`html_table.CSS`) once, at the top.
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
    sheet = f"<style>{CSS}</style>" if css else ""
    return f'<div class="autograd-magic agm-s" style="{BOX}">{sheet}' + "".join(p for p in parts if p) + "</div>"


# ---- hooks for other views ----
def section(title: str, body_html: str, open: bool = True) -> str:
    """A titled, foldable block for extra content (the title is escaped, the body is trusted HTML)."""
    flag = " open" if open else ""
    return f'<details{flag}><summary><b>{esc(title)}</b></summary><div>{body_html}</div></details>'


def clip(text: object, limit: int = limits.SNAPSHOT_TEXT_CHARS) -> str:
    """A message cut to `limit` characters (an error or a note can be any length)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
            line += muted(f"the real run failed: {esc(trace.error.type)}: {esc(clip(trace.error.message))}", "div")
    return f"<div>{line}</div>"


def error_text(error: TraceError) -> str:
    where = f" (line {error.line})" if error.line is not None else ""
    return f"{error.type}{where}: {clip(error.message)}"


def error_box(error: Optional[TraceError]) -> str:
    """The error at the top; it also appears in the table at its line."""
    if error is None:
        return ""
    return (
        f'<div style="{ERROR};padding:4px 8px;margin:6px 0;border-radius:4px;white-space:pre-wrap">'
        f"<b>{esc(error.type)}</b>{esc(' at line ' + str(error.line) if error.line is not None else '')}: "
        f"{esc(clip(error.message))}</div>"
    )


def passes_list(trace: Trace) -> str:
    if not trace.passes:
        return ""
    items = []
    shown = trace.passes[: limits.SNAPSHOT_PASS_ITEMS]
    for p in shown:
        where = f"line {p.line}: " if p.line is not None else ""
        text = f"backward pass {p.index + 1} ({p.kind}) — {where}"
        item = esc(text) + (f"<code>{esc(clip(p.expr, 200))}</code>" if p.expr else "")
        item += esc(f" — {len(p.steps)} nodes")
        if p.error:
            item += f' — <span style="{ERROR}">{esc(clip(p.error))}</span>'
        items.append(f"<li>{item}</li>")
    if len(trace.passes) > len(shown):
        items.append(f"<li>… {len(trace.passes) - len(shown)} more backward passes ({WIDGET_HAS_ALL})</li>")
    return f'<div style="margin-top:6px"><b>backward passes</b><ul style="margin:2px 0">{"".join(items)}</ul></div>'


def notes_list(trace: Trace) -> str:
    if not trace.notes:
        return ""
    notes = trace.notes[: limits.SNAPSHOT_WHY]
    items = "".join(f"<li>{esc(clip(n))}</li>" for n in notes)
    if len(trace.notes) > len(notes):
        items += f"<li>… {len(trace.notes) - len(notes)} more notes ({WIDGET_HAS_ALL})</li>"
    return f'<div style="{MUTED};margin-top:6px">notes<ul style="margin:2px 0">{items}</ul></div>'


def missing_from_variant(original: Trace, variant: Trace) -> str:
    """Tensors the real run made that the variant never reached (it stopped earlier)."""
    matched = match_records(original, variant)
    missing = [r for r in original.records if r.id not in matched and not (r.internal and not r.external)]
    if not missing:
        return ""
    names = clip(", ".join(r.label for r in missing))
    return muted(f"not made in the variant: <code>{esc(names)}</code>", "div")


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
        return f'<tr><th colspan="{len(COLUMNS)}" class="g" style="text-align:left"><i>{esc(text)}</i></th></tr>'
    source = clip(trace.source_line(line), 400)
    code = f' <code style="white-space:pre">{esc(source)}</code>' if source.strip() else ""
    return f'<tr><th colspan="{len(COLUMNS)}" class="g" style="text-align:left">{muted(f"line {line}")}{code}</th></tr>'


# ---- repeated numbered blocks: `layers.0` … `layers.5` listed once ----
_NUMBERED = re.compile(r"^(.*?)\.(\d+)(?=\.|$)")


@dataclass
class Elided:
    """Records of numbered blocks identical to the first one, left out of the listing."""

    prefix: str  # e.g. "m.layers"
    kept: list[int]  # block numbers still listed
    left_out: list[int]  # block numbers left out
    count: int  # records left out
    per_block: int  # records in each block

    def text(self) -> str:
        first, last = self.left_out[0], self.left_out[-1]
        blocks = f"{self.prefix}.{first}" + (f" … {self.prefix}.{last}" if last != first else "")
        like = f"{self.prefix}.{self.kept[0]}"
        n = len(self.left_out)
        return (
            f"{blocks}: {n} more block{'s' if n != 1 else ''} made of the same {self.per_block} tensors as {like} "
            f"({self.count} rows) left out here; {WIDGET_HAS_ALL}"
        )


def _numbered(r: Record) -> Optional[tuple[str, int, str]]:
    m = _NUMBERED.match(r.module or r.name or "")
    if not m:
        return None
    path = r.module or r.name or ""
    return m.group(1), int(m.group(2)), path[m.end():]


def elide_repeats(records: list[Record], keep: int = limits.SNAPSHOT_REPEAT_BLOCKS) -> list[Union[Record, Elided]]:
    """`records` with the numbered blocks that repeat the first `keep` blocks' tensors left out.

    A block is the records whose module path (or name) has one prefix and one number
    (`m.layers.3.linear1` is block 3 of `m.layers`); two blocks repeat when they hold the
    same ops of the same shapes under the same sub-paths. Needs three alike to fold.
    """
    blocks: dict[str, dict[int, list[Record]]] = {}
    for r in records:
        nb = _numbered(r)
        if nb:
            blocks.setdefault(nb[0], {}).setdefault(nb[1], []).append(r)
    dropped: dict[int, Elided] = {}  # first dropped record id -> its marker
    gone: set[int] = set()
    for prefix, by_index in blocks.items():
        if len(by_index) < 3:
            continue
        order = sorted(by_index)
        sig = {i: sorted((_numbered(r)[2], r.op, r.shape or ()) for r in by_index[i]) for i in order}
        kept = order[:keep]
        alike = [i for i in order[keep:] if sig[i] == sig[kept[0]]]
        if len(alike) < 2:
            continue
        out = [r for i in alike for r in by_index[i]]
        first = min(r.id for r in out)
        gone |= {r.id for r in out}
        dropped[first] = Elided(prefix, kept, alike, len(out), len(by_index[kept[0]]))
    if not gone:
        return list(records)
    result: list[Union[Record, Elided]] = []
    for r in records:
        if r.id in dropped:
            result.append(dropped[r.id])
        if r.id not in gone:
            result.append(r)
    return result


def _note_row(text: str) -> str:
    return full_row(muted(esc(text)))


def _rows(items: list[Union[Record, Elided]], trace: Trace, originals, compare: bool, budget: "_Budget") -> str:
    out = []
    for it in items:
        if isinstance(it, Elided):
            out.append(_note_row("⋯ " + it.text()))
            continue
        html = row(it, trace, originals.get(it.id), compare)
        if not budget.take(html):
            budget.left_out += 1
            continue
        out.append(html)
    return "".join(out)


class _Budget:
    """Rows and bytes left for the table; what did not fit is counted."""

    def __init__(self, rows: int, size: int) -> None:
        self.rows, self.size, self.left_out = rows, size, 0

    def take(self, html: str) -> bool:
        if self.rows <= 0 or self.size - len(html) < 0:
            self.rows = 0  # once full, stay full: rows are never shown out of order
            return False
        self.rows, self.size = self.rows - 1, self.size - len(html)
        return True


def folded(records: list[Record], trace: Trace, originals: dict[int, Record], compare: bool, budget: Optional[_Budget] = None) -> str:
    """Ops that ran inside functions and modules, folded under their call line."""
    if not records:
        return ""
    budget = budget or _Budget(len(records), 1 << 62)
    where = sorted({r.internal for r in records if r.internal})
    items = elide_repeats(records)
    listed = [it for it in items if not isinstance(it, Elided)]
    capped = len(listed) > limits.SNAPSHOT_CALL_ROWS
    if capped:  # the first ops of the call, then a count
        keep = {r.id for r in listed[: limits.SNAPSHOT_CALL_ROWS]}
        cut = next(i for i, it in enumerate(items) if not isinstance(it, Elided) and it.id not in keep)
        rest = sum(1 for it in items[cut:] if not isinstance(it, Elided))
        rest += sum(it.count for it in items[cut:] if isinstance(it, Elided))
        items = items[:cut]
    rows = _rows(items, trace, originals, compare, budget)
    if capped:
        rows += _note_row(f"… {rest} more ops inside this call are left out here; {WIDGET_HAS_ALL}")
    where_text = ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else "")
    summary = f"{len(records)} op{'s' if len(records) != 1 else ''} inside " + where_text
    inner = (
        f'<details><summary style="{MUTED}">{esc(summary)}</summary>'
        f'<table style="width:100%;table-layout:auto">{rows}</table></details>'
    )
    return full_row(inner)


def line_extras(trace: Trace, line: Optional[int]) -> str:
    out = []
    here = [p for p in trace.passes if p.line == line and line is not None]
    for p in here[:3]:
        out.append(_note_row(f"↳ backward pass {p.index + 1}: {len(p.steps)} nodes"))
    if len(here) > 3:
        out.append(_note_row(f"↳ … and {len(here) - 3} more backward passes on this line"))
    err = trace.error
    if err is not None and err.line == line and line is not None:
        out.append(full_row(f'<span style="white-space:pre-wrap">{esc(error_text(err))}</span>', ERROR))
    return "".join(out)


def table(
    trace: Trace, original: Optional[Trace] = None, max_rows: int = MAX_ROWS, max_bytes: int = limits.SNAPSHOT_TABLE_BYTES
) -> str:
    """The rows of `trace`, grouped by line; against `original` when it is a variant.

    At most `max_rows` rows and about `max_bytes` of them; repeated numbered blocks
    are listed once and long calls capped (`elide_repeats`, `folded`).
    """
    originals: dict[int, Record] = {}
    if original is not None:
        originals = {vid: original.records[oid] for oid, vid in match_records(original, trace).items()}
    compare = original is not None
    groups = trace.lines()
    budget = _Budget(max_rows, max_bytes)
    body = []
    for line in line_order(trace):
        records = groups.get(line, [])
        visible = [r for r in records if not (r.internal and not r.external)]
        inside = [r for r in records if r.internal and not r.external]
        rows = _rows(elide_repeats(visible), trace, originals, compare, budget)
        if inside and budget.rows > 0:
            rows += folded(inside, trace, originals, compare, budget)
        elif inside:
            budget.left_out += len(inside)
        extras = line_extras(trace, line)
        if not rows and not extras:
            continue
        head = group_header(trace, line)
        budget.size -= len(head) + len(extras)  # the line's header counts against the bytes too
        body.append("<tbody>" + head + rows + extras + "</tbody>")
    if budget.left_out:
        text = f"{budget.left_out} more tensors are not shown here (the interactive view and str(trace) show them all)"
        body.append("<tbody>" + _note_row(text) + "</tbody>")
    if not trace.records:
        body.append("<tbody>" + _note_row("no tensors were made") + "</tbody>")
    return f"<table{TABLE_LAYOUT}>{header_row()}{''.join(body)}</table>"
