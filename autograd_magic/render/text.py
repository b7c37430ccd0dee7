"""The text view: what terminal IPython and `text/plain` show."""

from __future__ import annotations

from .. import limits
from ..data.trace import Record, Trace, op_run
from .debug import text_lines as debug_lines
from ..explain.errors import explain_error
from ..explain.fold import call_outputs
from ..explain.format import format_short, format_shape
from ..explain import wording
from ..explain.wording import flags, gradient_cell, variant_description


def _grad_text(r: Record, trace: Trace) -> str:
    """What reached the tensor; marked when torch keeps none of it in `.grad` (a non-leaf, autograd.grad)."""
    text, note = gradient_cell(r, trace, lambda g: format_short(g, 30))
    return f"{text} (received; .grad None)" if note and text not in ("None", "—") else text


def _flags(r: Record) -> str:
    """requires_grad and is_leaf have no columns here: they lead the flags."""
    return ", ".join((["requires_grad"] if r.requires_grad else []) + (["leaf"] if r.is_leaf else []) + flags(r))


def render_text(trace: Trace, width: int = 120) -> str:
    head = f"autograd trace: {len(trace.records)} tensors, {len(trace.passes)} backward pass(es)"
    if trace.variant_of is not None or trace.grad_mode == "no_grad" or trace.detached:
        head += f"  [variant: {variant_description(trace)}]"
    lines = [head]
    try:
        lines.extend(debug_lines(trace))  # the first NaN/Inf (issue 16); nothing when all is finite
    except Exception:
        pass
    rows = [("line", "name / expression", "value", "shape", "flags", "grad_fn", "grad")]
    results = call_results(trace.records)
    for r in trace.records:
        if r.internal and not r.external and r.id not in results:
            continue  # module and function internals: folded into their call site, which shows its result
        label = r.label
        if r.inplace and r.expr and wording.statement_of(r):  # `h += 1` changes h: its own text, no `h = `
            label = wording.statement_of(r)
        elif r.name and r.expr and r.expr != r.name:
            label = f"{r.name} = {r.expr}"
        run = op_run(trace, r)
        if run > 1:
            label += f"  #{run}"
        rep = trace.repeats.get(r.id)
        if rep:
            label += f"  (+{rep} more runs)"
        rows.append(
            (
                str(r.line) if r.line else "",
                label,
                format_short(r.preview, 36),
                format_shape(r.preview),
                _flags(r),
                r.grad_fn or "",
                _grad_text(r, trace),
            )
        )
    left_out = max(len(rows) - 1 - limits.TEXT_ROWS, 0)  # text/plain goes into the notebook file too
    rows = rows[: limits.TEXT_ROWS + 1]
    internal = sum(1 for r in trace.records if r.internal and not r.external and r.id not in results)
    widths = [min(max(len(row[i]) for row in rows), cap) for i, cap in enumerate((5, 40, 36, 12, 72, 26, 52))]
    for row in rows:
        cells = [(c if len(c) <= w else c[: w - 1] + "…").ljust(w) for c, w in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    if left_out:
        lines.append(f"… {left_out} more tensors (trace.records and the live widget have them all)")
    if internal:
        lines.append(f"({internal} ops inside functions and modules folded into their call lines)")
    for p in trace.passes[: limits.SNAPSHOT_PASS_ITEMS]:
        where = f"line {p.line}: {p.expr}" if p.line else p.kind
        lines.append(f"backward pass {p.index + 1} ({where}): {len(p.steps)} nodes" + (f" — {p.error}" if p.error else ""))
    if len(trace.passes) > limits.SNAPSHOT_PASS_ITEMS:
        lines.append(f"… {len(trace.passes) - limits.SNAPSHOT_PASS_ITEMS} more backward passes")
    lines.extend(_gradcheck_lines(trace))
    if trace.error:
        e = trace.error
        lines.append(f"error at line {e.line}: {e.type}: {e.message}")
        why = explain_error(trace)
        if why:
            lines.append(f"why: {why}")
    for note in trace.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _gradcheck_lines(trace: Trace) -> list[str]:
    """`--check`'s verdict per leaf, as the snapshot's table has it; none when the check was not run."""
    checks = trace.gradcheck
    if checks is None:
        return []
    if not checks:
        return ["gradient check: no leaf received a gradient in the first backward pass"]
    lines = ["gradient check (the first backward pass against central finite differences, float64, sandboxed re-run):"]
    mark = {True: "✓", False: "✗"}
    for c in checks:
        errs = "" if c.max_abs_err is None else f", max abs err {c.max_abs_err:.2e}, max rel err {c.max_rel_err:.2e}"
        text = f"  {mark.get(c.ok, '?')} {c.name}: {wording.verdict(c.ok)} ({c.elements_checked} elements{errs})"
        lines.append(text + (f": {c.note}" if c.note else ""))
    return lines


def call_results(records: list[Record]) -> set[int]:
    """The record of what each call of the cell returned (`y = lin(x)`): the text table's row for
    the call, whose ops are folded. A call that only changes tensors in place (`opt.step()`) has none."""
    return {i for i in call_outputs(records) if not records[i].inplace}
