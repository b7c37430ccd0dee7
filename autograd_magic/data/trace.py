"""The trace as plain data: what the tracer collected, what every view reads.

Nothing here holds a live tensor, a graph node or a reference into torch's
autograd; a Trace can be pickled, compared, rendered and tested without torch
running. Views (text, HTML, DOT, widget) read only these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .explore import Exploration


@dataclass(slots=True)  # one per tensor shown: no per-instance dict, a faster __init__
class Preview:
    """A bounded picture of one tensor's values at one moment.

    `values` holds every element when the tensor is small, otherwise the
    "edge items" torch itself prints (first and last three along each
    dimension, `summarized=True`), or the first elements of the flattened
    tensor (`flat_head=True`) when even that would be too large.
    """

    shape: tuple[int, ...]
    dtype: str  # e.g. "torch.float32"
    device: str = "cpu"
    layout: str = "strided"
    values: Optional[np.ndarray] = None
    summarized: bool = False
    flat_head: bool = False
    min: Optional[float] = None
    max: Optional[float] = None
    mean: Optional[float] = None
    norm: Optional[float] = None
    note: Optional[str] = None  # why values are missing (meta, sparse, ...)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def complete(self) -> bool:
        """True when `values` holds every element of the tensor."""
        return self.values is not None and not self.summarized and not self.flat_head


CUT_OPS = frozenset({"detach", "detach_", "data"})  # ops whose output shares the values with no history
#: the op of `t.data = other`: the tensor's values replaced in place, behind autograd's back (no version bump)
DATA_SET = "data_"
#: the op of `t.requires_grad = flag`: the same change as `t.requires_grad_(flag)`, named so
REQUIRES_GRAD_SET = "requires_grad_"
#: `t.grad = g`: not a change of t's values, but what the next backward pass into t adds to
GRAD_SET = "grad_set_"  # ends in "_": both handlers hand a call returning None to on_op only then


@dataclass
class Origin:
    """Where an earlier traced cell made a tensor with no history that a later cell reads
    (`with torch.no_grad(): y = x * 5` in one cell, `y.backward()` in the next): what cut it
    off the graph. Only facts; the explanations word them."""

    cell: int  # the execution count of the earlier cell that made the tensor
    how: str  # "no_grad", or the cutting op: "detach", "detach_", "data"
    line: Optional[int] = None  # the cutting record's line in that cell
    expr: Optional[str] = None  # its source text
    source: Optional[str] = None  # the label of what it was cut from, when that required grad
    via: Optional[str] = None  # the label of the cut record, when this tensor was computed from it
    cut_cell: Optional[int] = None  # the cell the cut was made in, when not `cell` (a chain across cells)


def untracked_history(records: list, rid: int) -> Iterator["Record"]:
    """`records[rid]` and what it was computed from, nearest first, as far as none of them requires
    grad: the part of its history autograd does not see."""
    stack, seen = [rid], set()
    while stack:
        i = stack.pop(0)
        if i in seen or not 0 <= i < len(records):
            continue
        seen.add(i)
        r = records[i]
        if not r.requires_grad:
            yield r
            stack.extend(r.inputs)


def cut_of(records: list, rid: int) -> Optional[tuple["Record", "Record"]]:
    """The record that cut `records[rid]` off the graph (itself, or the nearest ancestor: a
    `.detach()`/`.data`, or an op under no_grad, of a tensor that requires grad), with that
    input; None when nothing in its history was cut."""
    for r in untracked_history(records, rid):
        grad_inputs = [records[j] for j in r.inputs if 0 <= j < len(records) and records[j].requires_grad]
        if grad_inputs and (r.op in CUT_OPS or not r.grad_enabled):
            return r, grad_inputs[0]
    return None


@dataclass(slots=True)  # one per tensor shown: no per-instance dict, a faster __init__
class Record:
    """One tensor the cell made (or used from outside), in execution order.

    `id` is the record's index in `Trace.records`. `inputs` are the ids of the
    records the op read. An in-place op gets its own record whose `mutates`
    names the record of the tensor it changed.
    """

    id: int
    op: str
    name: Optional[str] = None
    expr: Optional[str] = None
    line: Optional[int] = None  # 1-based line in the cell as the editor shows it
    span: Optional[tuple[int, int, int, int]] = None  # line, col, end_line, end_col
    occurrence: int = 0  # how many times this span ran before (loop iterations)
    grad_fn: Optional[str] = None
    requires_grad: bool = False
    is_leaf: bool = True
    grad_enabled: bool = True
    inplace: bool = False
    mutates: Optional[int] = None
    external: bool = False  # made outside the traced code (earlier cell, from_numpy, Parameter)
    inputs: list[int] = field(default_factory=list)
    output_index: Optional[int] = None  # position in a tuple-returning op
    internal: Optional[str] = None  # where inside a call it ran, e.g. "Linear.forward"
    module: Optional[str] = None  # module path it ran in, e.g. "model.0"
    in_step: bool = False  # made inside an optimizer's step() call (its update of a parameter)
    detached: bool = False  # forced detached by a --detach toggle
    preview: Optional[Preview] = None
    # Gradients: what each backward pass delivered to this tensor (pass index -> preview)
    grads: dict[int, Preview] = field(default_factory=dict)
    # `.grad` as torch shows it after the cell (leaves, or retain_grad), None otherwise
    attr_grad: Optional[Preview] = None
    retains_grad: bool = False
    version_changed: bool = False  # modified in place after this record was taken
    # made by an earlier traced cell (its execution count and line there): a backward in
    # this cell reached it; `line` and `span` are None, as they index this cell's source
    cell: Optional[int] = None
    cell_line: Optional[int] = None
    # a tensor no recorded op made but a call of this cell did: a module's parameter
    # (`torch.nn.Linear(4, 8)` on `line`); still `external` to the ops a re-run can replay
    created_by: Optional[str] = None
    # an op recorded past --limit because its output was the first NaN/Inf found in a loop's
    # later runs (issue 16): how many times this very op ran before it ...
    run: Optional[int] = None
    # ... how many backward calls of the cell came before it, when any ...
    iteration: Optional[int] = None
    # ... and its inputs as they were then, one per `inputs` (their records show their first run)
    input_previews: list[Optional[Preview]] = field(default_factory=list)
    # an input from outside the cell that is a leaf's `.grad` (`x.grad.zero_()`): that leaf's label
    grad_of: Optional[str] = None
    # an input from outside the cell that an earlier traced cell cut off the graph: where and how
    origin: Optional[Origin] = None
    # a leaf's `.grad` at the end against what the last recorded pass into it left: "same", "none"
    # (reset since), "changed" (in place, replaced, or by passes past --limit); None if unknown
    grad_after: Optional[str] = None
    # a custom Function's forward returned this tensor: the record of apply's output (the same tensor)
    became: Optional[int] = None
    # an input from outside the cell that an earlier traced cell made: (its execution count, line there)
    made_in: Optional[tuple[int, Optional[int]]] = None
    # a tensor no name holds now that an earlier traced cell knew by a name (`w` before
    # `w = w - lr * w.grad` rebound it): that name, shown as "earlier w"
    former: Optional[str] = None

    # ---- the fields DESIGN.md promises, derived from the above ----
    @property
    def shape(self) -> Optional[tuple[int, ...]]:
        return self.preview.shape if self.preview else None

    @property
    def dtype(self) -> Optional[str]:
        return self.preview.dtype if self.preview else None

    @property
    def device(self) -> Optional[str]:
        return self.preview.device if self.preview else None

    @property
    def value(self) -> Optional[np.ndarray]:
        return self.preview.values if self.preview else None

    @property
    def grad_preview(self) -> Optional[Preview]:
        """The gradient to show: `.grad` for leaves, else the last pass's."""
        if self.attr_grad is not None:
            return self.attr_grad
        if self.grads:
            return self.grads[max(self.grads)]
        return None

    @property
    def grad(self) -> Optional[np.ndarray]:
        p = self.grad_preview
        return p.values if p else None

    @property
    def label(self) -> str:
        """What a reader calls this tensor: its name, else its source text, else its op (a tensor no
        name reaches, from outside the traced code: "unnamed tensor", not the op's "external"; one an
        earlier cell named that no name holds now: "earlier w")."""
        if self.name or self.expr:
            return self.name or self.expr
        if self.former:
            return f"earlier {self.former}"
        return "unnamed tensor" if self.op == "external" else self.op


