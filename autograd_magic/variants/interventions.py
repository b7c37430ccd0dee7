"""The changes a variant makes, as objects the recorder consults (see `capture/interventions.py`).

`Toggles` is what a user asks for (the magic's `--no-grad` / `--detach`, the
widget's switches): plain values, record ids of the real run. `interventions_for`
turns them into the objects a sandboxed re-run passes to the recorder. The
gradient check adds `Float64` (cast, and nudge one element) and its probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from ..capture.interventions import Intervention
from ..data.trace import Record


@dataclass(frozen=True)
class Toggles:
    """A variant as asked for: grad mode off, tensors cut, leaves' requires_grad flipped, inputs set."""

    no_grad: bool = False
    detach_ids: tuple[int, ...] = ()  # record ids of the real run
    flip_ids: tuple[int, ...] = ()  # record ids of the real run's leaves
    detach_names: tuple[str, ...] = ()  # names or source expressions (`--detach y "3*x + 2"`)
    values: tuple[tuple[int, float], ...] = ()  # the explorer's inputs: (record id of the real run's scalar leaf, new value)

    @property
    def any(self) -> bool:
        return bool(self.no_grad or self.detach_ids or self.flip_ids or self.detach_names or self.values)


def record_key(r: Record) -> tuple:
    """Where a record was made in the source: the same in every run of the same cell."""
    return (r.span, r.occurrence, r.output_index)


class KeepGraphs(Intervention):
    """Every sandboxed run: backward() keeps graphs the real run may still own."""

    keeps_graphs = True


class NoGrad(Intervention):
    disables_grad = True


class Detach(Intervention):
    """Cut tensors from the graph: by the name they are bound to, by source text, or by span."""

    def __init__(self, names: Iterable[str] = (), spans: Iterable[tuple] = ()):
        names = list(names)
        self.names = {n for n in names if n.isidentifier()}
        self.exprs = {"".join(n.split()) for n in names}
        self.spans = set(spans)

    def cuts_expression(self, span: Optional[tuple], expr_key: str) -> bool:
        return span in self.spans or bool(expr_key and expr_key in self.exprs)

    def cuts_name(self, name: str) -> bool:
        return name in self.names


class FlipRequiresGrad(Intervention):
    """Flip requires_grad of leaves the cell itself creates (found by where they were made)."""

    def __init__(self, records: Iterable[Record]):
        self.keys = {record_key(r) for r in records}

    def replace_output(self, record: Record, t: torch.Tensor) -> Optional[torch.Tensor]:
        if record_key(record) not in self.keys:
            return None
        if t.is_leaf:
            t.requires_grad_(not t.requires_grad)  # same object: the recorder keeps following it
            out = t
        else:
            out = t.detach().requires_grad_(not t.requires_grad)
        record.requires_grad, record.is_leaf, record.grad_fn = out.requires_grad, True, None
        return out


class SetValues(Intervention):
    """The explorer's inputs made by the cell: each leaf replaced, where its op made it, by one holding the new value.

    A value is a number, or a tensor (the batched curve's 1-D run of every x). The new
    leaf has the op's dtype and device and requires grad, as the input did; `made`
    keeps it (by record key) so the explorer can differentiate with respect to it.
    """

    def __init__(self, values: dict[tuple, object]):
        self.values = values  # record key -> value
        self.made: dict[tuple, torch.Tensor] = {}

    def replace_output(self, record: Record, t: torch.Tensor) -> Optional[torch.Tensor]:
        key = record_key(record)
        if key not in self.values:
            return None
        out = new_leaf(self.values[key], t)
        self.made[key] = out
        record.requires_grad, record.is_leaf, record.grad_fn = True, True, None
        try:
            from ..capture.preview import preview_quiet

            record.preview = preview_quiet(out)  # the row shows the value the re-run used
        except Exception:  # a preview is bookkeeping: the run goes on
            pass
        return out


def new_leaf(value, like: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with requires_grad holding `value`, with `like`'s dtype and device (never a view of it).

    A tensor that already requires grad is used as it is (cast if need be): the Jacobian's
    run differentiates with respect to the very tensor `torch.autograd.functional.jacobian` passes.
    """
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return value.to(dtype=like.dtype, device=like.device)
    with torch.no_grad():
        t = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach().clone()
    return t.requires_grad_(True)


class Float64(Intervention):
    """The gradient check's run: low-precision float outputs cast to float64, one element nudged by `delta`."""

    def __init__(self, nudge: Optional[tuple[tuple, int, float]] = None):
        self.nudge = nudge  # (record key, flat index, delta)

    def replace_output(self, record: Record, t: torch.Tensor) -> Optional[torch.Tensor]:
        out = as_double(record, t)
        if self.nudge is not None and record_key(record) == self.nudge[0]:
            nudge_element(out, self.nudge[1], self.nudge[2])
        return out if out is not t else None


def nudge_element(t: torch.Tensor, flat_index: int, delta: float) -> None:
    idx = tuple(int(i) for i in np.unravel_index(flat_index, tuple(t.shape)))
    with torch.no_grad():
        t[idx] += delta


def is_low_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64


def as_double(record: Record, t: torch.Tensor) -> torch.Tensor:
    """The op's output in float64, keeping its graph (or its leafness and requires_grad)."""
    if not is_low_float(t):
        return t
    if record.inplace:
        if t.is_leaf:
            t.data = t.data.to(torch.float64)  # same object: the cell keeps using it
        return t
    if t.grad_fn is not None:
        return t.to(torch.float64)
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def interventions_for(toggles: Toggles, original_records: list[Record]) -> tuple[list[Intervention], list[Record], list[Record]]:
    """(the interventions, the cut records, the flipped records the cell does not itself create)."""
    recs = original_records
    cut = [recs[i] for i in toggles.detach_ids if 0 <= i < len(recs)]
    spans = [r.span for r in cut if r.span is not None]
    names = list(toggles.detach_names) + [r.name for r in cut if r.span is None and r.name]
    flips = [recs[i] for i in toggles.flip_ids if 0 <= i < len(recs)]
    made_here = [r for r in flips if r.span is not None and not r.external]
    interventions: list[Intervention] = [KeepGraphs()]
    if toggles.no_grad:
        interventions.append(NoGrad())
    if names or spans:
        interventions.append(Detach(names, spans))
    if made_here:
        interventions.append(FlipRequiresGrad(made_here))
    inside = {record_key(r): v for r, v in _valued(toggles, recs) if not r.external and r.span is not None}
    if inside:
        interventions.append(SetValues(inside))
    return interventions, cut, [r for r in flips if r not in made_here]


def _valued(toggles: Toggles, recs: list[Record]) -> list[tuple[Record, float]]:
    return [(recs[i], float(v)) for i, v in toggles.values if 0 <= i < len(recs)]


def external_values(toggles: Toggles, recs: list[Record]) -> list[tuple[Record, float]]:
    """The inputs made by earlier cells: set by name in the sandbox namespace (`run_variant`)."""
    return [(r, v) for r, v in _valued(toggles, recs) if r.external or r.span is None]
