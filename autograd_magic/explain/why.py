"""Why-explanations: plain-language answers to "why is this grad None?" and to errors.

Every sentence is tied to a record and the line it ran on, and every number
comes from the Trace (the gradient a non-leaf received, each pass's share of
an accumulated `.grad`). Pure: reads only the Trace.
"""

from __future__ import annotations

import math
import re
import weakref
from typing import Iterable, Optional

import numpy as np

from . import wording
from .format import format_short
from .stepper import steps
from ..data.identity import match_records
from ..data.trace import CUT_OPS, DATA_SET, REQUIRES_GRAD_SET, BackwardPass, Origin, Preview, Record, Trace

_DETACH_OPS = CUT_OPS  # .detach(), .detach_(), and `.data`: the legacy way to the same values with no history


def _cut_how(op: Optional[str]) -> str:
    """How a record in `_DETACH_OPS` was cut, as code: "`.data`", "`.detach_()`" or "`.detach()`"."""
    return "`.data`" if op == "data" else "`.detach_()`" if op == "detach_" else "`.detach()`"


def _where(r: Record) -> str:
    return f"{_quote(r)} (line {r.line})" if r.line is not None else _quote(r)


def _quote(r: Record) -> str:
    """How a sentence calls `r`: "`w`", or "the earlier `w`" for a tensor no name holds now that an
    earlier cell knew by that name (the row's "earlier w")."""
    return f"the earlier `{r.former}`" if _former(r) else f"`{r.label}`"


def _quote_grad(r: Record) -> str:
    """How a sentence calls `r`'s .grad: "`w.grad`", or "the earlier `w`'s .grad"."""
    return f"the earlier `{r.former}`'s .grad" if _former(r) else f"`{r.label}.grad`"


def _former(r: Record) -> bool:
    return bool(r.former) and not r.name and not r.expr


def _pass_where(p: BackwardPass) -> str:
    call = "torch.autograd.grad call" if p.kind == "grad" else "backward call"
    if p.line is not None:
        return f"the {call} on line {p.line}" + (f" (`{p.expr}`)" if p.expr else "")
    return f"backward pass {p.index + 1}"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _grad(p: Optional[Preview]) -> str:
    return format_short(p, 60)


def _sentence(text: str) -> str:
    """`text` with its full stop, once: a value torch prints as `1.` already ends in one."""
    return text if text.endswith(".") else text + "."


def _ancestors(trace: Trace, rid: int) -> Iterable[Record]:
    """Every record `rid` was computed from (inputs, their inputs, ...), nearest first."""
    seen, stack = {rid}, list(trace.records[rid].inputs)
    while stack:
        i = stack.pop(0)
        if i in seen or not 0 <= i < len(trace.records):
            continue
        seen.add(i)
        yield trace.records[i]
        stack.extend(trace.records[i].inputs)


def _mutations_of(trace: Trace, rid: int) -> list[Record]:
    return [r for r in trace.records if r.inplace and r.mutates == rid]


# ---- a variant's cut (detach, no_grad, requires_grad flip), read as the cut it is ----
def _is_variant(trace: Trace) -> bool:
    return trace.variant_of is not None or trace.grad_mode == "no_grad" or bool(trace.detached or trace.flipped)


class _VariantFacts:
    """What a variant's toggle did to each record, worked out once per trace (a table asks per row)."""

    def __init__(self, trace: Trace):
        recs = trace.records
        # requires_grad of each record's counterpart in the real run (plain values: no reference to either trace)
        self.original_rg: dict[int, bool] = {}
        if trace.variant_of is not None:
            orig = trace.variant_of.records
            self.original_rg = {
                v: orig[o].requires_grad for o, v in match_records(trace.variant_of, trace).items() if 0 <= o < len(orig)
            }
        labels = set(trace.flipped)
        self.flipped = {
            r.id for r in recs
            if r.label in labels and r.is_leaf and not r.inplace and not r.inputs
            and self.original_rg.get(r.id, not r.requires_grad) != r.requires_grad
        }
        # the nearest record the toggle cut that each record was computed from (itself included)
        self.cut_from: dict[int, int] = {}
        for r in recs:
            if r.detached or (r.id in self.flipped and not r.requires_grad):
                self.cut_from[r.id] = r.id
                continue
            for i in r.inputs:
                if 0 <= i < r.id and i in self.cut_from:
                    self.cut_from[r.id] = self.cut_from[i]
                    break
        # the nearest detached record computed from each record
        uses: dict[int, list[int]] = {}
        for u in recs:
            for i in u.inputs:
                if 0 <= i < u.id:
                    uses.setdefault(i, []).append(u.id)
        self.detached_below: dict[int, int] = {}
        for r in reversed(recs):
            for u in uses.get(r.id, []):
                below = u if recs[u].detached else self.detached_below.get(u)
                if below is not None:
                    self.detached_below[r.id] = below
                    break
        # leaves that require grad each record was computed from (itself included), the first few
        self.leaves: dict[int, list[str]] = {}
        for r in recs:
            found = [r.label] if r.is_leaf and not r.inputs and r.requires_grad else []
            for i in r.inputs:
                if 0 <= i < r.id:
                    found.extend(self.leaves.get(i, ()))
            self.leaves[r.id] = list(dict.fromkeys(found))[:_LEAVES_NAMED]

    def leaves_above(self, rid: int) -> list[str]:
        return self.leaves.get(rid, [])


_LEAVES_NAMED = 4  # "so no gradient reaches `a` and `b` ...": at most this many names
_FACTS: list = [None, None]  # (a weak reference to the last variant explained, its facts)


def _facts(trace: Trace) -> _VariantFacts:
    ref, facts = _FACTS
    if ref is None or ref() is not trace or facts.n != len(trace.records):
        facts = _VariantFacts(trace)
        facts.n = len(trace.records)
        _FACTS[:] = [weakref.ref(trace), facts]
    return facts


