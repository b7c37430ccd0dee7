"""The explorer as plain data: the cell's scalar inputs, the curve, the Jacobian.

A student moves an input (a 0-d float leaf with requires_grad that the cell's
output depends on) and sees values and gradients follow; beside it, the output
plotted against that input with the tangent autograd computed and the
central-difference secant; for a non-scalar output reached with `backward(v)`
(or a small vector leaf), the Jacobian and v·J next to the leaf's `.grad`.

`variants/explore.py` computes these in the sandbox; `render/explore.py` draws
them (the snapshot's inline SVG), the widget sends them to the page. Nothing
here holds a tensor: lists of floats only (None where a value is not finite or
the run failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


# How a Jacobian over `limits.JACOBIAN_MAX_ENTRIES` begins its note ("too big: 300 × 300 = 90000 entries > 1024")
TOO_BIG = "too big:"


@dataclass
class ScalarInput:
    """One control: a 0-d float leaf with requires_grad that the output depends on."""

    record: int  # its record id in the real run (`Trace.records`)
    label: str  # what the view calls it (`x`)
    value: float  # its value in the real run
    lo: float  # the slider's range, and the curve's
    hi: float
    step: float
    external: bool = False  # made in an earlier cell (set by name in the sandbox), else by this cell


@dataclass
class Curve:
    """The output against one input over [lo, hi], at the cell's values of every other input."""

    input: int  # record id of the input (a `ScalarInput.record`)
    input_label: str
    output: int  # record id of the output plotted
    output_label: str
    xs: list[float] = field(default_factory=list)
    ys: list[Optional[float]] = field(default_factory=list)  # None: not finite there, or the run failed
    slopes: list[Optional[float]] = field(default_factory=list)  # autograd's d output / d input at each x ([] if not computed)
    x0: Optional[float] = None  # the point shown
    y0: Optional[float] = None
    slope: Optional[float] = None  # the gradient torch computed at x0 (the tangent's slope)
    secant: Optional[float] = None  # (f(x0 + h) - f(x0 - h)) / 2h
    h: Optional[float] = None
    batched: bool = False  # all points came from one batched run
    note: str = ""  # what the view should say (points left out for time, where it failed)


@dataclass
class Jacobian:
    """d output / d input for a small non-scalar output or vector leaf, and v·J against `.grad`."""

    output: int  # record ids in the trace the view shows
    output_label: str
    input: int
    input_label: str
    out_shape: tuple[int, ...] = ()
    in_shape: tuple[int, ...] = ()
    rows: list[list[Optional[float]]] = field(default_factory=list)  # out numel × in numel
    v: Optional[list[float]] = None  # the gradient backward() was given (None: no backward(v))
    vj: Optional[list[Optional[float]]] = None  # v · J, flattened like the input
    grad: Optional[list[Optional[float]]] = None  # the leaf's .grad after the cell (what torch computed)
    agrees: Optional[bool] = None  # v·J equals .grad within tolerance (None: nothing to compare)
    note: str = ""  # why it is missing or partial ("too big: 300 × 300 > 4096 entries")


@dataclass
class Exploration:
    """Everything the explorer shows for one run of a cell."""

    inputs: list[ScalarInput] = field(default_factory=list)
    output: Optional[int] = None  # record id of the output the curve and the Jacobian are of
    output_label: str = ""
    curves: list[Curve] = field(default_factory=list)  # one per input, in `inputs` order
    jacobian: Optional[Jacobian] = None
    note: str = ""  # one line when nothing can be explored, and why (blocked re-runs, no scalar output)

    @property
    def empty(self) -> bool:
        return not self.inputs and self.jacobian is None