@dataclass(slots=True)  # one per tensor shown: no per-instance dict, a faster __init__
class BackwardStep:
    """One autograd node as the engine ran it during a backward pass."""

    index: int  # order in which the engine ran it within the pass
    node: str  # e.g. "MulBackward0", "AccumulateGrad"
    node_id: int  # stable id of the node within the pass (graph order from the roots)
    records: list[int] = field(default_factory=list)  # tensors whose grad this node received
    grad_in: list[Optional[Preview]] = field(default_factory=list)  # grads the node received
    grad_out: list[Optional[Preview]] = field(default_factory=list)  # grads it sent to each input
    next_ids: list[Optional[int]] = field(default_factory=list)  # node_id per input edge


@dataclass
class BackwardPass:
    """One `backward()` or `torch.autograd.grad()` call made by the cell."""

    index: int
    kind: str  # "backward" or "grad"
    line: Optional[int] = None
    expr: Optional[str] = None
    roots: list[int] = field(default_factory=list)  # record ids of the outputs differentiated
    inputs: list[int] = field(default_factory=list)  # for autograd.grad: records of `inputs`
    results: list[Optional[Preview]] = field(default_factory=list)  # autograd.grad's returns
    gradient_given: bool = False
    retain_graph: bool = False
    nodes: list[str] = field(default_factory=list)  # node names by node_id
    edges: list[tuple[int, int]] = field(default_factory=list)  # node_id -> next node_id
    steps: list[BackwardStep] = field(default_factory=list)
    error: Optional[str] = None
    # what each leaf's `.grad` was as the call started (record id -> "none": None, reset or never
    # set; "kept": set before this cell's first call that reached it; "same": as this cell's
    # previous call left it; "changed": changed since, in place or by assignment): which
    # of the passes a leaf's `.grad` adds up
    grad_before: dict[int, str] = field(default_factory=dict)
    # record id -> the line of this cell that assigned its `.grad` (`b.grad = ...`) before the pass: grad_before "assigned"
    grad_assigned: dict[int, int] = field(default_factory=dict)