def _flipped(trace: Trace, r: Record) -> bool:
    """True when the variant's toggle flipped requires_grad of this leaf."""
    return bool(trace.flipped) and r.label in trace.flipped and r.id in _facts(trace).flipped


def _variant_cut(trace: Trace, r: Record) -> Optional[tuple[str, Optional[Record]]]:
    """Why `r` has no history in this variant when it had one in the real run: (the cut, its record).

    None when this is not a variant, or the real run's `r` did not require grad either.
    """
    if not _is_variant(trace) or r.requires_grad and not r.detached:
        return None
    facts = _facts(trace)
    if not facts.original_rg.get(r.id, True):
        return None
    if trace.grad_mode == "no_grad" and not r.grad_enabled:
        return wording.NO_GRAD_IN_VARIANT, None
    c = facts.cut_from.get(r.id)
    if c is None:
        return None
    a = trace.records[c]
    if a.detached:
        return wording.detached_in_variant(a.label), a
    return wording.flipped_in_variant(a.label, on=False), a


def _cut_off_leaves(trace: Trace, r: Record, cut: Optional[Record]) -> list[str]:
    """Leaves that require grad upstream of `r` (of the cut, when one is named): they get nothing through it."""
    start = cut if cut is not None else r
    return [x for x in _facts(trace).leaves_above(start.id) if x != r.label or start is not r]


def _variant_sentence(trace: Trace, r: Record) -> Optional[str]:
    """The variant's reason `r` does not require grad, in one sentence, or None."""
    found = _variant_cut(trace, r)
    if found is None:
        return None
    cut, at = found
    if at is r and not r.detached:  # r is the flipped leaf
        return (
            f"{_where(r)} requires grad in the real run, but here {cut} (the toggle), "
            "so nothing computed from it is recorded for backward."
        )
    return f"{_where(r)} does not require grad because {cut}{wording.no_gradient_reaches(_cut_off_leaves(trace, r, at))}."


def _variant_block(trace: Trace, r: Record) -> Optional[str]:
    """Why a tensor that requires grad got no gradient in this variant: the toggle cut what uses it."""
    if not _is_variant(trace):
        return None
    if trace.grad_mode == "no_grad":
        return f"{wording.NO_GRAD_IN_VARIANT}{wording.no_gradient_reaches([r.label])}."
    below = _facts(trace).detached_below.get(r.id)
    if below is not None:
        return f"{wording.detached_in_variant(trace.records[below].label)}{wording.no_gradient_reaches([r.label])}."
    return None


def _variant_note(trace: Trace, r: Record) -> list[str]:
    """For a leaf whose requires_grad the toggle switched on."""
    if r.requires_grad and _flipped(trace, r):
        return [f"Here {wording.flipped_in_variant(r.label, on=True)} (the toggle): in the real run {_quote(r)} does not require grad."]
    return []


# ---- one record ----
def explain_record(trace: Trace, record_id: int) -> list[str]:
    """Why `record_id`'s gradient is what it is (or None), in sentences."""
    return [_capital(s) if s.startswith("the earlier `") else s for s in _explain_record(trace, record_id)]


def _explain_record(trace: Trace, record_id: int) -> list[str]:
    r = trace.records[record_id]
    if r.became is not None and 0 <= r.became < len(trace.records):  # what a custom Function's forward returned
        a = trace.records[r.became]
        return [f"{_where(r)} is what `{a.op.rsplit('.', 1)[0]}.forward` returned, computed under no_grad as autograd "
                f"runs every forward; `{a.op}` then gave this very tensor its grad_fn ({a.grad_fn}): its row is "
                f"{_where(a)}, with the gradient it receives."]
    out: list[str] = [wording.uninitialised_why(trace, r)] if wording.is_uninitialised(r) else []
    if wording.hides_value(r):  # a module's room for its weights: not a tensor the student made
        found = wording.filled_by(trace, r)
        if found is not None and found[1].id != r.id and found[1].requires_grad:
            out.append(
                f"It has no gradient itself: the module keeps this memory as `{found[1].label}`, "
                "the tensor that requires grad and gets a .grad."
            )
        return out
    if r.inplace and r.mutates is not None:
        target = trace.records[r.mutates]
        if r.op == DATA_SET:
            out.append(f"`{wording.statement_of(r) or r.expr}` on line {r.line} replaced the values of {_quote(target)} "
                       "behind autograd's back (`.data` is not recorded for gradients): later lines read these values, "
                       "and no gradient flows through the assignment.")
        elif r.op == "requires_grad_" and r.requires_grad:
            out.append(f"`{r.expr or r.op}` on line {r.line} switched on requires_grad for {_quote(target)}: "
                       "from here on, what is computed from it is recorded for autograd.")
        elif r.op == "detach_":
            pass  # the reason it has no history says it
        elif r.op == REQUIRES_GRAD_SET and target.requires_grad:
            out.append(f"`{wording.statement_of(r) or r.expr or r.op}` on line {r.line} switched off requires_grad for "
                       f"{_quote(target)}: from here on, what is computed from it is not recorded for autograd.")
        else:
            out.append(f"`{r.expr or r.op}` on line {r.line} changed {_quote(target)} in place.")
    if r.detached:
        upstream = list(dict.fromkeys(_cut_off_leaves(trace, r, r)))
        # a leaf with another path around the cut still gets its gradient (`z = y * x`, y detached)
        reached = {x.label for x in trace.records if x.is_leaf and x.grads and x.label in upstream}
        none = [f"`{x}`" for x in upstream if x not in reached]
        other = [f"`{x}`" for x in upstream if x in reached]
        reach = f" and none reaches {' and '.join(none)}" if none else ""
        if other:
            reach += f" ({' and '.join(other)} still {'gets' if len(other) == 1 else 'get'} one along another path)"
        out.append(
            f"{wording.detached_in_variant(r.label, r.line)}: what uses it gets a copy with no history, "
            f"so no gradient flows back through it{reach}; it receives none itself."
        )
    elif not r.requires_grad:
        reasons = _why_no_requires_grad(trace, r)
        if any(m.op == REQUIRES_GRAD_SET and m.requires_grad for m in _later_changes(trace, r)):
            # switched on later (said below): its tensor may get a .grad, which this row's flag does not tell
            reasons = [x for x in reasons if not x.endswith("so it has no gradient (.grad is None).")]
        out.extend(reasons)
    elif r.is_leaf:
        out.extend(_variant_note(trace, r) + _leaf_grad(trace, r))
    elif r.op == "grad" and r.grad_fn is not None and _made_with_graph(trace, r) is not None:
        out.extend(_graph_grad(trace, r))
    else:
        out.extend(_non_leaf_grad(trace, r))
    for m in _later_changes(trace, r):
        statement = wording.statement_of(m) or m.expr or m.op
        if m.op == REQUIRES_GRAD_SET and m.requires_grad == r.requires_grad:
            out.append(f"`{statement}` on line {m.line} left requires_grad {'on' if r.requires_grad else 'off'}, as it already was.")
        elif m.op == REQUIRES_GRAD_SET and m.requires_grad:
            out.append(f"requires_grad was switched on later, by `{statement}` on line {m.line}; this row shows {_quote(r)} before that.")
        elif m.op == REQUIRES_GRAD_SET:
            if r.grads:  # reached before the switch; otherwise the reason it got none says it already
                out.append(f"requires_grad was switched off later, by `{statement}` on line {m.line}; this row shows {_quote(r)} before that.")
        else:
            out.append(f"{_where(r)} was later modified in place by `{wording.statement_of(m) or m.expr or m.op}` on line {m.line}.")
    return out


