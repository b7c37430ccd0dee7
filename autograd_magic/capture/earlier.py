"""The records of earlier traced cells, found again by the autograd nodes that made them.

Students write a notebook cell by cell: `y = ...` in one cell, `y.backward()`
in the next. The backward cell is where the chain rule happens, but its own
trace knows only `x` and `y`. So each traced cell leaves its records here,
keyed by their autograd node (`torch_compat.node_key`); a later cell's
backward pass that reaches such a node brings the record (its name, source
text, value) into the new trace, where it receives the gradient this pass
sends it.

Only previews are kept (no tensors), within `limits.NOTEBOOK_RECORDS`, oldest
cells first out; a cell's records go as soon as none of its tensors that
carry a graph is alive (their nodes are then gone or unreachable from user
code). Autograd nodes cannot be weakly referenced, hence the tensors.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import torch

from .. import limits
from ..data.trace import Origin, Trace


@dataclass
class CellRecords:
    """One earlier traced cell: its trace and how to find its records again."""

    cell: int  # the cell's execution count
    trace: Trace
    by_node: dict[tuple, list[tuple[int, int]]]  # node key -> [(output_nr, record id)]
    tensors: dict[int, weakref.ref] = field(default_factory=dict)  # record id -> its tensor, if weakly referable
    node_of: dict[int, tuple[tuple, int]] = field(default_factory=dict)  # record id -> (node key, output_nr)
    # its inputs from outside it that carry a graph: record id -> (node key, output_nr). Another
    # earlier cell may have made them (`z = y*y*2`, then `z = z.mean()`): that cell's records stand in
    outer: dict[int, tuple[tuple, int]] = field(default_factory=dict)
    # its live tensors with no history because something in the cell cut them off the graph
    # (no_grad, .detach(), .data): record id -> where and how, for the explanations of later cells
    cuts: dict[int, Origin] = field(default_factory=dict)
    # its live tensors, each by the record that made it: record id -> (its execution count, line)
    made: dict[int, tuple[int, Optional[int]]] = field(default_factory=dict)
    # its live tensors that had a name in it: record id -> that name (`w`, `w.grad`, `model.0.weight`)
    names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, outs in self.by_node.items():
            for out_nr, rid in outs:
                self.node_of[rid] = (key, out_nr)

    def alive(self) -> bool:
        """Some tensor of this cell that carries a graph is still alive."""
        for rid, ref in self.tensors.items():
            t = ref()
            if t is not None and rid in self.node_of:
                return True
        return False

    def tensor(self, rid: int) -> Optional[torch.Tensor]:
        ref = self.tensors.get(rid)
        return ref() if ref is not None else None


class EarlierCells:
    """The notebook's traced cells, newest last; one per kernel (see `notebook/session.py`)."""

    def __init__(self, budget: int = limits.NOTEBOOK_RECORDS) -> None:
        self.budget = budget
        self._cells: list[CellRecords] = []
        self._index: dict[tuple, CellRecords] = {}
        self._cuts: dict[int, tuple[weakref.ref, Origin]] = {}  # id(tensor) -> (its tensor, its Origin)
        self._made: dict[int, tuple[weakref.ref, tuple]] = {}  # id(tensor) -> (its tensor, (cell, line))
        self._names: dict[int, tuple[weakref.ref, str]] = {}  # id(tensor) -> (its tensor, its name there)

    def remember(self, cell: CellRecords) -> None:
        self._remember_cuts(cell)
        if not cell.by_node:
            return
        self._cells.append(cell)
        for key in cell.by_node:
            self._index[key] = cell  # the newest cell wins a (never expected) key collision
        self.prune()

    def _remember_cuts(self, cell: CellRecords) -> None:
        self._cuts = self._by_tensor(self._cuts, cell, cell.cuts)
        self._made = self._by_tensor(self._made, cell, cell.made)
        self._names = self._by_tensor(self._names, cell, cell.names)

    def _by_tensor(self, index: dict, cell: CellRecords, facts: dict) -> dict:
        """`index` (id(tensor) -> (its tensor, a fact)) with `facts` (record id -> fact) of `cell`'s
        live tensors; the newest cell's word on a tensor wins. The dead go, then the oldest past the
        budget (dicts keep insertion order)."""
        for rid, fact in facts.items():
            ref = cell.tensors.get(rid)
            t = ref() if ref is not None else None
            if t is not None:
                index.pop(id(t), None)  # re-inserted last: the newest
                index[id(t)] = (ref, fact)
        if not facts:
            return index
        index = {k: v for k, v in index.items() if v[0]() is not None}
        while len(index) > self.budget:
            del index[next(iter(index))]
        return index

    def origin_of(self, t: torch.Tensor) -> Optional[Origin]:
        """How an earlier traced cell cut `t` off the graph, if one did (see `CellRecords.cuts`)."""
        hit = self._cuts.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def made_in(self, t: torch.Tensor) -> Optional[tuple[int, Optional[int]]]:
        """(execution count, line) of the earlier traced cell that made `t`, if one did."""
        hit = self._made.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def name_of(self, t: torch.Tensor) -> Optional[str]:
        """The name the newest earlier traced cell knew `t` by, if one did."""
        hit = self._names.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def find(self, key: tuple) -> Optional[tuple[CellRecords, list[tuple[int, int]]]]:
        cell = self._index.get(key)
        if cell is None:
            return None
        return cell, cell.by_node[key]

    def prune(self) -> None:
        """Drop cells whose graphs are gone, then the oldest ones past the budget. A cell none of
        whose tensors is alive is kept while a kept later cell's graph runs through its nodes
        (`z = z.mean()` keeps the cell that made the first `z`, whose tensor is gone)."""
        needed = {id(c) for c in self._cells if c.alive()}
        for c in reversed(self._cells):  # newest first: a cell only reaches into older ones
            if id(c) not in needed:
                continue
            for key, _ in c.outer.values():
                owner = self._index.get(key)
                if owner is not None and owner is not c:
                    needed.add(id(owner))
        kept = [c for c in self._cells if id(c) in needed]
        total = 0
        for i in range(len(kept) - 1, -1, -1):
            total += len(kept[i].trace.records)
            if total > self.budget:
                kept = kept[i + 1:]
                break
        if len(kept) != len(self._cells):
            self._cells = kept
            self._index = {key: c for c in kept for key in c.by_node}

    def __iter__(self) -> Iterator[CellRecords]:
        return iter(self._cells)

    def __len__(self) -> int:
        return len(self._cells)


