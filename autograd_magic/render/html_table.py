"""The table of intermediates as static HTML: one row per tensor, grouped by line.

Every cell is built by a small function the widget can reuse. All text that
comes from the user (names, source, values, errors) goes through `esc`.

Styling, sized for a notebook file: the look (padding, fonts, badges) comes from
one short `<style>` block scoped to `.agm-s` (`CSS`, written once per snapshot)
and short class names; what carries meaning stays inline on the few elements
that need it (a changed cell's highlight, an error, muted secondary text), so it
survives where style blocks are dropped (Lab's sanitizer for untrusted output,
GitHub's renderer), and the table stays a plain `<table>` the host styles.
Large values are shown as their first lines and exact statistics: the live
widget has the full preview.
"""

from __future__ import annotations

import html
from typing import Optional

from ..data.identity import changed_fields
from ..explain import wording
from ..explain.wording import flags, grad_phrase
from ..explain.format import Printout, format_short, format_shape, format_stats, record_printout, tensor_printout
from ..data.trace import Preview, Record, Trace, op_run

from .. import limits

CHANGED = "background:#fff1b8"
MUTED = "color:#57606a;font-size:11px"
ERROR = "background:#ffebe9;color:#82071e"
# The snapshot's style sheet: every rule under `.agm-s` (the snapshot's box), nothing fetched.
CSS = (
    ".agm-s table{border-collapse:collapse;margin:6px 0;font-size:12px;color:#1f2328}"
    ".agm-s td,.agm-s th{padding:3px 8px;border:0;border-top:1px solid #d0d7de;vertical-align:top;"
    "text-align:left;background:none;color:#1f2328}"
    ".agm-s th{border-bottom:2px solid #d0d7de}"
    ".agm-s th.g{padding:6px 8px 2px;background:#f6f8fa;font-weight:normal}"
    ".agm-s code,.agm-s pre,.agm-s .m{font-family:Menlo,Consolas,'Liberation Mono',monospace}"
    ".agm-s pre{margin:0;white-space:pre;font-size:12px;background:transparent;padding:0;color:inherit}"
    ".agm-s .w{white-space:pre-wrap}"
    ".agm-s .b{display:inline-block;margin-left:1px;padding:0 4px;border-radius:3px;font-size:10px;"
    "background:#eaeef2;color:#24292f}"
    ".agm-s summary{cursor:pointer}"
)
# the widget's order (widget.js MAIN_COLUMNS, MORE_COLUMNS): the gradient beside the value, so a
# snapshot narrower than the table (GitHub, a notebook pane) still shows both without scrolling
COLUMNS = ("tensor", "value", "gradient", "grad_fn", "requires_grad", "is_leaf", "shape", "dtype")


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


# Where the style sheet is dropped (Lab's untrusted output, GitHub), the host's own table rules
# apply: Lab's lay a table out in equal fixed columns and let a <pre> wrap, which folds a printed
# tensor into a narrow column. These two inline rules, one per table and one per long value, keep
# the columns as wide as their content and a value as torch printed it.
TABLE_LAYOUT = ' style="table-layout:auto"'
PRE_LAYOUT = ' style="white-space:pre"'


def pre(text: str) -> str:
    """A printed value; kept unwrapped inline when it has several lines (a one-liner may wrap)."""
    return f"<pre{PRE_LAYOUT if chr(10) in text else ''}>{esc(text)}</pre>"


def muted(html_text: str, tag: str = "span") -> str:
    """Secondary text (already escaped): grey and small, inline so it stays so everywhere."""
    return f'<{tag} style="{MUTED}">{html_text}</{tag}>'


def badge(text: str, style: str = "") -> str:
    """A small tag after a name; the space before it separates them where the sheet is dropped."""
    if style:
        return f' <span class="b" style="{style}">{esc(text)}</span>'
    return f' <span class="b">{esc(text)}</span>'


def header_row() -> str:
    cells = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    return f"<thead><tr>{cells}</tr></thead>"


def compact_value(text: str) -> str:
    """A printed tensor cut to its first lines when it is long (the statistics follow it)."""
    lines = text.splitlines()
    if len(lines) <= limits.SNAPSHOT_VALUE_LINES and len(text) <= limits.SNAPSHOT_VALUE_CHARS:
        return text
    kept, size = [], 0
    for line in lines[: limits.SNAPSHOT_VALUE_HEAD]:
        if size + len(line) > limits.SNAPSHOT_VALUE_CHARS and kept:
            break
        kept.append(line[: limits.SNAPSHOT_VALUE_CHARS])
        size += len(line)
    return "\n".join(kept) + "\n        …"


def compact_printout(po: Printout) -> tuple[str, bool]:
    """`compact_value` of the printout's text, and whether it was cut, formatting only what is
    shown: when the layout alone proves the text too long (more lines, or more characters at
    least, than a value shown whole may have), only the head's lines are formatted."""
    if po.min_lines <= limits.SNAPSHOT_VALUE_LINES and po.min_chars() <= limits.SNAPSHOT_VALUE_CHARS:
        text = po.text()  # may fit: formatted whole (a few lines at most)
        short = compact_value(text)
        return short, short != text
    kept: list[str] = []
    size = 0
    for i in range(limits.SNAPSHOT_VALUE_HEAD):  # compact_value's loop, over lines formatted on demand
        line = po.line(i, limits.SNAPSHOT_VALUE_CHARS - size if kept else limits.SNAPSHOT_VALUE_CHARS)
        if line is None:
            break
        if size + len(line) > limits.SNAPSHOT_VALUE_CHARS and kept:
            break
        kept.append(line[: limits.SNAPSHOT_VALUE_CHARS])
        size += len(line)
    return "\n".join(kept) + "\n        …", True