def _later_changes(trace: Trace, r: Record) -> list[Record]:
    """The in-place changes of `r`'s tensor after this record, one per line and call: the chain of
    records each change makes, followed. A module's initialisation of the parameter it created
    (`nn.Linear(2, 1)`'s kaiming_uniform_) is part of making it, not a later change; an optimizer's
    step, one record per parameter it updates, is named once per call."""
    out, seen, at, hops = [], set(), r.id, 0
    while hops < len(trace.records):
        found = _mutations_of(trace, at)
        if not found:
            break
        m, hops = found[0], hops + 1
        at = m.id
        made_here = m.internal and r.created_by is not None and m.line == r.line and m.expr == r.created_by
        key = (m.line, m.expr if not m.internal else m.internal)
        if made_here or key in seen:
            continue
        seen.add(key)
        out.append(m)
    return out


def _made_by_pass(trace: Trace, r: Record) -> Optional[BackwardPass]:
    """The backward call of this cell that made `r` (a leaf's .grad, or what autograd.grad returned,
    first seen after it), if one did."""
    if not r.external or r.created_by is None or r.line is None:
        return None
    return next((p for p in reversed(trace.passes) if p.line == r.line and p.expr == r.created_by), None)


def _why_no_requires_grad(trace: Trace, r: Record) -> list[str]:
    none = f"{_quote(r)} has requires_grad=False and no grad_fn, so it has no gradient (.grad is None)."
    toggled = _variant_sentence(trace, r)
    if toggled is not None:
        return [toggled, none]
    if r.op == REQUIRES_GRAD_SET and r.inplace and r.mutates is not None:  # switched off by this very line: said above
        return [none]
    if r.op == "detach_" and r.inplace and r.mutates is not None:
        return [f"`{r.expr or r.op}` on line {r.line} cut {_quote(trace.records[r.mutates])} off the graph in place: it keeps "
                "its values but has no history from here on, so no gradient flows back through it.", none]
    if r.op in _DETACH_OPS:
        src = trace.records[r.inputs[0]] if r.inputs else None
        cut = f" from {_quote(src)}" if src is not None else ""
        legacy = (" Autograd does not see changes made through `.data` either; `.detach()` is the safer way to the values."
                  if r.op == "data" else "")
        return [
            f"{_quote(r)} was cut{cut} by {_cut_how(r.op)} on line {r.line}: it shares the values but has no history, "
            f"so no gradient flows back through it.{legacy}",
            none,
        ]
    grad_inputs = [trace.records[i] for i in r.inputs if trace.records[i].requires_grad]
    # an input from outside the cell was not made here: the mode it was first used under says nothing
    if not r.grad_enabled and not (r.external and r.line is None):
        if trace.grad_mode == "no_grad":
            why = f"{_quote(r)} was made under torch.no_grad() on line {r.line} (the whole cell ran under torch.no_grad() in this variant)"
        else:
            why = f"{_quote(r)} was made {wording.grad_off_phrase(trace, r.line)} on line {r.line}"
        if grad_inputs:
            # `x = x - lr * x.grad`: the name now holds the new tensor, the one it was computed from is another
            same = any(g.label == r.label for g in grad_inputs)
            names = f"{_quote(r) if _former(r) else 'the ' + _quote(r)} it was computed from" if same else _names(grad_inputs)
            why += f", so it does not require grad although {names} does; no gradient flows back through it."
        else:
            why += "."
        return [why, none]
    made_by = _made_by_pass(trace, r)
    if made_by is not None:
        return [
            f"{_quote(r)} is a gradient, made by {_pass_where(made_by)}: it does not require grad itself "
            "(it would only with create_graph=True).",
            none,
        ]
    if not r.inputs and r.external:
        if r.origin is not None:
            return [f"{_quote(r)} {origin_clause(r.origin, r.label)}: it has no grad_fn, so no gradient flows back through it.", none]
        if r.grad_of is not None:
            return [
                f"{_quote(r)} is the gradient that backward() left in `{r.grad_of}` before this cell: a gradient does not "
                "require grad itself (it would only with create_graph=True), so what is computed from it has no history.",
                none,
            ]
        return [
            f"{_quote(r)} comes from before this cell with requires_grad=False and no grad_fn: requires_grad was "
            "never set where it was created, or it was computed from tensors that had none, or its history was cut "
            "there (torch.no_grad(), .detach(), .data). Trace that cell too (%%autograd) to see which.",
            none,
        ]
    if _integral(r):  # integers and booleans never require grad: argmax, comparisons, .long()
        made = f"{_where(r)} holds {r.dtype.replace('torch.', '')} values"
        if grad_inputs:
            return [f"{made}: only floating point (and complex) tensors carry gradients, so no gradient flows "
                    f"back through it, although {_names(grad_inputs)} requires grad.", none]
        return [f"{made}: only floating point (and complex) tensors can require grad; convert it first "
                f"(`.float()`) if it should.", none]
    if not r.inputs:
        call = f"call {r.name}.requires_grad_()" if r.name else "call .requires_grad_() on it"
        return [
            f"requires_grad was never set on {_where(r)}, so no gradient is computed for it (an input such as "
            f"data needs none). For one, create it with requires_grad=True or {call} before using it.",
            none,
        ]
    return [_untracked_origin(trace, r), none]


