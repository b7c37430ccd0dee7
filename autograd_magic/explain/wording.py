"""One wording for every view: a fact is said the same way in text, HTML, DOT and the widget.

The gradient cell ("—" before any backward, the value, or "None" and why),
why `.grad` is None, a record's flags, a variant's description and the
gradient check's verdicts. Views choose only how to print a value
(`format_short` in a narrow column, the full print in a wide one).
"""

from __future__ import annotations

import ast
import re

from typing import Callable, Optional

from ..data.checks import LeafCheck
from ..data.trace import DATA_SET, REQUIRES_GRAD_SET, Preview, Record, Trace

NO_BACKWARD_YET = "—"  # the gradient column before the cell ran any backward pass


def grad_phrase(record: Record, trace: Optional[Trace] = None) -> str:
    """Why `.grad` is None for this tensor, e.g. "None (non-leaf, no retain_grad)"; "" when it is set.

    With `trace`, a leaf that would get a gradient but has none says "no
    backward yet" when the cell ran no backward pass, "backward failed" when
    every pass raised.
    """
    if record.attr_grad is not None:
        return ""
    if record.detached:
        return "None (detached)"
    if not record.requires_grad:
        if not record.grad_enabled:
            return "None (made under no_grad)"
        return "None (requires_grad=False)"
    if not record.is_leaf and not record.retains_grad:
        return "None (non-leaf, no retain_grad)"
    if trace is not None and not trace.passes:
        return "None (no backward yet)"
    if trace is not None and record.grads and all(
            i < len(trace.passes) and trace.passes[i].kind == "grad" for i in record.grads):
        return "None (autograd.grad returned it: .grad is untouched)"
    if trace is not None and all(p.error for p in trace.passes):
        return "None (backward failed)"
    return "None (backward did not reach it)"


def gradient_cell(record: Record, trace: Trace, fmt: Callable[[Preview], str]) -> tuple[str, str]:
    """(the gradient column, a note): `fmt` of the gradient the record received, "—" before any
    backward, or "None" with the reason. The note says why `.grad` is None when the value
    shown is only what backward sent through (a non-leaf without retain_grad)."""
    g = record.grad_preview
    phrase = grad_phrase(record, trace)
    if g is not None:
        return fmt(g), (f".grad {phrase}" if phrase else "")
    if not trace.passes:
        return NO_BACKWARD_YET, ""
    return "None", phrase[len("None"):].strip(" ()") if phrase.startswith("None") else phrase


FLAG_WORDS = {
    "uninitialised": "uninitialised memory",
    "external": "from outside the cell",
    "inplace": "in-place",
    "detached": "detached",
    "no_grad": "made under no_grad",
    "version_changed": "modified in place later",
}


def from_cell(record: Record) -> str:
    """Where a record of an earlier traced cell was made, e.g. "from cell [3], line 2"; "" otherwise."""
    if record.cell is None:
        return ""
    return f"from cell [{record.cell}]" + (f", line {record.cell_line}" if record.cell_line is not None else "")


def statement_of(record: Record) -> str:
    """An in-place op's own statement when it changes a named tensor in place (`h += 1`,
    `h.relu_()`, `h[0, :] = …`), which no `h = ` may precede; "" otherwise (`u = torch.ones(3).requires_grad_()`
    binds its result: an assignment)."""
    expr, name = record.expr or "", record.name or ""
    if not record.inplace or not expr or not name:
        return ""
    if not expr.startswith(name):  # `torch.mul(a, b, out=c)` changes c: its own statement too
        return expr if re.search(rf"\bout\s*=\s*[(\[]?[\w\s,]*?\b{re.escape(name)}\s*[,)\]]", expr) else ""
    if record.op == REQUIRES_GRAD_SET and not expr.endswith(")"):  # `w.requires_grad = False`, not the method
        return f"{expr} = {record.requires_grad}"
    return f"{expr} = …" if record.op in ("setitem", "__setitem__", DATA_SET) else expr


def made_in(record: Record) -> str:
    """ "from cell [2], line 3": where an earlier traced cell made an input of this one; "" if none did."""
    if record.made_in is None:
        return ""
    cell, line = record.made_in
    return f"from cell [{cell}]" + (f", line {line}" if line is not None else "")


