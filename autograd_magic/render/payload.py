"""Trace -> JSON-able dicts for the widget's front end.

The front end only draws what it is given: every string here comes from the
Trace (names, source text, printed values) and is placed in the page with
`textContent`, never parsed as HTML. Size is bounded so a trace of thousands of
ops stays well under a megabyte: values are one-line previews (the full print
is sent only for the selected row, see `build_detail`), ops inside functions
and modules are folded under their call line with only the first few sent,
and past `MAX_ROWS` rows the table says how many more there are.
"""

from __future__ import annotations

from typing import Any, Optional

from ..data.identity import changed_fields, match_records
from ..data.trace import Preview, Record, Trace, op_run
from ..explain.errors import explain_error
from .debug import debug_payload
from ..explain.format import format_record_value, format_shape, format_short, format_stats, format_tensor, values_printout
from ..explain.stepper import steps as stepper_steps
from ..explain.why import explain_record
from ..explain.wording import (
    flags, gradient_cell, hides_value, made_in, record_label, uninitialised_value, variant_description,
)
from .. import limits

MAX_ROWS = limits.WIDGET_ROWS
FIRST_ROWS = limits.WIDGET_FIRST_ROWS
INTERNAL_PER_CALL = limits.WIDGET_ROWS_PER_CALL
MAX_STEPS = limits.WIDGET_STEPS
FIRST_STEPS = limits.WIDGET_FIRST_STEPS
SHORT = 60  # characters of a one-line value
CELL_LINES, CELL_WIDTH = 4, 72  # a value printed in a table cell; larger ones are summarized
TEXT = limits.WIDGET_TEXT


def _clip(text: Optional[str], limit: int = TEXT) -> Optional[str]:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


# Every element prints at least one character and is parted from the next by at least one
# more (", " on a line, "," then a line break across lines): n values take 2n - 1 characters
# besides line breaks, and 3n once joined on one line. Past these counts the printout can't fit
# a table cell or a one-line value, and formatting every value to find that out is skipped.
CELL_MAX_VALUES = (CELL_LINES * CELL_WIDTH) // 2


def _summary(p: Preview) -> str:
    """`format_short`'s line for a value too long to print on one line: `[2x3] mean 4.5`."""
    dims = "x".join(map(str, p.shape))
    return f"[{dims}]" + (f" mean {p.mean:.4g}" if p.mean is not None else "")


def cell_value(p: Optional[Preview]) -> str:
    """A table cell's value: the body `print(tensor)` shows, or a one-line summary when large.

    The same text as `format_values` when it fits CELL_LINES x CELL_WIDTH, else `format_short`'s
    line; values that cannot fit are not formatted at all (a big model's rows, each one's
    preview a 6x6x6 block, cost most of the table's time before)."""
    if p is None or p.values is None:
        return format_short(p, SHORT)
    size = getattr(p.values, "size", None)
    if size is not None and size > CELL_MAX_VALUES:
        return _summary(p)  # as format_short says it: 3n > SHORT characters on one line
    po = values_printout(p, indent=0)
    if 3 * po.size > SHORT and (
        po.min_lines > CELL_LINES or any(po.min_line_chars(i) > CELL_WIDTH for i in range(po.min_lines))
    ):
        return _summary(p)  # the layout alone shows it can't fit, nor go on one line
    text = po.text()
    lines = text.splitlines()
    if len(lines) <= CELL_LINES and all(len(line) <= CELL_WIDTH for line in lines):
        return text
    short = " ".join(text.split())  # format_short's text, without formatting the values again
    return short if len(short) <= SHORT else _summary(p)


# ---- gradients in words (explain/wording.py says them for every view) -----------------------


def grad_cells(record: Record, trace: Trace) -> tuple[str, Optional[str]]:
    """The gradient column: (value, note)."""
    text, note = gradient_cell(record, trace, cell_value)
    return text, note or None


def _match(original: Trace, variant: Trace) -> dict[int, int]:
    """Variant record id -> original record id (the table is keyed by the variant)."""
    return {v: o for o, v in match_records(original, variant).items()}


# ---- rows ------------------------------------------------------------------------------------


def _row(r: Record, trace: Trace) -> dict[str, Any]:
    grad, note = grad_cells(r, trace)
    row: dict[str, Any] = {
        "id": r.id,
        "label": _clip(record_label(r), 120),
        "name": r.name,
        "expr": _clip(r.expr, 120) if r.expr != r.name and not hides_value(r) else None,
        "value": uninitialised_value(trace, r) if hides_value(r) else cell_value(r.preview),
        "shape": format_shape(r.preview),
        "dtype": (r.dtype or "").replace("torch.", ""),
        "requires_grad": r.requires_grad,
        "is_leaf": r.is_leaf,
        "grad_fn": r.grad_fn,
        "grad": grad,
    }
    optional = {
        "grad_note": note,
        "external": r.external and not r.created_by,
        "detached": r.detached,
        "no_grad": not r.grad_enabled and not (r.external and r.line is None),  # an input: not made here
        "made_in": made_in(r),  # "from cell [2], line 3"
        "inplace": r.inplace,
        "occurrence": op_run(trace, r) - 1,  # the run of its op on its line the row shows, less one
        "repeats": trace.repeats.get(r.id, 0),
        "internal": r.internal,
    }
    row.update({k: v for k, v in optional.items() if v})  # omit falsy extras: payload size
    return row