def _integral(r: Record) -> bool:
    dtype = r.dtype or ""
    return dtype.startswith(("torch.int", "torch.uint")) or dtype == "torch.bool"  # torch.long prints as torch.int64


def _names(recs: list[Record]) -> str:
    labels = list(dict.fromkeys(_quote(x) for x in recs))
    return " and ".join(labels)


def origin_clause(o: Origin, label: Optional[str] = None) -> str:
    """How an earlier cell cut a tensor (called `label` here) off the graph, as a verb phrase: "was
    made under torch.no_grad() in cell [5], on line 2 (`x * 5`), from `x`, which requires grad"."""
    cut_cell = o.cut_cell if o.cut_cell is not None else o.cell
    where = f"in cell [{cut_cell}]" + (f", on line {o.line}" if o.line is not None else "") + (f" (`{o.expr}`)" if o.expr else "")
    # `x = x - lr * x.grad` there: the name now holds the new tensor, the one it was computed from is another
    source = f"the earlier `{o.source}`" if o.source is not None and o.source == label else f"`{o.source}`"
    if o.how == "no_grad":
        clause = f"was made under torch.no_grad() {where}" + (f", from {source}, which requires grad" if o.source else "")
    else:
        clause = "was cut" + (f" from {source}" if o.source else "") + f" by {_cut_how(o.how)} {where}"
    if o.via is None:
        return clause
    return f"was computed in cell [{o.cell}] from `{o.via}`, which {clause}"


def first_cut(trace: Trace, r: Record) -> Optional[Record]:
    """The record that cut `r`'s history (as `_untracked_origin` names it), if one did: `r` itself
    when an earlier cell cut it, else the nearest of its ancestors."""
    if r.origin is not None:
        return r
    for a in _ancestors(trace, r.id):
        if a.op in _DETACH_OPS or (not a.grad_enabled and not a.requires_grad and not (a.external and a.line is None)) or a.origin is not None:
            return a
    return None


def integral_cut(trace: Trace, r: Record) -> Optional[tuple[Record, list[Record]]]:
    """The nearest record `r` was computed from that holds integers or booleans made from a tensor
    that requires grad (`x.argmax()`, `x > 0`), with those inputs: autograd stops there. None if none."""
    for a in _ancestors(trace, r.id):
        if a.requires_grad:
            return None  # nearer than any cut: `r` is computed from history autograd has
        if _integral(a):
            grad_inputs = [trace.records[i] for i in a.inputs if 0 <= i < len(trace.records) and trace.records[i].requires_grad]
            if grad_inputs:
                return a, grad_inputs
    return None


def _untracked_origin(trace: Trace, r: Record) -> str:
    """Why a computed tensor has no history: its inputs never required grad, or were cut."""
    ancestors = list(_ancestors(trace, r.id))
    c = first_cut(trace, r)
    ic = integral_cut(trace, r)
    if ic is not None and (c is None or ancestors.index(ic[0]) < ancestors.index(c)):
        cut, grad_inputs = ic
        return (f"{_where(r)} does not require grad: it was computed from {_where(cut)}, which holds "
                f"{cut.dtype.replace('torch.', '')} values; only floating point (and complex) tensors carry gradients, "
                f"so no gradient flows back through it, although {_names(grad_inputs)} requires grad.")
    if c is not None:
        if c.origin is not None and c.external:
            return f"{_where(r)} does not require grad: it was computed from {_quote(c)}, which {origin_clause(c.origin, c.label)}."
        how = _cut_how(c.op) if c.op in _DETACH_OPS else "torch.no_grad()"
        return f"{_where(r)} does not require grad: it was computed from {_where(c)}, cut from the graph by {how}."
    leaves = [a for a in ancestors if not a.inputs]
    base = f"{_where(r)} does not require grad because none of its inputs do"
    if not leaves:
        return base + "."
    parts = []
    late = [(a, m) for a in leaves for m in _mutations_of(trace, a.id)[:1] if m.op == "requires_grad_" and m.requires_grad and m.id > r.id]
    switched = {a.id for a, _ in late}
    grads = [a for a in leaves if a.grad_of is not None and a.id not in switched]
    never = [a for a in leaves if a.grad_of is None and a.id not in switched]
    if never:
        parts.append(f"{_names(never)}, which never had requires_grad=True")
    if grads:
        parts.append(f"{_names(grads)}, {'gradients' if len(grads) > 1 else 'a gradient'}, which does not require grad itself")
    for a, m in late:
        parts.append(f"{_quote(a)} before requires_grad was switched on for it (by `{m.expr or m.op}` on line {m.line}): "
                     "only what is computed after that is recorded")
    return base + ": it was computed from " + "; and from ".join(parts) + "."


def _unrecorded_calls_after(trace: Trace, r: Record) -> int:
    """How many of the cell's backward calls past --limit (run, not recorded) came after `r` was made."""
    since = r.iteration or 0  # a record made past --limit says how many calls came before it
    return sum(1 for it in trace.iterations if it.pass_index is None and it.index >= since) + trace.iterations_left_out


