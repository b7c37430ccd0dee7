"""Static HTML for the teaching layer: the backward stepper, the why-explanations, the gradient check.

Fragments for `render_html(..., sections=...)`: inline styles only, no
scripts, every user-derived string escaped. Each returns "" when it has
nothing to say. Pure: reads only the Trace.
"""

from __future__ import annotations

import re
from typing import Optional

from ..explain.errors import explain_error
from ..explain.why import explain_record
from ..explain.wording import verdict
from .html_table import ERROR, MONO, MUTED, TD, TH, esc
from ..data.trace import Trace
from ..explain.stepper import Step, describe_grad, steps
from .. import limits

TABLE = "border-collapse:collapse;margin:6px 0;font-size:12px;color:#1f2328"
CODE = f"{MONO};white-space:pre-wrap"
OK = "color:#1a7f37;font-weight:600"
BAD = "color:#cf222e;font-weight:600"
MAX_STEPS = limits.SNAPSHOT_STEPS
MAX_RECORDS = limits.SNAPSHOT_EXPLAINED


def _code(text: object) -> str:
    return f'<code style="{CODE}">{esc(text)}</code>'


def _prose(text: str) -> str:
    """A sentence escaped, with its `backticked` source text shown as code."""
    return re.sub(r"`([^`]+)`", lambda m: f'<code style="{MONO}">{m.group(1)}</code>', esc(text))


def _table(head: tuple[str, ...], rows: list[str]) -> str:
    cells = "".join(f'<th style="{TH}">{esc(h)}</th>' for h in head)
    return f'<table style="{TABLE}"><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _td(html: str, extra: str = "") -> str:
    return f'<td style="{TD}{";" + extra if extra else ""}">{html}</td>'


# ---- the backward stepper ----
def stepper_html(trace: Trace) -> str:
    """Every backward pass, node by node: what it received, its rule, what it sent where."""
    parts = []
    for p in trace.passes:
        where = f"line {p.line}: " if p.line is not None else ""
        title = f"Backward pass {p.index + 1} ({p.kind}) — {where}"
        head = f'<div style="margin-top:6px;font-weight:600">{esc(title)}{_code(p.expr or "")}</div>'
        if p.error:
            head += f'<div style="{ERROR};padding:2px 6px">{esc(p.error)}</div>'
        try:
            st = steps(trace, p.index)
        except Exception as exc:  # a malformed pass must not break the snapshot
            parts.append(head + f'<div style="{MUTED}">steps unavailable: {esc(type(exc).__name__)}</div>')
            continue
        if not st:
            parts.append(head + f'<div style="{MUTED}">no steps were recorded for this pass</div>')
            continue
        rows = [_step_row(s) for s in st[:MAX_STEPS]]
        more = len(st) - MAX_STEPS
        tail = f'<div style="{MUTED}">… {more} more steps</div>' if more > 0 else ""
        parts.append(head + _table(("#", "node", "tensor", "received", "rule", "sent"), rows) + tail)
    return "".join(parts)


def _step_row(s: Step) -> str:
    tensor = ", ".join(esc(x) for x in s.labels)
    if s.line is not None:
        tensor += f' <span style="{MUTED}">line {s.line}</span>'
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
        "<tr>" + _td(esc(s.index + 1)) + _td(_code(s.node)) + _td(tensor) + _td(got, MONO)
        + _td(esc(s.rule)) + _td("<br>".join(sent) or "—", MONO) + "</tr>"
    )


# ---- why-explanations ----
def explanations_html(trace: Trace) -> str:
    """The error's explanation (if any), then each tensor's "why", grouped under its label."""
    parts = []
    err = explain_error(trace)
    if err:
        parts.append(f'<div style="{ERROR};padding:4px 8px;border-radius:4px;margin:4px 0">{_prose(err)}</div>')
    rows = []
    for r in trace.records[:MAX_RECORDS]:
        if r.internal and not r.external:
            continue  # internals are folded into their call line everywhere
        try:
            lines = explain_record(trace, r.id)
        except Exception:
            continue
        if not lines:
            continue
        where = f' <span style="{MUTED}">line {r.line}</span>' if r.line is not None else ""
        body = "".join(f"<div>{_prose(x)}</div>" for x in lines)
        rows.append("<tr>" + _td(_code(r.label) + where) + _td(body) + "</tr>")
    if rows:
        parts.append(_table(("tensor", "why"), rows))
    return "".join(parts)


# ---- the gradient check ----
def gradcheck_html(trace: Trace) -> str:
    """The finite-difference verdict per leaf; "" when the check was not run."""
    checks = trace.gradcheck
    if checks is None:
        return ""
    if not checks:
        return f'<div style="{MUTED}">gradient check: no leaf received a gradient in the first backward pass</div>'
    rows = []
    for c in checks:
        rows.append(
            "<tr>" + _td(_code(c.name)) + _td(_verdict(c.ok)) + _td(esc(c.elements_checked))
            + _td(esc(_num(c.max_abs_err)), MONO) + _td(esc(_num(c.max_rel_err)), MONO)
            + _td(_samples(c) + (f'<div style="{MUTED}">{_prose(c.note)}</div>' if c.note else "")) + "</tr>"
        )
    intro = (
        f'<div style="{MUTED}">Each leaf\'s gradient from the first backward pass, against central finite '
        "differences in float64 on a sandboxed re-run (a few elements per leaf).</div>"
    )
    return intro + _table(("leaf", "verdict", "elements", "max abs err", "max rel err", "autograd vs numeric"), rows)


def _verdict(ok: Optional[bool]) -> str:
    mark, style = {True: ("✓ ", OK), False: ("✗ ", BAD)}.get(ok, ("", MUTED))
    return f'<span style="{style}">{mark}{verdict(ok)}</span>'


def _num(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2e}"


def _samples(c) -> str:
    shown = [f"[{i}] {a:.6g} vs {n:.6g}" for i, a, n in getattr(c, "samples", [])[:4]]
    more = len(getattr(c, "samples", [])) - len(shown)
    text = "; ".join(shown) + (f"; … {more} more" if more > 0 else "")
    return f'<span style="{MONO}">{esc(text)}</span>' if text else ""



def teach_sections(trace: Trace) -> list[str]:
    """The three fragments as titled sections for `render_html(trace, sections=...)`; empty ones left out."""
    from .html import section

    parts = [
        ("backward, step by step", stepper_html(trace), False),
        ("why? (gradients explained)", explanations_html(trace), bool(trace.error)),
        ("gradient check", gradcheck_html(trace), True),
    ]
    return [section(title, body, open=is_open) for title, body, is_open in parts if body]