def value_html(p: Optional[Preview], po: Printout) -> str:
    """The tensor as torch prints it (`po`) in full when short, else its head and exact stats."""
    short, cut = compact_printout(po)
    if not cut:
        return pre(short)
    stats = format_stats(p)
    return pre(short) + (muted(esc(stats), "div") if stats else "")


# ---- cells of one row ----
def label_cell(r: Record, trace: Trace) -> str:
    parts = []
    if wording.hides_value(r):  # a module's torch.empty, named as what it is (not after the call's line)
        parts.append(f"<code>{esc(wording.record_label(r))}</code>")
    elif r.name and not wording.statement_of(r):  # `h += 1` changes h: its own text, no `h = ` before it
        parts.append(f'<b class="m">{esc(r.name)}</b>')
    if r.expr and r.expr != r.name and not wording.hides_value(r):
        prefix = " = " if r.name and not wording.statement_of(r) else ""
        parts.append(f'{esc(prefix)}<code class="w">{esc(wording.statement_of(r) or r.expr)}</code>')
    if not parts:
        parts.append(f"<code>{esc(r.op)}</code>")
    run = op_run(trace, r)
    if run > 1:
        parts.append(badge(f"#{run}"))
    total = repeat_total(r, trace)
    if total:
        parts.append(badge(f"×{total}"))
    for flag in badges(r):
        parts.append(badge(flag))
    return "".join(parts)


def repeat_total(r: Record, trace: Trace) -> int:
    """How many times the loop site of `r` ran, when some runs were not kept (else 0)."""
    extra = trace.repeats.get(r.id)
    if not extra:
        return 0
    kept = sum(1 for o in trace.records if o.span == r.span and o.output_index == r.output_index)
    return kept + extra


def badges(r: Record) -> list[str]:
    """The record's flags in words, then the module it ran in."""
    return flags(r) + ([r.module] if r.module else [])


def gradient_cell(r: Record, trace: Trace) -> str:
    """The gradient as torch prints it, or "—" before any backward, or why `.grad` is None."""
    text, note = wording.gradient_cell(r, trace, lambda g: value_html(g, tensor_printout(g)))
    if r.grad_preview is not None:
        body = text  # already HTML
        if len(r.grads) > 1 and r.attr_grad is None:
            body += muted(f"from backward pass {max(r.grads) + 1} of {len(trace.passes)}", "div")
        if note:  # the gradient flowed through, but torch does not keep it in `.grad`
            body += muted(esc(note), "div")
        return body
    if not trace.passes:
        return esc(text)
    return muted(esc(grad_phrase(r, trace)))


def value_cells(r: Record, trace: Trace) -> dict[str, str]:
    """Column name -> inner HTML of each cell of the row for `r`."""
    p = r.preview
    return {
        "tensor": label_cell(r, trace),
        "value": (
            esc(wording.uninitialised_value(trace, r)) if wording.hides_value(r)
            else value_html(p, record_printout(r)) if p is not None else esc("—")
        ),
        "shape": esc(format_shape(p)),
        "dtype": esc(p.dtype.replace("torch.", "") if p else ""),
        "requires_grad": esc(r.requires_grad),
        "is_leaf": esc(r.is_leaf),
        "grad_fn": f"<code>{esc(r.grad_fn)}</code>" if r.grad_fn else esc("None"),
        "gradient": gradient_cell(r, trace),
    }


_FIELD_COLUMN = {"value": "value", "requires_grad": "requires_grad", "is_leaf": "is_leaf",
                 "grad_fn": "grad_fn", "grad": "gradient", "detached": "tensor"}


def was_text(field: str, orig: Record) -> str:
    """What the original run showed in a changed cell, in one short line."""
    if field == "value":
        return format_short(orig.preview)
    if field == "grad":
        g = orig.grad_preview
        return format_short(g) if g is not None else (grad_phrase(orig) or "None")
    if field == "grad_fn":
        return orig.grad_fn or "None"
    return str(getattr(orig, field))


def row(r: Record, trace: Trace, orig: Optional[Record] = None, compare: bool = False) -> str:
    """One table row; with `compare`, changed cells are highlighted and show the original."""
    cells = value_cells(r, trace)
    styles = {c: "" for c in COLUMNS}
    if compare and orig is None:
        cells["tensor"] += badge("only in the variant", CHANGED)
    if orig is not None:
        for field in sorted(changed_fields(orig, r)):
            col = _FIELD_COLUMN[field]
            styles[col] = f' style="{CHANGED}"'
            cells[col] += f'<div style="{MUTED}" data-changed="{esc(field)}">was: {esc(was_text(field, orig))}</div>'
    tds = "".join(f"<td{styles[c]}>{cells[c]}</td>" for c in COLUMNS)
    return f'<tr data-record="{r.id}">{tds}</tr>'


def full_row(inner: str, style: str = "") -> str:
    """A row across every column, its text from the left (hosts right-align cells: Lab does)."""
    attr = f' style="text-align:left;{style}"' if style else ' style="text-align:left"'
    return f'<tr><td colspan="{len(COLUMNS)}"{attr}>{inner}</td></tr>'