def _passes_before_change(trace: Trace, r: Record) -> list[BackwardPass]:
    """The backward calls (not autograd.grad) that reached the tensor an in-place op `r` changed,
    through the records of its earlier versions: they filled the .grad the tensor still has."""
    seen, found, at = set(), set(), r.mutates
    while at is not None and at not in seen and 0 <= at < len(trace.records):
        seen.add(at)
        found.update(i for i in trace.records[at].grads if i < len(trace.passes))
        at = trace.records[at].mutates
    return [trace.passes[i] for i in sorted(found) if trace.passes[i].kind != "grad"]


def _past_limit(trace: Trace, r: Record) -> Optional[str]:
    """For a record made past --limit (the first NaN/Inf of a loop's later runs) that backward calls
    ran after: no recorded pass can reach it, and whether theirs did is not known."""
    if r.run is None:
        return None
    if not _unrecorded_calls_after(trace, r):
        return None
    since = r.iteration or 0
    nxt = next((it for it in trace.iterations if it.pass_index is None and it.index >= since), None)
    if nxt is None:  # past the bound on kept iterations: counted only
        return "It was made past --limit, and the backward calls after it ran without detail: what gradient reached it is not recorded."
    where = f" (line {nxt.line})" if nxt.line is not None else ""
    return (f"It was made past --limit, before backward call {nxt.index + 1}{where}: that call and any after it ran "
            "without detail, so what gradient reached it is not recorded.")


def _leaf_grad(trace: Trace, r: Record) -> list[str]:
    reached = [trace.passes[i] for i in sorted(r.grads) if i < len(trace.passes)]
    if not reached:
        if r.attr_grad is not None:
            unrecorded = _unrecorded_calls_after(trace, r)
            if unrecorded:
                calls = "call" if unrecorded == 1 else "calls"
                return [f"{_quote_grad(r)} = {_grad(r.attr_grad)} after the cell: left there by the {unrecorded} backward "
                        f"{calls} this cell ran past --limit (not recorded in detail), or by ones before this cell."]
            earlier = _passes_before_change(trace, r)
            if earlier:
                by = _pass_where(earlier[0]) if len(earlier) == 1 else f"the {len(earlier)} backward calls before it (gradients accumulate)"
                return [f"{_quote_grad(r)} = {_grad(r.attr_grad)} was put there by {by}, which reached {_quote(r)} "
                        f"before line {r.line} changed it in place."]
            return [f"{_quote_grad(r)} = {_grad(r.attr_grad)} was left there by backward calls before this cell."]
        if not trace.passes:
            return [f"{_where(r)} requires grad, but no backward() ran in this cell, so its .grad is None."]
        unknown = _past_limit(trace, r)
        if unknown is not None:
            return [f"{_where(r)} requires grad. {unknown}"]
        return [f"{_where(r)} requires grad, but no backward pass in this cell reached it: " + _unreached(trace, r)]
    # torch.autograd.grad returns gradients and leaves .grad alone; backward() adds into .grad
    out = [
        _capital(f"{_pass_where(p)} returned {_grad(r.grads[p.index])} for {_quote(r)} (it does not change {_quote_grad(r)}).")
        for p in reached if p.kind == "grad"
    ]
    passes = [p for p in reached if p.kind != "grad"]
    # `.grad` adds up the passes since the last one that found it None (reset) or changed
    start = max((i for i, p in enumerate(passes) if p.grad_before.get(r.id) in ("none", "changed", "assigned")), default=0)
    summed, dropped = passes[start:], passes[:start]
    after = _grad_after(trace, r, summed, resets=bool(dropped) or any(
        p.grad_before.get(r.id) in ("none", "changed", "assigned") for p in summed[1:]))
    if len(summed) > 1 and after is not None:  # .grad moved on since: what the recorded passes gave, then why
        out.append(f"Its recorded backward passes gave, adding up (gradients accumulate): " + "; ".join(
            f"{_pass_where(p) if len({q.line for q in summed}) > 1 else f'pass {p.index + 1}'} gave {_grad(r.grads[p.index])}"
            for p in summed) + ".")
    elif len(summed) == 1:
        p = summed[0]
        into = f"{_quote_grad(r)}" if r.name else "its .grad (no name holds this tensor: only the graph reaches it)"
        out.append(f"{_quote(r)} is a leaf: {_pass_where(p)} put {_grad(r.grads[p.index])} into {into}.")
    elif summed:
        if len({(p.line, p.expr) for p in summed}) == 1:  # one call in a loop: its passes by number
            shares = f"{_pass_where(summed[0])}, pass by pass: " + "; ".join(
                f"pass {p.index + 1} gave {_grad(r.grads[p.index])}" for p in summed)
        else:
            shares = "; ".join(f"{_pass_where(p)} gave {_grad(r.grads[p.index])}" for p in summed)
        out.append(
            f"{_quote_grad(r)} is the sum of {len(summed)} backward passes (gradients accumulate): {shares}. "
            "Zero it between steps (x.grad = None, or optimizer.zero_grad()) if that is not what you want."
        )
    if dropped:
        state = summed[0].grad_before.get(r.id)
        how = ("None (reset)" if state == "none" else _assigned(trace, r, summed[0]) if state == "assigned"
               else "changed in place or replaced")
        earlier = "the pass before it" if len(dropped) == 1 else f"the {len(dropped)} passes before it"
        out.append(f"{_quote_grad(r)} was {how} before {_pass_where(summed[0])}, so what {earlier} gave is not in it.")
    if after is not None:  # `.grad` moved on after the last recorded pass: what it is now, and why
        return out + [after]
    first = summed[0].grad_before.get(r.id) if summed else None
    extra = _earlier_share(r, summed, trace.notes, first, _assigned(trace, r, summed[0]) if first == "assigned" else None) \
        if summed else None
    if extra:
        out.append(extra)
    return out + _odd_values(trace, r)