def _was(orig: Record, original: Trace, fields: set[str]) -> dict[str, Any]:
    """The original run's text for each changed column (shown as a tooltip / "was ...")."""
    ref = _row(orig, original)
    out = {f: ref.get(f) for f in fields if f in ref}
    if "value" in fields or "preview" in fields:
        out["value"] = ref["value"]
    return out


def _line_groups(trace: Trace) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for line, records in trace.lines().items():
        source = trace.source_line(line).strip() if line is not None else ""
        groups.append({"line": line, "source": _clip(source, 200), "records": records})
    return groups


def build_payload(
    trace: Trace,
    original: Optional[Trace] = None,
    *,
    can_rerun: bool = True,
    max_rows: int = FIRST_ROWS,
    first_steps: int = FIRST_STEPS,
) -> dict[str, Any]:
    """What the first screen draws: the table's first `max_rows` rows, the banner, each pass
    with its first `first_steps` steps. `original` marks `trace` as a variant.

    The rest comes when the page asks: more rows (`build_rows`), more steps (`build_steps`),
    the selected row (`build_detail`). `more_rows` says how many rows are left to ask for."""
    lines_out, hidden, more = _table(trace, original, 0, max_rows)
    return {
        "variant": _variant_info(trace) if original is not None else None,
        "lines": lines_out,
        "hidden_rows": hidden,
        "more_rows": more,
        "records": len(trace.records),
        "passes": [_pass(trace, p.index, first_steps) for p in trace.passes],
        "error": _error(trace),
        "notes": [_clip(n) for n in trace.notes],
        "can_rerun": can_rerun,
        "debug": _debug(trace),
    }


def _debug(trace: Trace) -> Optional[dict[str, Any]]:
    """The NaN/Inf banner and the gradient-flow chart (render/debug.py); never breaks the view."""
    try:
        return debug_payload(trace)
    except Exception:
        return None


def build_rows(trace: Trace, original: Optional[Trace], start: int, count: int = FIRST_ROWS) -> dict[str, Any]:
    """Table rows `start` to `start + count` (in the order `build_payload` lists them), grouped by line.

    A call folded on an earlier page lists here only its further rows (`"more": True`);
    its count is the whole call's, as on the first page."""
    start = max(0, int(start))
    count = max(1, min(int(count), MAX_ROWS))
    lines_out, hidden, more = _table(trace, original, start, count)
    return {"start": start, "lines": lines_out, "hidden_rows": hidden, "more_rows": more}


def _table(trace: Trace, original: Optional[Trace], start: int, count: int) -> tuple[list, int, int]:
    """(line groups with the rows numbered start..start+count-1, rows never sent, rows left to ask for).

    Rows are numbered in table order, folded ops included (the first INTERNAL_PER_CALL of each
    call); rows past MAX_ROWS are never sent, only counted (`hidden`)."""
    oid = _match(original, trace) if original is not None else {}
    by_id = {r.id: r for r in original.records} if original is not None else {}
    index, stop = 0, min(start + count, MAX_ROWS)
    lines_out, hidden, more = [], 0, 0
    for group in _line_groups(trace):
        rows, folded = [], {}
        for r in group["records"]:
            if r.internal and not r.external:
                call = folded.setdefault(r.internal, {"call": r.internal, "count": 0, "rows": [], "index": index})
                call["count"] += 1
                if call["count"] > INTERNAL_PER_CALL:
                    continue
                target = call["rows"]
            else:
                target = rows
            n, index = index, index + 1
            if n >= MAX_ROWS:
                hidden += target is rows  # folded ops are already counted by their call
                continue
            if n >= stop:
                more += 1
                continue
            if n < start:
                continue
            row = _row(r, trace)
            if original is not None:
                _mark_changes(row, r, oid, by_id, original, trace)
            # requires_grad flips apply to leaves of the real run (the toggle re-runs from it)
            base = by_id.get(row.get("oid")) if original is not None else r
            if base is not None and base.is_leaf:
                row["can_flip"] = True
            target.append(row)
        calls = []
        for call in folded.values():
            first = call.pop("index")
            if first >= MAX_ROWS:
                listed = start == 0  # never on a page: counted on the first one
            elif first >= stop:
                listed = False  # listed on the page its first row is on
            elif first < start:
                listed = bool(call["rows"])  # listed on an earlier page: only its further rows
                call["more"] = True
            else:
                listed = True
            if listed:
                calls.append(call)
        if rows or calls:
            lines_out.append({"line": group["line"], "source": group["source"], "rows": rows, "folded": calls})
    return lines_out, hidden, more