def bring_in(tracer, cell: CellRecords, rid: int) -> int:
    """Copy record `rid` of an earlier `cell` into `tracer`'s trace, with what it was computed from;
    its id there. A record whose tensor is still alive is found through that tensor instead
    (`x`, a parameter), so each tensor has one record. Iterative: graphs can be thousands deep."""
    brought = tracer.brought
    order: list[int] = []
    stack, seen = [rid], set()
    while stack:  # the earlier records this one was computed from, not yet here
        r = stack.pop()
        if r in seen or (id(cell), r) in brought:
            continue
        seen.add(r)
        if r != rid and cell.tensor(r) is not None:
            continue  # alive: the tracer's own record of that tensor stands in
        if r != rid and _made_earlier(tracer, cell, r) is not None:
            continue  # an input another earlier cell made: that cell's record stands in
        order.append(r)
        stack.extend(i for i in cell.trace.records[r].inputs if 0 <= i < len(cell.trace.records))
    records = tracer.trace.records
    for r in sorted(order):  # a trace lists inputs before what is made from them
        src = cell.trace.records[r]
        copy = replace(
            src, id=len(records), inputs=[], grads={}, attr_grad=None, mutates=None, line=None, span=None,
            cell=src.cell if src.cell is not None else cell.cell,
            cell_line=src.cell_line if src.cell is not None else src.line,
        )
        records.append(copy)
        brought[(id(cell), r)] = copy.id
        if r in cell.node_of:  # its node's pre-hook will hand it this pass's gradient
            key, out_nr = cell.node_of[r]
            tracer.backward.node_records.setdefault(key, []).append((out_nr, copy.id))
    for r in order:
        copy = records[brought[(id(cell), r)]]
        copy.inputs = [_input_here(tracer, cell, i) for i in cell.trace.records[r].inputs]
    here = brought.get((id(cell), rid))
    return here if here is not None else tracer.record_for(cell.tensor(rid), from_earlier=True)


def stand_in(tracer, cell: CellRecords, rid: int, rec) -> None:
    """`rec`, this run's external record of the tensor an earlier `cell`'s record `rid` made, becomes
    that record here: its op, source and cell, with what it was computed from brought in. One record
    per tensor: the value `rec` shows is the tensor's, as this run first saw it."""
    src = cell.trace.records[rid]
    tracer.brought[(id(cell), rid)] = rec.id
    rec.op, rec.expr, rec.external = src.op, src.expr, False
    rec.internal, rec.module, rec.inplace = src.internal, src.module, src.inplace
    rec.cell = src.cell if src.cell is not None else cell.cell
    rec.cell_line = src.cell_line if src.cell is not None else src.line
    if rec.name is None:
        rec.name = src.name
    rec.inputs = [_input_here(tracer, cell, i) if (id(cell), i) in tracer.brought or cell.tensor(i) is not None
                  or _made_earlier(tracer, cell, i) is not None else bring_in(tracer, cell, i)
                  for i in src.inputs if 0 <= i < len(cell.trace.records)]


def _input_here(tracer, cell: CellRecords, rid: int) -> int:
    t = cell.tensor(rid)
    if t is not None:
        return tracer.record_for(t, from_earlier=True)
    here = tracer.brought.get((id(cell), rid))
    if here is None:
        found = _made_earlier(tracer, cell, rid)
        if found is not None:
            return bring_in(tracer, *found)
    return tracer.brought[(id(cell), rid)]


def _made_earlier(tracer, cell: CellRecords, rid: int) -> Optional[tuple[CellRecords, int]]:
    """`cell`'s input `rid` (an external record), when another earlier cell made it: that cell
    and its own record of it."""
    outer = cell.outer.get(rid)
    if outer is None or tracer.earlier is None:
        return None
    key, out_nr = outer
    found = tracer.earlier.find(key)
    if found is None or found[0] is cell:
        return None
    other, outs = found
    orid = next((r for o, r in outs if o == out_nr), None)
    return (other, orid) if orid is not None else None