def _grad_after(trace: Trace, r: Record, summed: list[BackwardPass], resets: bool) -> Optional[str]:
    """What `.grad` became after the last recorded pass into it, when not what that pass left:
    reset to None (zero_grad() after the step), or changed (passes past --limit, clipping,
    zero_grad(set_to_none=False)). None when it is as the passes left it, or unknown."""
    if not summed or r.grad_after not in ("none", "changed"):
        return None
    last = _pass_where(summed[-1])
    if r.grad_after == "none":
        by_hand = "its .grad set to None" if _former(r) else f"`{r.label}.grad = None`"
        return f"{_quote_grad(r)} was reset to None after {last} (optimizer.zero_grad(), or {by_hand}): it is None after the cell."
    now = f"{_quote_grad(r)} is {_grad(r.attr_grad)} after the cell" if r.attr_grad is not None else f"{_quote_grad(r)} changed"
    if any("passes were not recorded" in n for n in trace.notes):
        later = ("what the last of them left: the loop resets it" if resets
                 else "they added into it (gradients accumulate)")
        return f"{now}: the loop's later backward passes ran past --limit and were not recorded in detail; {later}."
    return (f"{now}: it was changed in place after {last} (clip_grad_norm_, zero_grad(set_to_none=False), "
            "or code writing into .grad).")


def _numbers(values) -> np.ndarray:
    """A preview's values as float64, or complex128 for a complex tensor's (its imaginary parts count)."""
    return np.asarray(values, dtype=np.complex128 if np.iscomplexobj(values) else np.float64)


def _assigned(trace: Trace, r: Record, p: BackwardPass) -> str:
    """'assigned on line 2 (`b.grad = torch.tensor([10., 10.])`)': how the cell set `.grad` before pass `p`."""
    line = p.grad_assigned.get(r.id)
    if line is None:
        return "assigned by the cell"
    text = trace.source_line(line).strip()
    return f"assigned on line {line}" + (f" (`{text}`)" if text else "")


def _earlier_share(r: Record, passes: list[BackwardPass], notes: list[str], first: Optional[str] = None,
                   assigned: Optional[str] = None) -> Optional[str]:
    """When .grad holds more than the recorded passes gave: unrecorded loop passes, or an earlier cell
    (or, when it had `changed` as the first of `passes` began, what the cell itself left in it;
    never what came before when it was None then)."""
    unrecorded = [n for n in notes if "passes were not recorded" in n]
    total = None
    for p in passes:
        g = r.grads[p.index]
        if not g.complete:
            return None
        total = _numbers(g.values) + (0 if total is None else total)
    a = r.attr_grad
    if a is None or not a.complete or total is None or np.shape(a.values) != np.shape(total):
        return None
    if np.allclose(_numbers(a.values), total, rtol=1e-5, atol=1e-6, equal_nan=True):
        return None
    if unrecorded:
        return (
            f"{_quote_grad(r)} is {_grad(a)}: it also holds the gradients of the backward passes that ran "
            f"in a loop but were not recorded ({unrecorded[0]})."
        )
    if first == "none":  # None as the first counted pass began: nothing from before it is in .grad
        return None
    if first == "assigned":
        return (f"{_quote_grad(r)} is {_grad(a)}, not what {'that pass' if len(passes) == 1 else 'those passes'} gave "
                f"alone: the pass added to what was {assigned} before it.")
    if first == "changed":
        return (f"{_quote_grad(r)} is {_grad(a)}, not what {'that pass' if len(passes) == 1 else 'those passes'} gave "
                f"alone: it also holds what {_quote_grad(r)} was when {_pass_where(passes[0])} began.")
    return (
        f"{_quote_grad(r)} is {_grad(a)}, more than this cell's passes gave: it also holds gradients "
        "accumulated by backward calls before this cell."
    )


def _unreached(trace: Trace, r: Record) -> str:
    toggled = _variant_block(trace, r)
    if toggled is not None:
        return toggled
    failed = [p for p in trace.passes if p.error]
    if failed and len(failed) == len(trace.passes):
        return f"{_pass_where(failed[0])} raised an error before any gradient got here."
    chosen = [p for p in trace.passes if p.kind == "backward" and p.inputs and p.error is None]
    if chosen and all(r.id not in p.inputs for p in chosen):  # backward(inputs=[a]): only those accumulate
        p = chosen[0]
        given = _names([trace.records[i] for i in p.inputs if 0 <= i < len(trace.records)])
        return (f"{_pass_where(p)} was given inputs={given}, which leaves {_quote(r)} out: only the tensors "
                "named there get a gradient.")
    off = [m for m in _mutations_of(trace, r.id) if m.op == REQUIRES_GRAD_SET and not m.requires_grad]
    if off:  # `w.requires_grad = False` (or `w.requires_grad_(False)`): what follows uses it unrecorded
        m = off[0]
        return (f"`{wording.statement_of(m) or m.expr or m.op}` on line {m.line} switched its requires_grad off, "
                "so the lines after it use it without recording it for autograd.")
    uses = [u for u in trace.records if r.id in u.inputs]
    cut = [u for u in uses if u.op in _DETACH_OPS or not u.grad_enabled]
    if cut:
        u = cut[0]
        how = _cut_how(u.op) if u.op in _DETACH_OPS else "torch.no_grad()"
        return f"its use on line {u.line} (`{u.expr or u.op}`) goes through {how}, which cuts the graph."
    lines = [p.line for p in trace.passes]
    if r.line is not None and None not in lines and r.line > max(lines):
        return f"it was computed on line {r.line}, after the last backward call (line {max(lines)})."
    return "the value that was differentiated does not depend on it."


def _made_with_graph(trace: Trace, r: Record) -> Optional[BackwardPass]:
    """The backward call that made the `.grad` read by `r` with a history (create_graph=True): the last
    one before the read, when the tensor it is the .grad of is a leaf that call reached."""
    owner = trace.records[r.inputs[0]] if r.inputs and 0 <= r.inputs[0] < len(trace.records) else None
    before = [p for p in trace.passes if p.kind == "backward" and p.error is None and p.line is not None
              and r.line is not None and p.line <= r.line]
    if owner is None or not before or before[-1].index not in owner.grads:
        return None
    return before[-1]


