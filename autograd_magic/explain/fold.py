"""Folding the trace into a drawable set of nodes, before any layout.

A 200-step training loop or a module with hundreds of internal ops must still
give a drawing a person can read (and Graphviz can lay out in a second). So
the records are grouped into *units*, each drawn as one node:

- a call site: the ops that ran inside one module or function call
  (`record.internal` set) fold into one node named after the call;
- the module parameters only that call reads fold into it too;
- loop repetitions: when more than a few runs of one source expression were
  kept, the first ones stay and the rest fold into one "×N" node;
- the budget: past `max_nodes`, the middle of the run folds into one
  "… N more nodes folded" note, keeping the start (inputs, leaves) and the
  end (the loss).

`unfold` names what the user expanded: record ids, DOT node names ("r12")
or source spans; a unit holding any of them is not folded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..data.trace import Record, Trace
from .. import limits

FEW = 3  # kept runs of one expression drawn one by one before folding
KEEP = 2  # runs still drawn on their own when a loop folds


@dataclass
class Unit:
    """One drawn node standing for one or more records."""

    key: str  # DOT node name, "r<id>" of `output` (or "more")
    # "record"; "call" (a folded call site); "repeat" (folded loop runs);
    # "params" (parameters no recorded op read); "more" (the budget's remainder)
    kind: str
    records: list[int]
    output: int  # the record whose value and grad the node shows
    fold_key: Optional[tuple] = None  # units sharing it are runs of one expression
    title: str = ""  # what a folded node says it is
    ops: int = 1  # tensor ops inside
    runs: int = 1  # loop runs folded into this node
    params: int = 0  # parameters folded into a call node
    not_kept: int = 0  # ops of this site that ran but were not recorded (trace.repeats)
    hidden_nodes: int = 0  # for "more": drawn nodes it replaces


@dataclass
class Folded:
    units: list[Unit]
    unit_of: dict[int, Unit] = field(default_factory=dict)  # record id -> its unit
    acc: set[int] = field(default_factory=set)  # leaves drawn with an AccumulateGrad node

    @property
    def hidden(self) -> int:
        return sum(u.hidden_nodes for u in self.units if u.kind == "more")


# ---------------------------------------------------------------- public


def fold(trace: Trace, unfold: Iterable = (), max_nodes: int = limits.GRAPH_NODES) -> Folded:
    """Group `trace.records` into units, then fit them under `max_nodes` drawn nodes."""
    ids, spans = _normalize_unfold(unfold)
    records = trace.records
    readers = consumers_of(records)
    acc = accumulate_grad_leaves(records, readers)
    units = _call_units(records, readers, ids, spans)
    units = _absorb_parameters(records, readers, units)
    units = _fold_unread_parameters(records, readers, units)
    _count_not_kept(trace, units)
    budget = max(max_nodes - 1, 1)  # one node is kept for the "… more" note
    folded = _fold_runs(records, units, ids, spans, few=FEW, keep=KEEP)
    if _cost(records, acc, folded) > budget:
        folded = _fold_runs(records, units, ids, spans, few=1, keep=1)
    if _cost(records, acc, folded) > budget:
        folded = _truncate(records, acc, folded, budget)
    return Folded(folded, {rid: u for u in folded for rid in u.records}, acc)


def has_op_node(r: Record) -> bool:
    """A record gets its own op node when something made it from inputs or autograd tracks it."""
    return not r.external and (bool(r.inputs) or r.grad_fn is not None)


def accumulate_grad_leaves(records: list[Record], readers: dict[int, set[int]]) -> set[int]:
    """Leaves that require grad and that a recorded op read with autograd on.

    Those are the leaves torch gives an AccumulateGrad node (where `.grad` is
    filled); a leaf nothing differentiable read has none.
    """
    acc = set()
    for r in records:
        if r.is_leaf and r.requires_grad:
            if any(records[c].grad_fn is not None for c in readers.get(r.id, ())):
                acc.add(r.id)
    return acc


def unit_cost(records: list[Record], acc: set[int], u: Unit) -> int:
    """Drawn nodes a unit takes: its own, plus op and AccumulateGrad nodes of a plain record."""
    if u.kind != "record":
        return 1
    r = records[u.output]
    return 1 + has_op_node(r) + (r.id in acc)


# ---------------------------------------------------------------- steps


def _normalize_unfold(unfold: Iterable) -> tuple[set[int], set[tuple]]:
    ids: set[int] = set()
    spans: set[tuple] = set()
    for item in unfold or ():
        if isinstance(item, bool):
            continue
        if isinstance(item, int):
            ids.add(item)
        elif isinstance(item, str) and item[:1] == "r" and item[1:].isdigit():
            ids.add(int(item[1:]))
        elif isinstance(item, (tuple, list)):
            spans.add(tuple(item))
    return ids, spans


def _expanded(members: list[int], span, ids: set[int], spans: set[tuple]) -> bool:
    return (span is not None and tuple(span) in spans) or any(m in ids for m in members)


def _call_units(records: list[Record], readers: dict[int, set[int]], ids: set[int], spans: set[tuple]) -> list[Unit]:
    """Runs of internal records of one call site become one call unit each."""
    units: list[Unit] = []
    run: list[Record] = []

    def close() -> None:
        if not run:
            return
        members = [r.id for r in run]
        if _expanded(members, run[0].span, ids, spans):
            for i, r in enumerate(run):
                units.append(_record_unit(r, fold_key=("in", r.span, i, r.output_index)))
        else:
            units.append(_call_unit(readers, run))
        run.clear()

    for r in records:
        if r.internal and not r.external:
            if run and run[-1].span != r.span:
                close()
            run.append(r)
            continue
        if r.external:  # parameters read mid-call do not end the call
            units.append(_record_unit(r, fold_key=None))
            continue
        close()
        units.append(_record_unit(r, fold_key=("at", r.span, r.output_index) if r.span else None))
    close()
    return _order(units)


def call_outputs(records: list[Record]) -> set[int]:
    """The record each call site's run of ops shows (what the call returned, as its graph node
    shows it), for every call of the cell, none folded away."""
    return {u.output for u in _call_units(records, consumers_of(records), set(), set()) if u.kind == "call"}


def _record_unit(r: Record, fold_key) -> Unit:
    return Unit(key=f"r{r.id}", kind="record", records=[r.id], output=r.id, fold_key=fold_key)


def _call_unit(readers: dict[int, set[int]], run: list[Record]) -> Unit:
    members = {r.id for r in run}
    consumed_outside = [r.id for r in run if readers.get(r.id, set()) - members]
    output = consumed_outside[-1] if consumed_outside else run[-1].id
    return Unit(
        key=f"r{output}",
        kind="call",
        records=[r.id for r in run],
        output=output,
        fold_key=("call", run[0].span),
        title=_call_title(run),
        ops=len(run),
    )


def _call_title(run: list[Record]) -> str:
    """`model(X)` · model: Linear.forward, ReLU.forward."""
    names: list[str] = []
    for r in run:
        if r.internal and r.internal not in names:
            names.append(r.internal)
    shown = ", ".join(names[:3]) + (f", +{len(names) - 3}" if len(names) > 3 else "")
    module = _common_module([r.module for r in run])
    return f"{module}: {shown}" if module else shown


def _common_module(paths: list[Optional[str]]) -> Optional[str]:
    parts = [p.split(".") for p in paths if p]
    if not parts or len(parts) < len(paths):
        return None
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common) or None


def consumers_of(records: list[Record]) -> dict[int, set[int]]:
    """Record id -> ids of the records that read it (or changed it in place)."""
    table: dict[int, set[int]] = {}
    for r in records:
        for i in r.inputs:
            table.setdefault(i, set()).add(r.id)
        if r.mutates is not None:
            table.setdefault(r.mutates, set()).add(r.id)
    return table


def _order(units: list[Unit]) -> list[Unit]:
    return sorted(units, key=lambda u: u.records[0])


def _absorb_parameters(records: list[Record], readers: dict[int, set[int]], units: list[Unit]) -> list[Unit]:
    """Module parameters read only inside one folded call are drawn inside it.

    Only unnamed tensors and module paths (`layers.0.weight`) fold: a tensor the
    user named (`X`, `w`) stays visible even when a call is all that reads it.
    """
    owner = {rid: u for u in units for rid in u.records}
    kept: list[Unit] = []
    for u in units:
        r = records[u.output]
        if u.kind == "record" and r.external and (r.name is None or "." in r.name):
            owners = {owner[c].key: owner[c] for c in readers.get(r.id, ()) if c in owner}
            target = next(iter(owners.values())) if len(owners) == 1 else None
            if target is not None and target.kind == "call":
                target.records.append(r.id)
                target.params += 1
                continue
        kept.append(u)
    for u in kept:
        u.records.sort()
    return kept


def _fold_unread_parameters(records: list[Record], readers: dict[int, set[int]], units: list[Unit]) -> list[Unit]:
    """Parameters only the backward pass saw (their readers were not kept) fold per module.

    With the default detail limit a 6-layer transformer keeps 3 of its ops,
    yet backward fills 72 parameter grads: one node says so instead of 72.
    """
    groups: dict[str, list[Unit]] = {}
    for u in units:
        r = records[u.output]
        if u.kind == "record" and r.external and not readers.get(r.id) and (r.name is None or "." in r.name):
            groups.setdefault((r.name or "").split(".")[0], []).append(u)
    fold_ids = {id(u) for g in groups.values() if len(g) > FEW for u in g}
    out = [u for u in units if id(u) not in fold_ids]
    for prefix, group in groups.items():
        if len(group) > FEW:
            rids = [u.output for u in group]
            title = f"{prefix or 'unnamed'}.* parameters"
            out.append(Unit(key=f"r{rids[0]}", kind="params", records=rids, output=rids[0], title=title, ops=0))
    return _order(out)


def _count_not_kept(trace: Trace, units: list[Unit]) -> None:
    for u in units:
        u.not_kept = sum(trace.repeats.get(rid, 0) for rid in u.records)


def _external_key(r: Record) -> Optional[tuple]:
    """Unread copies of one outside tensor (e.g. each unkept iteration's `loss`) fold together."""
    if not r.external or r.inputs:
        return None
    return ("ext", r.name, r.grad_fn, r.shape)


def _fold_runs(records, units: list[Unit], ids, spans, few: int, keep: int) -> list[Unit]:
    """Past `few` runs of one expression, runs after the first `keep` fold into one node."""
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        key = u.fold_key if u.fold_key is not None else _external_key(records[u.output])
        if key is not None:
            groups.setdefault(key, []).append(u)
    replace: dict[int, Optional[Unit]] = {}  # id(unit) -> its repeat unit, or None to drop
    for key, runs in groups.items():
        if len(runs) <= few:
            continue
        members = [rid for u in runs for rid in u.records]
        span = key[1] if key[0] != "ext" else None
        if _expanded(members, span, ids, spans):
            continue
        keep_n = 1 if key[0] == "ext" else keep
        rest = runs[keep_n:]
        # drawn where the last run ran: the budget keeps the end of a run (the last loss)
        replace[id(rest[-1])] = _repeat_unit(records, rest)
        for u in rest[:-1]:
            replace[id(u)] = None
    out: list[Unit] = []
    for u in units:
        if id(u) not in replace:
            out.append(u)
        elif replace[id(u)] is not None:
            out.append(replace[id(u)])
    return out


def _repeat_unit(records: list[Record], runs: list[Unit]) -> Unit:
    last = runs[-1]
    first = runs[0]
    title = first.title if first.kind == "call" else ""
    return Unit(
        key=f"r{last.output}",
        kind="repeat",
        records=sorted(rid for u in runs for rid in u.records),
        output=last.output,
        fold_key=first.fold_key,
        title=title,
        ops=sum(u.ops for u in runs),
        runs=len(runs),
        params=sum(u.params for u in runs),
        not_kept=sum(u.not_kept for u in runs),
    )


def _cost(records: list[Record], acc: set[int], units: list[Unit]) -> int:
    return sum(unit_cost(records, acc, u) for u in units)


def _truncate(records: list[Record], acc: set[int], units: list[Unit], budget: int) -> list[Unit]:
    """Keep the start (leaves, inputs) and the end (the loss); fold the middle into one note."""
    head_budget = (budget * 2) // 3
    head: list[Unit] = []
    spent = 0
    for u in units:
        c = unit_cost(records, acc, u)
        if spent + c > head_budget:
            break
        head.append(u)
        spent += c
    tail: list[Unit] = []
    for u in reversed(units[len(head) :]):
        c = unit_cost(records, acc, u)
        if spent + c > budget:
            break
        tail.append(u)
        spent += c
    tail.reverse()
    middle = units[len(head) : len(units) - len(tail)]
    if not middle:
        return units
    hidden = [rid for u in middle for rid in u.records]
    more = Unit(
        key="more",
        kind="more",
        records=sorted(hidden),
        output=middle[-1].output,
        title="",
        ops=len(hidden),
        hidden_nodes=_cost(records, acc, middle),
    )
    return head + [more] + tail
