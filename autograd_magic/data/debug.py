"""Plain data for debugging a real training cell: where a NaN or an Inf first appeared, and
how large the gradient each parameter received was (issue 16).

Computed from a Trace by `explain/debug.py` and read by every view; like the rest of
`data/`, nothing here holds a tensor, so it pickles, compares and renders without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .trace import Preview


@dataclass
class Operand:
    """An input of the op where a NaN or an Inf first appeared, as the trace previewed it."""

    record: int
    label: str
    preview: Optional[Preview] = None
    kind: Optional[str] = None  # "nan" or "inf" when this input already held one, else None


@dataclass
class NonFinite:
    """The first recorded op (in execution order) whose output holds a NaN or an Inf.

    `kind` is "nan" when the output holds a NaN (it may hold an Inf as well), else "inf".
    `count` is how many elements are non-finite when the preview holds every element,
    else None (the statistics tell that some are, not how many).
    """

    record: int
    kind: str
    op: str
    label: str
    line: Optional[int] = None
    expr: Optional[str] = None
    occurrence: int = 0  # the loop iteration of this line, 0 for the first run
    run: Optional[int] = None  # found past --limit: how many times this very op ran before
    iteration: Optional[int] = None  # ... and how many backward calls came before it (one a loop iteration: its index)
    module: Optional[str] = None
    step: bool = False  # made by an optimizer step (an update op in it, or a step found past --limit)
    external: bool = False  # the tensor came from outside the cell already holding it
    preview: Optional[Preview] = None
    count: Optional[int] = None
    inputs: list[Operand] = field(default_factory=list)


@dataclass
class BackwardNonFinite:
    """In one backward pass, the first node (in the order the engine ran them) whose
    gradient is non-finite: what it received and what it sent on.

    `received_nonfinite` tells whether the node already received a non-finite gradient
    (from the gradient given to `backward()`, or from a node the trace did not see);
    otherwise the gradient turned non-finite in this node. `step` is None when the pass was
    too large to keep its steps: the node is then found from the records' gradients.
    """

    pass_index: int
    step: Optional[int]
    node: str
    kind: str  # "nan" or "inf", of the first non-finite gradient it received or sent
    received_nonfinite: bool
    records: list[int] = field(default_factory=list)  # tensors whose gradient this node received
    received: list[Optional[Preview]] = field(default_factory=list)
    sent: list[Optional[Preview]] = field(default_factory=list)  # per input edge
    sent_to: list[Optional[str]] = field(default_factory=list)  # the node of each input edge
    targets: list[int] = field(default_factory=list)  # records that got a non-finite gradient from it


@dataclass
class ParamGrad:
    """The gradient one parameter received in one pass: its norm and a flag.

    `norm` is None when its gradient's statistics were not taken (a tensor too large).
    """

    record: int
    label: str  # its path, `model.0.weight`, or what made it
    module: Optional[str]  # the module it belongs to, `model.0`
    norm: Optional[float]
    flag: Optional[str] = None  # "vanishing", "exploding" or None
    value_norm: Optional[float] = None  # the norm of the parameter itself when the pass ran


@dataclass
class ModuleGrad:
    """A module's gradient in one pass: the norm over all its parameters together,
    sqrt(sum of their norms squared), as `clip_grad_norm_` would count it."""

    module: str
    norm: Optional[float]
    params: list[int] = field(default_factory=list)  # record ids, in forward order
    flag: Optional[str] = None
    value_norm: Optional[float] = None  # the norm of its parameters' values together


@dataclass
class PassFlow:
    """Gradient flow in one backward pass: every parameter that received a gradient.

    Flags (see `explain/debug.py`): "vanishing" below VANISHING x the pass's largest
    norm; "exploding" non-finite, or above EXPLODING x the norm of the parameter's own value.
    `total` is the norm over every parameter together (what `clip_grad_norm_` returns).
    """

    pass_index: int
    params: list[ParamGrad] = field(default_factory=list)
    modules: list[ModuleGrad] = field(default_factory=list)
    largest: Optional[float] = None
    median: Optional[float] = None
    total: Optional[float] = None

    @property
    def flagged(self) -> list[ParamGrad]:
        return [p for p in self.params if p.flag]


@dataclass
class IterationScalars:
    """One backward call of the cell: the scalars a training loop's chart draws.

    `loss` is the value of the tensor differentiated when it has one element; `grad_norm`
    the norm over every gradient the pass put into leaves (what `clip_grad_norm_` counts
    after `zero_grad()`), or over what `autograd.grad` returned. Both are None when unknown.
    `pass_index` is the recorded `BackwardPass`; None for a call past `--limit`, which runs
    unrecorded but still gives these.
    """

    index: int  # the cell's backward calls, in order, from 0
    line: Optional[int] = None
    loss: Optional[float] = None
    grad_norm: Optional[float] = None
    pass_index: Optional[int] = None

    @property
    def finite(self) -> bool:
        """False when the loss or the gradient norm is a NaN or an Inf."""
        return all(v is None or math.isfinite(v) for v in (self.loss, self.grad_norm))

    @property
    def recorded(self) -> bool:
        return self.pass_index is not None