def _mark_changes(row: dict, r: Record, oid: dict, by_id: dict, original: Trace, trace: Trace) -> None:
    o = oid.get(r.id)
    if o is None or o not in by_id:
        row["new"] = True  # ran only in the variant
        return
    row["oid"] = o
    fields = changed_fields(by_id[o], r)
    if fields:
        row["changed"] = sorted("value" if f == "preview" else f for f in fields)
        row["was"] = _was(by_id[o], original, fields)


def _variant_info(trace: Trace) -> dict[str, Any]:
    return {"grad_mode": trace.grad_mode, "detached": list(trace.detached), "text": variant_description(trace)}


def _error(trace: Trace) -> Optional[dict[str, Any]]:
    e = trace.error
    if e is None:
        return None
    explained = explain_error(trace)
    return {
        "type": e.type,
        "message": _clip(e.message),
        "line": e.line,
        "expr": _clip(e.expr, 200),
        "explain": _clip(explained),
    }


# ---- the backward stepper ------------------------------------------------------------------


def _pass(trace: Trace, index: int, first_steps: int = FIRST_STEPS) -> dict[str, Any]:
    """A pass's summary and its first steps; `n_steps` says how many there are in all."""
    p = trace.passes[index]
    total = min(len(p.steps), MAX_STEPS)
    return {
        "index": p.index,
        "kind": p.kind,
        "line": p.line,
        "expr": _clip(p.expr, 200),
        "error": _clip(p.error),
        "steps": _steps(trace, index, 0, min(first_steps, total)),
        "n_steps": total,
        "more_steps": max(0, len(p.steps) - MAX_STEPS),
    }


def build_steps(trace: Trace, index: int, start: int, count: int = FIRST_STEPS) -> dict[str, Any]:
    """Steps `start` to `start + count` of pass `index` (what the stepper asks for as it walks)."""
    if not 0 <= index < len(trace.passes):
        return {"pass": index, "start": start, "steps": []}
    total = min(len(trace.passes[index].steps), MAX_STEPS)
    start = max(0, min(int(start), total))
    stop = min(total, start + max(1, min(int(count), MAX_STEPS)))
    return {"pass": index, "start": start, "steps": _steps(trace, index, start, stop)}


def _steps(trace: Trace, index: int, start: int = 0, stop: Optional[int] = None) -> list[dict[str, Any]]:
    return [
        {"i": s.index, "node": s.node, "records": list(s.records), "text": _clip(s.text)}
        for s in stepper_steps(trace, index, start, stop)
    ]


# ---- the detail panel ----------------------------------------------------------------------


def build_detail(trace: Trace, rid: int, original: Optional[Trace] = None) -> dict[str, Any]:
    """The selected row in full: printed value, stats, source line, each pass's gradient, why."""
    if not 0 <= rid < len(trace.records):
        return {}
    r = trace.records[rid]
    out: dict[str, Any] = {
        "id": r.id,
        "label": _clip(record_label(r), 200),
        "line": r.line,
        "source": _clip(trace.source_line(r.line).strip(), 300),
        "value": uninitialised_value(trace, r) if hides_value(r) else format_record_value(r),
        "stats": None if hides_value(r) else format_stats(r.preview),
        "shape": format_shape(r.preview),
        "dtype": r.dtype,
        "facts": _facts(r),
        "inputs": [{"id": i, "label": _clip(record_label(trace.records[i]), 80)} for i in r.inputs if 0 <= i < len(trace.records)],
        "passes": _detail_passes(trace, r),
        "attr_grad": format_tensor(r.attr_grad) if r.attr_grad is not None else None,
        "attr_grad_stats": format_stats(r.attr_grad),
        "why": _why(trace, r),
    }
    if original is not None:
        o = _match(original, trace).get(rid)
        if o is not None and 0 <= o < len(original.records):
            orig = original.records[o]
            out["original"] = {"value": format_record_value(orig), "grad": grad_cells(orig, original)[0]}
    return out


def _facts(r: Record) -> list[str]:
    facts = [
        f"requires_grad={r.requires_grad}",
        f"is_leaf={r.is_leaf}",
        f"grad_fn={('<' + r.grad_fn + '>') if r.grad_fn else None}",
    ] + flags(r)
    if r.internal:
        facts.append(f"inside {r.internal}")
    if r.module:
        facts.append(f"module {r.module}")
    if r.retains_grad:
        facts.append("retain_grad() was called")
    return facts


def _detail_passes(trace: Trace, r: Record) -> list[dict[str, Any]]:
    # a record found past --limit (a loop's first NaN/Inf) was made after this many backward calls:
    # the recorded passes among them ran before it existed
    earlier = set()
    if r.run is not None and r.iteration:
        earlier = {it.pass_index for it in trace.iterations if it.pass_index is not None and it.index < r.iteration}
    out = []
    for p in trace.passes:
        g = r.grads.get(p.index)
        where = f"line {p.line}: {p.expr}" if p.line else p.kind
        out.append(
            {
                "index": p.index,
                "where": _clip(where, 200),
                "grad": format_tensor(g) if g is not None else None,
                "stats": format_stats(g),
                "before": p.index in earlier,
            }
        )
    return out


def _why(trace: Trace, r: Record) -> list[str]:
    return [_clip(s) for s in explain_record(trace, r.id)]
