"""Static HTML for the teaching layer: the backward stepper, the why-explanations, the gradient check.

Fragments for `render_html(..., sections=...)`: no scripts, every
user-derived string escaped, the snapshot's classes (`html_table.CSS`) with
inline styles only where they carry meaning. Each returns "" when it has
nothing to say. Pure: reads only the Trace.

Bounded for a notebook file: the first backward steps of the first passes
(only those are computed), and the explanations that matter most (an error,
then gradients that are None, then the cell's named tensors), each section
within its byte budget, with a line saying what the live widget has beyond.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

from ..explain.errors import explain_error
from ..explain.why import explain_record
from ..explain.wording import verdict
from .html_table import ERROR, TABLE_LAYOUT, esc, muted
from ..data.trace import Record, Trace
from ..explain.stepper import Step, describe_grad, steps
from .. import limits

OK = "color:#1a7f37;font-weight:600"
BAD = "color:#cf222e;font-weight:600"
MAX_STEPS = limits.SNAPSHOT_STEPS_SHOWN
MAX_RECORDS = limits.SNAPSHOT_EXPLAINED
HAS_ALL = "the live widget has them all"


def _code(text: object) -> str:
    return f'<code class="w">{esc(text)}</code>'


def _prose(text: str) -> str:
    """A sentence escaped, with its `backticked` source text shown as code."""
    return re.sub(r"`([^`]+)`", lambda m: f"<code>{m.group(1)}</code>", esc(text))


def _table(head: tuple[str, ...], rows: list[str]) -> str:
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f'<table{TABLE_LAYOUT}><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _td(html: str, cls: str = "") -> str:
    return f'<td class="{cls}">{html}</td>' if cls else f"<td>{html}</td>"


def _first_steps(trace: Trace, index: int, n: int) -> tuple[list[Step], int]:
    """The first `n` steps of pass `index` (and how many it has), computing only those.

    `steps()` describes every node of a pass; the snapshot shows a few, so it is given
    the pass cut to them and to the nodes they send to (which name the targets).
    """
    p = trace.passes[index]
    head = p.steps[:n]
    if len(p.steps) <= n:
        return steps(trace, index), len(p.steps)
    by_node = {s.node_id: s for s in p.steps}
    wanted = {s.node_id for s in head}
    extra = [by_node[i] for s in head for i in s.next_ids if i is not None and i in by_node and i not in wanted]
    seen, cut = set(), []
    for s in head + extra:
        if s.node_id not in seen:
            seen.add(s.node_id)
            cut.append(s)
    passes = list(trace.passes)
    passes[index] = replace(p, steps=cut)
    shown = steps(replace(trace, passes=passes), index)[: len(head)]
    return shown, len(p.steps)


# ---- the backward stepper ----
def stepper_html(trace: Trace) -> str:
    """The first backward passes, their first nodes: what each received, its rule, what it sent where."""
    parts, size = [], 0
    for p in trace.passes[: limits.SNAPSHOT_PASSES]:
        where = f"line {p.line}: " if p.line is not None else ""
        title = f"Backward pass {p.index + 1} ({p.kind}) — {where}"
        head = f'<div style="margin-top:6px"><b>{esc(title)}</b>{_code(p.expr or "")}</div>'
        if p.error:
            head += f'<div style="{ERROR};padding:2px 6px">{esc(_clip(p.error))}</div>'
        try:
            st, total = _first_steps(trace, p.index, MAX_STEPS)
        except Exception as exc:  # a malformed pass must not break the snapshot
            parts.append(head + muted(f"steps unavailable: {esc(type(exc).__name__)}", "div"))
            continue
        if not st:
            parts.append(head + muted("no steps were recorded for this pass", "div"))
            continue
        rows = []
        for s in st:
            r = _step_row(s)
            if size + len(r) > limits.SNAPSHOT_STEPPER_BYTES and rows:
                break
            rows.append(r)
            size += len(r)
        more = total - len(rows)
        tail = muted(f"… {more} more steps in this pass; {HAS_ALL}, step by step", "div") if more > 0 else ""
        parts.append(head + _table(("#", "node", "tensor", "received", "rule", "sent"), rows) + tail)
        if size > limits.SNAPSHOT_STEPPER_BYTES:
            break
    left = len(trace.passes) - len(parts)
    if left > 0:
        parts.append(muted(f"… {left} more backward passes; {HAS_ALL}", "div"))
    return "".join(parts)


def _clip(text: object, limit: int = limits.SNAPSHOT_TEXT_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _step_row(s: Step) -> str:
    tensor = ", ".join(esc(x) for x in s.labels)
    if s.line is not None:
        tensor += " " + muted(f"line {s.line}")
    got = "<br>".join(esc(describe_grad(g)) for g in s.grad_in) or "—"
    sent = []
    for g, t in zip(s.grad_out, s.targets):
        if t.node is None:
            continue
        who = ", ".join(t.labels) or t.node
        sent.append(f"{esc(describe_grad(g))} → {_code(who)}")
    if s.node == "AccumulateGrad":
        sent = [f"added into {_code((s.labels[0] if s.labels else 'leaf') + '.grad')}"]
    return (
        "<tr>" + _td(esc(s.index + 1)) + _td(_code(s.node)) + _td(tensor) + _td(got, "m")
        + _td(esc(s.rule)) + _td("<br>".join(sent) or "—", "m") + "</tr>"
    )


# ---- why-explanations ----
def explanations_html(trace: Trace) -> str:
    """The error's explanation (if any), then the "why" of the tensors that matter most."""
    parts = []
    err = explain_error(trace)
    if err:
        parts.append(f'<div style="{ERROR};padding:4px 8px;border-radius:4px;margin:4px 0">{_prose(_clip(err))}</div>')
    rows, size, candidates = [], 0, why_candidates(trace)
    for r in candidates:
        if len(rows) >= limits.SNAPSHOT_WHY or size > limits.SNAPSHOT_WHY_BYTES:
            break
        try:
            lines = explain_record(trace, r.id)
        except Exception:
            continue
        if not lines:
            continue
        where = " " + muted(f"line {r.line}") if r.line is not None else ""
        body = "".join(f"<div>{_prose(_clip(x))}</div>" for x in lines)
        rows.append("<tr>" + _td(_code(r.label) + where) + _td(body) + "</tr>")
        size += len(rows[-1])
    if rows:
        parts.append(_table(("tensor", "why"), rows))
        explained = len(rows)
        if len(candidates) > explained:
            parts.append(muted(f"The why of {len(candidates) - explained} more tensors: select one in the live widget.", "div"))
    return "".join(parts)