def flags(record: Record) -> list[str]:
    """What is unusual about a record, in words, in a fixed order (empty for most)."""
    earlier = [from_cell(record)] if record.cell is not None else []
    if record.origin is not None and record.made_in is None:  # a tensor with no history that an earlier cell made
        o = record.origin
        earlier.append(f"made in cell [{o.cell}]" + (f", line {o.line}" if o.line is not None else ""))
    if record.created_by:
        earlier.append(f"created by {record.created_by}")
    if record.made_in is not None and record.external:
        earlier.append(made_in(record))
    on = {
        "uninitialised": is_uninitialised(record),
        "external": record.external and not record.created_by and record.made_in is None,
        "inplace": record.inplace,
        "detached": record.detached,
        "no_grad": not record.grad_enabled and not (record.external and record.line is None),  # an input: not made here
        "version_changed": record.version_changed,
    }
    return earlier + [FLAG_WORDS[k] for k, v in on.items() if v]


# ---- memory that torch.empty reserved and nothing has written yet ----
UNINITIALISED_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "empty_permuted"})


def is_uninitialised(record: Record) -> bool:
    """A tensor made by torch.empty & co: its values are whatever was in memory, not numbers anyone set."""
    return record.op in UNINITIALISED_OPS and not record.inplace


def _shape_text(record: Record) -> str:
    shape = record.shape
    return "(" + ", ".join(map(str, shape)) + ")" if shape is not None else ""


def hides_value(record: Record) -> bool:
    """True for an uninitialised tensor made inside a call: views say what it is instead of its leftover values."""
    return is_uninitialised(record) and bool(record.internal) and not record.external


def record_label(record: Record) -> str:
    """What a view calls a record. An uninitialised tensor made inside a call (a module's __init__
    making room for its weights) is named as what it is, e.g. "torch.empty(8, 4) inside
    Linear.__init__", not after the call's line (`torch.nn.Linear(4, 8)`), which reads as the module."""
    if hides_value(record):
        return f"torch.{record.op}{_shape_text(record)} inside {record.internal}"
    return record.label


def filled_by(trace: Trace, record: Record) -> Optional[tuple[Record, Record]]:
    """(the in-place op that first writes an uninitialised tensor, the tensor it writes), or None.

    The write is to the record itself, or (a module's `Parameter(torch.empty(...))`) to a tensor of the
    same shape and dtype first seen after it, e.g. `kaiming_uniform_` on `lin.weight`.
    """
    if not is_uninitialised(record):
        return None
    for m in trace.records[record.id + 1:]:
        if not (m.inplace and m.mutates is not None and 0 <= m.mutates < len(trace.records)):
            continue
        target = trace.records[m.mutates]
        if target.id == record.id or (
            target.id > record.id and target.external and target.shape == record.shape and target.dtype == record.dtype
        ):
            return m, target
    return None


def uninitialised_value(trace: Trace, record: Record) -> str:
    """The value cell of an uninitialised tensor made inside a call, in words instead of leftover numbers."""
    found = filled_by(trace, record)
    if found is None:
        return "uninitialised memory (torch.empty sets no values)"
    m, target = found
    where = f" in {m.internal}" if m.internal else (f" on line {m.line}" if m.line is not None else "")
    shown = f": see `{target.label}`" if target.id != record.id else ""
    return f"uninitialised memory, filled in place by {m.op}{where}{shown}"


def uninitialised_why(trace: Trace, record: Record) -> str:
    """Why a torch.empty tensor shows odd numbers, and where the real values are."""
    made = f"`torch.{record.op}{_shape_text(record)}`" + (f" inside {record.internal}" if record.internal else "")
    text = (
        f"{made} reserves memory without setting any values: what it holds is whatever was in that memory "
        "before (it can be huge, tiny or nan), not numbers anyone chose."
    )
    found = filled_by(trace, record)
    if found is not None:
        m, target = found
        where = f" in {m.internal}" if m.internal else (f" on line {m.line}" if m.line is not None else "")
        text += f" {m.op}{where} then fills it in place"
        text += f"; `{target.label}` shows the values it starts with." if target.id != record.id else "."
    return text