def _graph_grad(trace: Trace, r: Record) -> list[str]:
    """`x.grad` read after `backward(create_graph=True)`: a gradient with a history of its own."""
    p = _made_with_graph(trace, r)
    owner = trace.records[r.inputs[0]]
    return [f"{_where(r)} reads the gradient {_pass_where(p)} put into {_quote_grad(owner)}. That call had "
            f"create_graph=True, so the gradient has a history of its own (grad_fn {r.grad_fn}) and can be "
            "differentiated again; as a non-leaf it keeps no .grad itself."]


def _non_leaf_grad(trace: Trace, r: Record) -> list[str]:
    made = f"computed by {r.grad_fn}" if r.grad_fn else "computed from other tensors"
    got = [(trace.passes[i], g) for i, g in sorted(r.grads.items()) if i < len(trace.passes)]
    if r.retains_grad:
        head = f"{_where(r)} is not a leaf ({made}), but retain_grad() was called, so its .grad is kept"
        return [_sentence(head + (f": {_grad(r.attr_grad)}" if r.attr_grad is not None else ""))]
    keep = f"Call {r.name}.retain_grad() before backward() to keep it." if r.name else (
        "Name it and call .retain_grad() on it before backward() to keep it."
    )
    rebound = rebound_sentences(trace, r)  # `w = w - lr * w.grad`: the name holds a result now, not the leaf
    hidden = _hidden_leaf(trace, r) if rebound is None else None
    if hidden is not None:  # `w = torch.randn(3, requires_grad=True).double()`: meant as the leaf, it is not
        keep = (f"The leaf is `{hidden.label}`, which no name holds: it gets the .grad. To make `{r.name}` the "
                f"leaf (an optimizer needs one), set requires_grad on the tensor in its final form{_final_form(hidden, r)}.")
    out = rebound or [f"{_where(r)} is not a leaf ({made}), so PyTorch does not keep its gradient: its .grad is None. {keep}"]
    for p, g in got:
        would = "" if p.kind == "grad" or rebound else "; with retain_grad() that is what .grad would show"
        raised = ", which then raised an error," if p.error else ""  # its pre-hook saw this before the engine failed
        out.append(_sentence(f"In {_pass_where(p)}{raised} it received {_grad(g)}{would}"))
    if not got and trace.passes:
        unknown = _past_limit(trace, r)
        out.append(unknown if unknown is not None else "No backward pass in this cell reached it: " + _unreached(trace, r))
    return out + _odd_values(trace, r)


def rebound_sentences(trace: Trace, r: Record) -> Optional[list[str]]:
    """`w = w - lr * w.grad` (or `x = x * 2`) with gradients on: the name `r` is bound to was rebound
    to a result computed from the tensor it held, so it names a non-leaf now; the gradient goes on
    to the leaf it came from, which no name may hold any more. The classroom's "why is w.grad None
    in the second step?": the answer is an in-place update under no_grad, not retain_grad(). None
    when `r` is no such rebinding."""
    name, expr = r.name, r.expr or ""
    if not name or r.is_leaf or r.grad_fn is None or not re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", expr):
        return None
    # the tensor the name held: a leaf that requires grad, among the statement's own inputs (a
    # recurrence, `h = torch.tanh(W @ h + x)`, rebinds a name that held a result: not this)
    leaf = next((a for a in _statement_inputs(trace, r) if a.is_leaf and a.requires_grad and a.name in (name, None)), None)
    if leaf is None:
        return None
    statement = f"`{name} = {expr}`" + (f" on line {r.line}" if r.line is not None else "")
    if r.line is None and r.made_in is not None:
        statement += f" (cell [{r.made_in[0]}]" + (f", line {r.made_in[1]})" if r.made_in[1] is not None else ")")
    out = [f"`{name}` is not a leaf: {statement} rebound the name to a new tensor computed from the `{name}` "
           f"before it ({r.grad_fn}, as gradients were on), and PyTorch keeps .grad only for leaves, so "
           f"`{name}.grad` is None."]
    called = f"the first `{name}`" if leaf.name == name else f"the earlier `{name}`, which no name holds now"
    got = f": its .grad is {_grad(leaf.attr_grad)}" if leaf.attr_grad is not None else ""
    out.append(f"The gradient goes on to the leaf it came from, {called}{got}.")
    update = re.fullmatch(rf"\s*{re.escape(name)}\s*([-+])\s*(.+)", expr)
    if ".grad" in expr:  # an update step written as a rebinding
        inplace = f"`{name} {update.group(1)}= {update.group(2).strip()}`" if update else f"`{name}.copy_(...)`"
        out.append(f"To update a tensor you train, change it in place with gradients off: "
                   f"`with torch.no_grad():` then {inplace}; then clear its gradient (`{name}.grad = None`) "
                   "before the next backward call.")
    else:
        out.append(f"To keep the leaf's .grad, bind the result to a new name (`{name}2 = {expr}`); or call "
                   f"{name}.retain_grad() before backward() to keep this tensor's.")
    return out


def _statement_inputs(trace: Trace, r: Record) -> Iterable[Record]:
    """The inputs of `r`'s statement: its own, and those of the sub-expressions it was computed from
    on the same line (`0.1 * w.grad` of `w - 0.1 * w.grad`)."""
    seen, stack = {r.id}, list(r.inputs)
    while stack:
        i = stack.pop(0)
        if i in seen or not 0 <= i < len(trace.records):
            continue
        seen.add(i)
        a = trace.records[i]
        yield a
        if not a.external and a.line == r.line and a.line is not None:
            stack.extend(a.inputs)