def why_candidates(trace: Trace) -> list[Record]:
    """The tensors whose "why" a reader needs first, most needed first.

    Internals are folded into their call line everywhere, and are left out. First the
    tensors at the error's line; then the named ones and the leaves (why their `.grad`
    is what it is, or None); then the rest, of which only a few: an unnamed intermediate's
    why mostly repeats that a non-leaf keeps no `.grad`. Data from outside the cell that
    takes no part in autograd (no grad, no requires_grad) is left to the live widget.
    """
    err_line = trace.error.line if trace.error is not None else None

    def rank(r: Record) -> int:
        if err_line is not None and r.line == err_line:
            return 0
        if r.name and not r.external:
            return 1
        if r.is_leaf and (r.requires_grad or r.grad_preview is not None) and (r.name or not r.external):
            return 1
        if r.external:
            return 2 if r.grad_preview is not None or r.requires_grad else 4
        return 3

    shown = [r for r in trace.records[:MAX_RECORDS] if not (r.internal and not r.external)]
    ranked = sorted(shown, key=lambda r: (rank(r), r.id))
    others = [r for r in ranked if rank(r) == 3][: limits.SNAPSHOT_WHY_UNNAMED]
    return [r for r in ranked if rank(r) < 3] + others  # data from outside that takes no part: the widget


# ---- the gradient check ----
def gradcheck_html(trace: Trace) -> str:
    """The finite-difference verdict per leaf; "" when the check was not run."""
    checks = trace.gradcheck
    if checks is None:
        return ""
    if not checks:
        return muted("gradient check: no leaf received a gradient in the first backward pass", "div")
    rows = []
    for c in checks:
        rows.append(
            "<tr>" + _td(_code(c.name)) + _td(_verdict(c.ok)) + _td(esc(c.elements_checked))
            + _td(esc(_num(c.max_abs_err)), "m") + _td(esc(_num(c.max_rel_err)), "m")
            + _td(_samples(c) + (muted(_prose(_clip(c.note)), "div") if c.note else "")) + "</tr>"
        )
    intro = muted(
        "Each leaf's gradient from the first backward pass, against central finite "
        "differences in float64 on a sandboxed re-run (a few elements per leaf).", "div"
    )
    return intro + _table(("leaf", "verdict", "elements", "max abs err", "max rel err", "autograd vs numeric"), rows)


def _verdict(ok: Optional[bool]) -> str:
    mark, style = {True: ("✓ ", OK), False: ("✗ ", BAD)}.get(ok, ("", "color:#57606a"))
    return f'<span style="{style}">{mark}{verdict(ok)}</span>'


def _num(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2e}"


def _samples(c) -> str:
    shown = [f"[{i}] {a:.6g} vs {n:.6g}" for i, a, n in getattr(c, "samples", [])[:4]]
    more = len(getattr(c, "samples", [])) - len(shown)
    text = "; ".join(shown) + (f"; … {more} more" if more > 0 else "")
    return f'<span class="m">{esc(text)}</span>' if text else ""



def teach_parts(trace: Trace) -> list[tuple[str, str, bool]]:
    """(title, body, open) of the three fragments, empty ones left out."""
    parts = [
        ("backward, step by step", stepper_html(trace), False),
        ("why? (gradients explained)", explanations_html(trace), bool(trace.error)),
        ("gradient check", gradcheck_html(trace), True),
    ]
    return [(title, body, is_open) for title, body, is_open in parts if body]


def teach_sections(trace: Trace) -> list[str]:
    """The three fragments as titled sections for `render_html(trace, sections=...)`; empty ones left out."""
    from .html import section

    return [section(title, body, open=is_open) for title, body, is_open in teach_parts(trace)]