def variant_description(variant: Trace) -> str:
    """What a variant changed, e.g. "under torch.no_grad(); detached y; requires_grad flipped on x"."""
    parts = []
    if variant.grad_mode == "no_grad":
        parts.append("under torch.no_grad()")
    if variant.detached:
        parts.append("detached " + ", ".join(variant.detached))
    if variant.flipped:
        parts.append("requires_grad flipped on " + ", ".join(variant.flipped))
    return "; ".join(parts) or "re-run in a sandbox"


# ---- a variant's cut: how every why-explanation names what the toggle changed ----
def detached_in_variant(label: str, line: Optional[int] = None) -> str:
    """e.g. "`y` was detached in this variant (the toggle cut it from the graph)"."""
    where = f"`{label}`" + (f" (line {line})" if line is not None else "")
    return f"{where} was detached in this variant (the toggle cut it from the graph)"


NO_GRAD_IN_VARIANT = "the whole cell ran under torch.no_grad() in this variant (the toggle), which records nothing for backward"


def flipped_in_variant(label: str, on: bool) -> str:
    """e.g. "requires_grad of `x` was flipped off in this variant"."""
    return f"requires_grad of `{label}` was flipped {'on' if on else 'off'} in this variant"


def no_gradient_reaches(labels: list[str]) -> str:
    """", so no gradient reaches `x`" (empty without labels)."""
    if not labels:
        return ""
    return ", so no gradient reaches " + " and ".join(f"`{x}`" for x in dict.fromkeys(labels))


REAL_RUN_UNAFFECTED = "This is the toggle's doing: the real run, without it, is unaffected."


def verdict(ok: Optional[bool]) -> str:
    """The gradient check's verdict for one leaf in a word or two."""
    return {True: "agrees", False: "differs"}.get(ok, "not checked")


def check_line(check: LeafCheck) -> str:
    """One leaf's check in one line: name, verdict, errors, and the note."""
    text = f"{check.name}: {verdict(check.ok)}"
    if check.max_abs_err is not None:
        text += f" (max abs error {check.max_abs_err:.2e}, rel {check.max_rel_err:.2e}, {check.elements_checked} elements)"
    if check.note:
        text += f" — {check.note}"
    return text


def check_lines(checks: Optional[list[LeafCheck]]) -> Optional[list[str]]:
    """The gradient check's verdicts as lines; None when it was not run."""
    if checks is None:
        return None
    if not checks:
        return ["Nothing to check: no backward pass reached a leaf that requires grad."]
    return [check_line(c) for c in checks]


_GRAD_OFF_CALLS = ("no_grad", "inference_mode", "set_grad_enabled")


def grad_off_block(trace: Trace, line: Optional[int]) -> Optional[str]:
    """The source of the innermost `with` block around editor line `line` that turns gradients off
    (`torch.no_grad()`, `torch.inference_mode()`, `torch.set_grad_enabled(False)`), or None when
    none does (they were switched off by a call, or before the cell)."""
    if line is None or not trace.source:
        return None
    blocks = trace.__dict__.get("_grad_off_blocks")
    if blocks is None:
        blocks = []
        try:
            tree = ast.parse(trace.source)
        except (SyntaxError, ValueError):  # an IPython-only cell (magics): no blocks named
            tree = None
        for node in ast.walk(tree) if tree is not None else ():
            if isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    text = ast.get_source_segment(trace.source, item.context_expr) or ""
                    if any(name in text for name in _GRAD_OFF_CALLS) and "True" not in text:
                        end = getattr(node, "end_lineno", node.lineno)
                        blocks.append((node.lineno + trace.first_line - 1, end + trace.first_line - 1, text))
        trace.__dict__["_grad_off_blocks"] = blocks
    inside = [b for b in blocks if b[0] < line <= b[1]]
    return min(inside, key=lambda b: b[1] - b[0])[2] if inside else None


def grad_off_phrase(trace: Trace, line: Optional[int]) -> str:
    """How gradients were off on `line`, as "under `torch.inference_mode()`" or, with no block of the
    cell around it, "with gradients off" (and why, when the cell started with them off)."""
    block = grad_off_block(trace, line)
    if block is not None:
        return f"under {block}"
    if trace.grad_off_at_start:
        return "with gradients off (they were already off when this cell started: an earlier cell switched them " \
               "off, e.g. with torch.set_grad_enabled(False))"
    return "with gradients off (torch.no_grad(), torch.set_grad_enabled(False) or torch.inference_mode())"