@dataclass
class TraceError:
    """An exception the traced code raised, where it was raised."""

    type: str
    message: str
    line: Optional[int] = None
    expr: Optional[str] = None


def op_run(trace: "Trace", r: Record) -> int:
    """Which run of its op on its span `r` shows: 1, or 2 for a loop's second iteration, and so on.
    `occurrence` counts every op on the span (`h[:, 1] *= 2` runs `__imul__`, then `__setitem__`
    writes the slice back on the same span), and stays the record's identity; this counts the
    record's own op alone, which is what a view's "#2" means. Worked out once per trace."""
    cached = trace.__dict__.get("_op_runs")  # not a field: no part of a trace's equality or repr
    if cached is None or cached[0] != len(trace.records):
        seen: dict[tuple, int] = {}
        runs: dict[int, int] = {}
        for rec in trace.records:
            if rec.span is None:
                continue
            key = (rec.span, rec.op, rec.output_index)
            n = seen[key] = seen.get(key, 0) + 1
            if n > 1:
                runs[rec.id] = n
        cached = trace.__dict__["_op_runs"] = (len(trace.records), runs)
    return cached[1].get(r.id, 1)


@dataclass
class Trace:
    """Everything one traced run produced. Views render this and nothing else."""

    source: str = ""
    records: list[Record] = field(default_factory=list)
    passes: list[BackwardPass] = field(default_factory=list)
    error: Optional[TraceError] = None
    grad_mode: str = "enabled"  # "enabled", or "no_grad" for a --no-grad variant
    grad_off_at_start: bool = False  # gradients were already off when the cell started (an earlier cell left them so)
    detached: list[str] = field(default_factory=list)  # what a --detach variant cut
    flipped: list[str] = field(default_factory=list)  # leaves whose requires_grad a variant flipped
    notes: list[str] = field(default_factory=list)  # things the views should say once
    first_line: int = 1  # editor line of the source's first line
    variant_of: Optional["Trace"] = None  # the original run, for a toggled variant
    gradcheck: Optional[list] = None  # filled by the gradient check
    exploration: Optional[Exploration] = None  # the explorer's data, filled when asked for (`CellSession.exploration`)
    # first record of a source span -> how many more times that span ran
    # beyond the detail limit (loop iterations counted, not kept)
    repeats: dict[int, int] = field(default_factory=dict)
    # every backward call's loss and total gradient norm, recorded or past --limit
    # (`data.debug.IterationScalars`, at most limits.TRAIN_ITERATIONS; the rest counted)
    iterations: list = field(default_factory=list)
    iterations_left_out: int = 0

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __bool__(self) -> bool:
        """A trace is something even with no records (a variant that failed before any op):
        `variant or trace` must never swap a failed variant for the real run."""
        return True

    def by_name(self, name: str) -> list[Record]:
        return [r for r in self.records if r.name == name]

    def last(self, name: str) -> Optional[Record]:
        found = self.by_name(name)
        return found[-1] if found else None

    def lines(self) -> dict[Optional[int], list[Record]]:
        """Records grouped by source line, in the order the lines first ran."""
        groups: dict[Optional[int], list[Record]] = {}
        for r in self.records:
            groups.setdefault(r.line, []).append(r)
        return groups

    def source_line(self, line: Optional[int]) -> str:
        if line is None:
            return ""
        lines = self.source.splitlines()
        i = line - self.first_line
        return lines[i] if 0 <= i < len(lines) else ""

    # ---- views: each lives in render/ or notebook/ and reads only this data. They are
    # registered when `autograd_magic` is imported (see `register_views`): this module imports none.
    def __str__(self) -> str:
        return _view("text")(self)

    def __repr__(self) -> str:
        return f"<Trace: {len(self.records)} records, {len(self.passes)} backward passes>"

    def to_text(self) -> str:
        return str(self)

    def to_html(self) -> str:
        """A static, script-free HTML snapshot (one scoped style sheet, no scripts)."""
        return _view("html")(self)

    def to_dot(self, **options) -> str:
        """The autograd graph as Graphviz DOT text."""
        return _view("dot")(self, **options)

    def to_svg(self, timeout: float | None = None, **options) -> str:
        """The graph laid out by Graphviz (out of process, time-limited)."""
        return _view("svg")(self.to_dot(**options), timeout=timeout)

    def show(self, **options) -> None:
        """Display the interactive view (widget + static snapshot + text)."""
        _view("show")(self, **options)

    def _repr_mimebundle_(self, include=None, exclude=None):
        return _view("mimebundle")(self, include=include, exclude=exclude)

    # ---- debugging a training cell: computed by explain/debug.py, registered like the views ----
    @property
    def nonfinite(self):
        """The first recorded op whose output holds a NaN or an Inf (a `data.debug.NonFinite`:
        its line, expression, op and inputs with their statistics), or None."""
        return _view("nonfinite")(self)

    @property
    def backward_nonfinite(self) -> list:
        """For each backward pass with a non-finite gradient, the first node (in the order the
        engine ran them) that received or sent one (`data.debug.BackwardNonFinite`)."""
        return _view("backward_nonfinite")(self)

    def grad_flow(self, leaves: bool = False) -> list:
        """Per backward pass, the norm of the gradient each parameter and each module received,
        flagged "vanishing" or "exploding" (`data.debug.PassFlow`). `leaves=True` counts every
        leaf that received a gradient, not only modules' parameters."""
        return _view("grad_flow")(self, leaves=leaves)

    def training(self) -> list:
        """The loss and the total gradient norm of every backward call, in order, those past
        `--limit` too (`data.debug.IterationScalars`): what the training-loop chart draws."""
        return _view("training")(self)


_VIEWS: dict[str, Callable[..., Any]] = {}


def register_views(**views: Callable[..., Any]) -> None:
    """Called once by `autograd_magic/__init__.py`: text, html, dot, svg, show, mimebundle, and
    the debugging analyses (nonfinite, backward_nonfinite, grad_flow, training)."""
    _VIEWS.update(views)


def _view(kind: str) -> Callable[..., Any]:
    try:
        return _VIEWS[kind]
    except KeyError:
        raise RuntimeError(f"no {kind} view is registered; import autograd_magic first") from None