def _final_form(leaf: Record, r: Record) -> str:
    """The advice's code, e.g. ": `w = torch.randn(3).double().requires_grad_()`", when `r`'s source shows it; else ""."""
    expr, made = r.expr or "", leaf.expr or ""
    plain = re.sub(r",\s*requires_grad\s*=\s*True|requires_grad\s*=\s*True\s*,?\s*", "", made, count=1)
    if plain == made or made not in expr:
        return ""
    final = expr.replace(made, plain, 1)
    final = final if re.fullmatch(r"[\w.]+(\(.*\))?", final) and final.endswith(")") else f"({final})"
    return f": `{r.name} = {final}.requires_grad_()`"


def _hidden_leaf(trace: Trace, r: Record) -> Optional[Record]:
    """The leaf `r` was made from on its own line with nothing between, when no name holds that leaf
    (`w = torch.randn(3, requires_grad=True) * 2`, `.double()`, `.view(2, 2)`, `.to(...)`): the
    student meant `r` as the leaf. None otherwise."""
    if not r.name or r.line is None or len(r.inputs) > 2:
        return None
    for i in r.inputs:
        leaf = trace.records[i] if 0 <= i < len(trace.records) else None
        if (leaf is not None and leaf.is_leaf and leaf.requires_grad and not leaf.external and leaf.name is None
                and leaf.line == r.line and not leaf.internal):
            return leaf
    return None


def _non_finite(p: Optional[Preview]) -> bool:
    if p is None:
        return False
    if any(v is not None and not math.isfinite(v) for v in (p.min, p.max, p.mean)):
        return True
    vals = p.values
    return vals is not None and np.issubdtype(np.asarray(vals).dtype, np.floating) and not np.all(np.isfinite(vals))


def _odd_values(trace: Trace, r: Record) -> list[str]:
    """Gradients that are nan/inf (where they first appeared) or exactly zero everywhere."""
    for i, g in sorted(r.grads.items()):
        if _non_finite(g) and i < len(trace.passes):
            return [f"Its gradient contains nan or inf. {_non_finite_origin(trace, trace.passes[i])}"]
    # what backward delivered (a .grad zeroed after the pass, zero_grad(set_to_none=False), is not a zero slope)
    last = max(r.grads) if r.grads else None
    g = r.grads[last] if last is not None else None
    if r.is_leaf and g is not None and g.complete and g.numel and not np.any(np.asarray(g.values)):
        zeroed = _zeroing_step(trace, last) if last < len(trace.passes) else None
        if zeroed is None and all(i < len(trace.passes) and trace.passes[i].kind == "grad" for i in r.grads):
            return []  # autograd.grad's zeros for an input it did not use (materialize_grads=True)
        if zeroed is None:
            return ["Its gradient is zero everywhere: at these values the slope of some op on the way is 0 "
                    "(relu or clamp outside their active range, a kink such as abs at 0, a flat point such as "
                    "x**2 at 0, or rounding and comparisons, which are flat everywhere)."]
        s, why = zeroed
        who = f" (for `{s.labels[0]}`)" if s.labels else ""
        where = f" on line {s.line}" if s.line is not None else ""
        return [f"Its gradient is zero everywhere: {s.node}{who}{where} received a nonzero gradient and sent "
                f"zeros on: {why}."]
    return []


# what makes an op's slope 0, by node: the reason a zero gradient starts there
_ZERO_SLOPE = {
    "ReluBackward0": "relu passes no gradient where its input was ≤ 0",
    "ThresholdBackward0": "relu passes no gradient where its input was ≤ 0",
    "HardtanhBackward0": "it is flat outside its range",
    "ClampBackward1": "clamp is flat outside its range",
    "ClampMinBackward0": "clamp is flat below its minimum",
    "ClampMaxBackward0": "clamp is flat above its maximum",
    "AbsBackward0": "abs has a kink at 0, where torch takes the slope 0 (a subgradient)",
    "SgnBackward0": "sign is flat everywhere",
    "SignBackward0": "sign is flat everywhere",
    "RoundBackward0": "rounding is flat everywhere (its steps have no slope)",
    "RoundBackward1": "rounding is flat everywhere (its steps have no slope)",
    "FloorBackward0": "floor is flat everywhere (its steps have no slope)",
    "CeilBackward0": "ceil is flat everywhere (its steps have no slope)",
    "TruncBackward0": "trunc is flat everywhere (its steps have no slope)",
    "PowBackward0": "a power's slope is 0 at 0 (x**2 is flat there)",
    "MaxBackward0": "max passes gradient only to the elements it picked",
    "MinBackward0": "min passes gradient only to the elements it picked",
}


def _zeroing_step(trace: Trace, index: int):
    """The first step of pass `index` that received a nonzero gradient and sent only zeros: (the
    step as the stepper shows it, why its slope is 0), or None."""
    def zeros(p) -> bool:
        return p is not None and p.complete and p.numel > 0 and not np.any(np.asarray(p.values))

    def nonzero(p) -> bool:
        return p is not None and p.complete and bool(np.any(np.asarray(p.values)))

    for s in steps(trace, index):
        sent = [g for g in s.grad_out if g is not None]
        if any(nonzero(g) for g in s.grad_in) and sent and all(zeros(g) for g in sent):
            return s, _ZERO_SLOPE.get(s.node, f"the slope of {s.node.replace('Backward0', '').lower()} is 0 at these values")
    return None


def _non_finite_origin(trace: Trace, p: BackwardPass) -> str:
    """The first node that got finite gradients and sent non-finite ones on."""
    for s in steps(trace, p.index):
        if not any(_non_finite(g) for g in s.grad_in) and any(_non_finite(g) for g in s.grad_out):
            who = f" for `{s.labels[0]}`" if s.labels else ""
            where = f" (line {s.line})" if s.line is not None else ""
            return f"It first appears in {s.node}{who}{where}, whose rule is: {s.rule}. Look for a division by zero, sqrt or log at 0 there."
    return "The values differentiated may already contain nan or inf."


def explain_all(trace: Trace) -> dict[int, list[str]]:
    """`explain_record` for every record."""
    return {r.id: explain_record(trace, r.id) for r in trace.records}
