"""Debugging a real training cell from its Trace: the first NaN or Inf, and gradient flow.

For the practitioner whose loss turned NaN or whose deep model doesn't learn (issue 16).
Everything here reads the Trace's previews, which hold exact min and max for every tensor
(capture/preview.py): a NaN anywhere makes both NaN (numpy's and torch's reductions
propagate it) and an Inf shows as the max or the min, so "does this tensor hold a NaN or an
Inf" is answered exactly from two floats, with no extra pass over the data.

    nonfinite_origin(trace)      the first op whose output holds a NaN or an Inf, or None
    backward_nonfinite(trace)    per backward pass, the first node whose gradient is non-finite
    grad_flow(trace)             per pass, each parameter's and each module's gradient norm, flagged
    training(trace)              every backward call's loss and total gradient norm, in order

Loop iterations past `--limit` are counted, not kept, but the tracer checks each of their
ops' outputs for NaN/Inf (CPU tensors; capture/finite.py) and records the first one it finds
in full, with its inputs as they were then (`Record.run`, `Record.input_previews`): the
origin is found there too. Each backward call past the limit still gives its loss and
total gradient norm (`Trace.iterations`).

Flags, within one pass:
- "vanishing": a norm below VANISHING (1e-7) times the pass's largest norm;
- "exploding": a non-finite norm, or one above EXPLODING (1e3) times the norm of the
  parameter's own value: one SGD step even at lr=1e-3 would move it by more than its whole size.
Exploding is measured against the parameter itself, not against the other layers: in a stack
initialised to explode every layer's gradient is huge and alike (a deep linear or ReLU
stack's weight gradients grow together), so none stands out; and in a vanishing stack the
median is tiny, so a healthy last layer would stand out from it (a 30-layer tanh stack's last
layer gets 2e4 times the median) and be called exploding wrongly.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import numpy as np

from ..data.debug import BackwardNonFinite, IterationScalars, ModuleGrad, NonFinite, Operand, ParamGrad, PassFlow
from ..data.trace import BackwardPass, BackwardStep, Preview, Record, Trace, op_run
from .format import format_stats
from .wording import is_uninitialised, record_label
from .. import limits

VANISHING = 1e-7
EXPLODING = 1e3


# ---- one preview: NaN, Inf or finite ----------------------------------------------------------


def nonfinite_kind(p: Optional[Preview]) -> Optional[str]:
    """"nan" when `p`'s tensor holds a NaN, "inf" when it holds an Inf (and no NaN), None when
    it is finite or can't be told (no statistics: a meta tensor, one too large to reduce)."""
    if p is None:
        return None
    lo, hi = p.min, p.max
    if lo is None or hi is None:
        return _kind_of_values(p) if p.complete else None
    if math.isnan(lo) or math.isnan(hi):
        return "nan"
    if math.isinf(lo) or math.isinf(hi):
        return "inf"
    return None


def _kind_of_values(p: Preview) -> Optional[str]:
    v = p.values
    if v is None or v.dtype.kind not in "fc":
        return None
    with np.errstate(all="ignore"):
        if np.isnan(v).any():
            return "nan"
        if np.isinf(v).any():
            return "inf"
    return None


def _count(p: Optional[Preview]) -> Optional[int]:
    """Non-finite elements of `p`'s tensor, when the preview holds every one."""
    if p is None or not p.complete or p.values.dtype.kind not in "fc":
        return None
    with np.errstate(all="ignore"):
        return int(np.count_nonzero(~np.isfinite(p.values)))


# ---- forward: the first op whose output is non-finite -----------------------------------------


def nonfinite_origin(trace: Trace) -> Optional[NonFinite]:
    """The first record, in execution order, whose value holds a NaN or an Inf; None if none does.

    Uninitialised tensors (`torch.empty` and the like) are skipped: their leftover memory may
    hold anything, and the op that fills them is recorded after them."""
    given: set[int] = set()  # records holding infinities a mask was given, not ones an op produced
    for r in trace.records:
        if is_uninitialised(r) or _made_by_backward(r):
            continue
        kind = nonfinite_kind(r.preview)
        if kind is None:
            continue
        if kind == "inf" and (r.op in _FILL_OPS or (r.external and not r.inputs) or any(i in given for i in r.inputs)):
            given.add(r.id)  # -inf written on purpose (an attention mask), or carried on from one
            continue
        return _origin(trace, r, kind)
    return None


#: ops that write the values they are given: an Inf there (`masked_fill(mask, -inf)`, `torch.full(..., -inf)`)
#: is a mask's, as is one a tensor from outside the cell already holds; what is computed from them
#: carries it on (`scores + mask`). A NaN is never a mask's: found wherever it first appears.
_FILL_OPS = frozenset({"masked_fill", "masked_fill_", "fill", "fill_", "full", "full_like", "new_full", "index_fill",
                       "index_fill_", "tensor", "as_tensor"})


def _made_by_backward(r: Record) -> bool:
    """A leaf's `.grad` this cell's backward call made, first seen as an optimizer's input: not a
    forward value (a NaN there is the backward pass's, found there), but the update it feeds is."""
    return r.external and r.grad_of is not None and r.created_by is not None and not r.inputs


def _origin(trace: Trace, r: Record, kind: str) -> NonFinite:
    inputs, seen = [], set()
    for k, i in enumerate(r.inputs):
        if i in seen or not 0 <= i < len(trace.records):
            continue
        seen.add(i)
        src = trace.records[i]
        # an op found past --limit: its inputs as they were then, not as their records first saw them
        shown = r.input_previews[k] if k < len(r.input_previews) else src.preview
        inputs.append(Operand(i, record_label(src), shown, nonfinite_kind(shown)))
    return NonFinite(
        record=r.id, kind=kind, op=r.op, label=record_label(r), line=r.line, expr=r.expr,
        occurrence=op_run(trace, r) - 1, run=r.run, iteration=r.iteration, module=r.module,
        step=r.in_step or (r.op == "step" and r.run is not None), external=r.external and not r.inputs,
        preview=r.preview, count=_count(r.preview), inputs=inputs,
    )


# ---- a training loop: the loss and total gradient norm of every backward call ----------------


def training(trace: Trace) -> list[IterationScalars]:
    """Every backward call of the cell in order, recorded or past `--limit`: its loss (a one-element
    root's value) and the total norm of the gradients it put into leaves (`Trace.iterations`)."""
    return list(trace.iterations)


def first_nonfinite_iteration(trace: Trace) -> Optional[IterationScalars]:
    """The first backward call whose loss or gradient norm is a NaN or an Inf."""
    return next((it for it in trace.iterations if not it.finite), None)


# ---- backward: the first node whose gradient is non-finite, per pass --------------------------


def backward_nonfinite(trace: Trace) -> list[BackwardNonFinite]:
    """For each backward pass with a non-finite gradient, the first node that received or sent one."""
    found = []
    for p in trace.passes:
        hit = _first_step(trace, p) if p.steps else _from_records(trace, p)
        if hit is not None:
            found.append(hit)
    return found


def _first_kind(previews) -> Optional[str]:
    """"nan" when any of `previews` holds a NaN, else "inf" when one holds an Inf (a node that
    sends Inf along one edge and NaN along another turns the gradient NaN: x / x at 0)."""
    kinds = {nonfinite_kind(g) for g in previews}
    return "nan" if "nan" in kinds else "inf" if "inf" in kinds else None


def _first_step(trace: Trace, p: BackwardPass) -> Optional[BackwardNonFinite]:
    steps = sorted(p.steps, key=lambda s: s.index)
    for s in steps:
        received, sent = _first_kind(s.grad_in), _first_kind(s.grad_out)
        if received is None and sent is None:
            continue
        by_node = {t.node_id: t for t in steps}
        return BackwardNonFinite(
            pass_index=p.index, step=s.index, node=s.node, kind=received or sent,
            received_nonfinite=received is not None, records=list(s.records),
            received=list(s.grad_in), sent=list(s.grad_out), sent_to=_sent_to(p, s),
            targets=_targets(trace, p, s, by_node),
        )
    return None


def _sent_to(p: BackwardPass, s: BackwardStep) -> list[Optional[str]]:
    return [p.nodes[n] if n is not None and 0 <= n < len(p.nodes) else None for n in s.next_ids]


def _targets(trace: Trace, p: BackwardPass, s: BackwardStep, by_node: dict[int, BackwardStep]) -> list[int]:
    """Records that got a non-finite gradient from step `s`: those of the nodes it sent one to
    (an AccumulateGrad's own leaf when it sends nothing on)."""
    if not s.grad_out:
        return [i for i in s.records if _grad_kind(trace, i, p.index)]
    out = []
    for g, n in zip(s.grad_out, s.next_ids):
        if nonfinite_kind(g) is None or n is None or n not in by_node:
            continue
        out.extend(i for i in by_node[n].records if i not in out and _grad_kind(trace, i, p.index))
    return out


def _grad_kind(trace: Trace, rid: int, pass_index: int) -> Optional[str]:
    if not 0 <= rid < len(trace.records):
        return None
    return nonfinite_kind(trace.records[rid].grads.get(pass_index))


def _from_records(trace: Trace, p: BackwardPass) -> Optional[BackwardNonFinite]:
    """A pass too large to keep its steps: the record nearest the output (the last made, so the
    first the engine reached) whose gradient in this pass is non-finite."""
    for r in reversed(trace.records):
        g = r.grads.get(p.index)
        kind = nonfinite_kind(g)
        if kind is not None:
            return BackwardNonFinite(
                pass_index=p.index, step=None, node=r.grad_fn or "AccumulateGrad", kind=kind,
                received_nonfinite=True, records=[r.id], received=[g], targets=[r.id],
            )
    return None


# ---- gradient flow: each parameter's gradient norm, per pass ----------------------------------


def grad_flow(trace: Trace, leaves: bool = False) -> list[PassFlow]:
    """Per backward pass, the norm of the gradient each parameter received, and per module.

    A parameter is a leaf that requires grad and belongs to a module: its name is a module
    path (`model.0.weight`), or a module this cell built made it, or it has no name and a
    module's op read it (a module the namespace does not hold).
    With `leaves=True` every leaf that received a gradient counts (hand-written `W1`, `b1`).
    Passes where no parameter received a gradient are left out."""
    params = _parameters(trace, leaves)
    flows = []
    for p in trace.passes:
        flow = _pass_flow(trace, p.index, params)
        if flow.params:
            flows.append(flow)
    return flows


def _root(trace: Trace, r: Record) -> Record:
    """The record of the tensor itself: an in-place op (`kaiming_uniform_`, `opt.step()`'s `add_`)
    names the record it changed in `mutates`."""
    seen = set()
    while r.mutates is not None and 0 <= r.mutates < len(trace.records) and r.id not in seen:
        seen.add(r.id)
        r = trace.records[r.mutates]
    return r


def _parameters(trace: Trace, leaves: bool) -> dict[int, tuple[list[Record], str, Optional[str]]]:
    """Root record id -> (its records, label, module), in the order the tensors were first seen."""
    chains: dict[int, list[Record]] = {}
    for r in trace.records:
        if r.is_leaf and r.requires_grad:
            chains.setdefault(_root(trace, r).id, []).append(r)
    module_of: dict[int, str] = {}
    for r in trace.records:
        if r.module:
            for i in r.inputs:
                module_of.setdefault(i, r.module)
    out = {}
    for root_id, chain in chains.items():
        name = next((r.name for r in chain if r.name), None)
        made_by = next((r.created_by for r in chain if r.created_by), None)
        read_in = next((module_of[r.id] for r in chain if r.id in module_of), None)
        if name and "." in name:
            module: Optional[str] = name.rsplit(".", 1)[0]
        else:  # a named plain tensor a module reads (`model(x)`) is an input, not a parameter
            module = made_by or (read_in if name is None else None)
        if module is None and not leaves:
            continue
        root = trace.records[root_id]
        if name:
            label = name
        elif made_by:
            dims = "×".join(map(str, root.shape or ()))
            label = f"{made_by} [{dims}]" if dims else made_by
        else:
            label = record_label(root)
        out[root_id] = (chain, label, module)
    return out


def _pass_flow(trace: Trace, index: int, params: dict) -> PassFlow:
    flow = PassFlow(pass_index=index)
    for root_id, (chain, label, module) in params.items():
        g = next((r.grads[index] for r in chain if index in r.grads), None)
        if g is None:
            continue
        norm = g.norm
        if norm is None and nonfinite_kind(g) is not None:
            norm = math.nan if nonfinite_kind(g) == "nan" else math.inf
        value = _value_norm(trace, chain, trace.passes[index])
        flow.params.append(ParamGrad(record=root_id, label=label, module=module, norm=norm, value_norm=value))
    flow.largest, flow.median = _flag(flow.params)
    flow.total = _combined([p.norm for p in flow.params])
    groups: dict[str, ModuleGrad] = {}
    for p in flow.params:
        if p.module is not None:
            groups.setdefault(p.module, ModuleGrad(module=p.module, norm=None)).params.append(p.record)
    by_id = {p.record: p for p in flow.params}
    for m in groups.values():
        m.norm = _combined([by_id[i].norm for i in m.params])
        m.value_norm = _combined([by_id[i].value_norm for i in m.params])
    flow.modules = list(groups.values())
    _flag(flow.modules)
    return flow


def _value_norm(trace: Trace, chain: list[Record], p: BackwardPass) -> Optional[float]:
    """The norm of the parameter's value when pass `p` ran: its last record made before the
    pass's outputs (an optimizer's in-place step is a record of its own)."""
    before = max(p.roots) if p.roots else len(trace.records)
    shown = [r for r in chain if r.id <= before and r.preview is not None] or chain
    return shown[-1].preview.norm if shown[-1].preview is not None else None


def _combined(norms: list[Optional[float]]) -> Optional[float]:
    """The norm of several tensors together; None when one of them is unknown."""
    if any(n is None for n in norms):
        return None
    return math.hypot(*norms)  # no overflow in the squares, NaN and Inf carried through


def _flag(items: list) -> tuple[Optional[float], Optional[float]]:
    """Sets `flag` on each item (a ParamGrad or ModuleGrad); returns (largest, median) finite norm."""
    finite = [i.norm for i in items if i.norm is not None and math.isfinite(i.norm)]
    largest = max(finite) if finite else None
    median = statistics.median(finite) if finite else None
    for i in items:
        if i.norm is None:
            continue
        if not math.isfinite(i.norm) or (i.value_norm and i.norm > EXPLODING * i.value_norm):
            i.flag = "exploding"
        elif largest and i.norm < VANISHING * largest:
            i.flag = "vanishing"
    return largest, median


# ---- the sentences every view shows ----------------------------------------------------------

KIND_WORD = {"nan": "NaN", "inf": "Inf"}


def number(x: Optional[float]) -> str:
    """A norm or statistic in a few characters: 0.0312, 3.2e-09, inf, nan."""
    if x is None:
        return "?"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.3g}"


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 35th."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def origin_sentence(nf: NonFinite) -> str:
    """'First NaN in forward: `torch.log(z)` on line 4 (op log, 2 of 3 elements)'."""
    named = nf.expr and nf.label not in (nf.expr, nf.op)
    what = f"`{nf.label} = {nf.expr}`" if named else f"`{nf.expr or nf.label}`"
    where = f" on line {nf.line}" if nf.line is not None else ""
    if nf.run is not None:
        # the backward calls before it: a loop's iteration when it calls backward() once an iteration
        calls = nf.iteration
        loop = f", after {calls} backward call{'s' if calls != 1 else ''}" if calls is not None else ""
        where += f" (the {ordinal(nf.run + 1)} time it ran{loop}, past --limit: found by its finiteness check)"
    elif nf.occurrence:
        where += f" (run {nf.occurrence + 1} of that line)"
    details = [f"op {nf.op}"]
    if nf.count is not None and nf.preview is not None:
        details.append(f"{nf.count} of {nf.preview.numel} elements")
    if nf.module:
        details.append(f"in {nf.module}")
    if nf.external:
        return f"First {KIND_WORD[nf.kind]}: {what} came from outside the cell already holding it"
    # an update inside an optimizer step, or a lifted step found past --limit (capture/steps.py): not a forward op
    phase = "an optimizer step" if nf.step else "forward"
    return f"First {KIND_WORD[nf.kind]} in {phase}: {what}{where} ({', '.join(details)})"


def operand_sentence(o: Operand) -> str:
    """'input z: min 0  max 1  mean 0.3333  norm 1 (holds Inf)'."""
    stats = format_stats(o.preview) or "no statistics"
    held = f" (already holds {KIND_WORD[o.kind]})" if o.kind else ""
    return f"input {o.label}: {stats}{held}"


def operand_sentences(nf: NonFinite, limit: int = limits.DEBUG_INPUTS) -> list[str]:
    lines = [operand_sentence(o) for o in nf.inputs[:limit]]
    if len(nf.inputs) > limit:
        lines.append(f"… {len(nf.inputs) - limit} more inputs")
    return lines


def backward_sentence(b: BackwardNonFinite, trace: Trace) -> str:
    """'Backward pass 1: the gradient turns Inf in ExpBackward0 (received: …; sent Inf to x)'."""
    head = f"Backward pass {b.pass_index + 1}: "
    got = _labels(trace, b.records)
    received = "; ".join(format_stats(g) or "?" for g in b.received if g is not None)
    if b.received_nonfinite:
        text = f"{b.node} already received a {KIND_WORD[b.kind]} gradient"
    else:
        text = f"the gradient turns {KIND_WORD[b.kind]} in {b.node}"
    parts = []
    if received:
        parts.append(f"it received {('the gradient of ' + got + ': ') if got else ''}{received}")
    bad = [(to, g) for to, g in zip(b.sent_to, b.sent) if nonfinite_kind(g)]
    if bad:
        to = _labels(trace, b.targets) or ", ".join(sorted({t or "?" for t, _ in bad}))
        kinds = " and ".join(KIND_WORD[k] for k in ("inf", "nan") if any(nonfinite_kind(g) == k for _, g in bad))
        parts.append(f"sent {kinds} to {to}")
    if b.step is None:
        parts.append("found from the tensors' gradients: this pass was too large to keep its steps")
    return head + text + (f" ({'; '.join(parts)})" if parts else "")


def _labels(trace: Trace, ids: list[int], limit: int = 3) -> str:
    names = [record_label(trace.records[i]) for i in ids[:limit] if 0 <= i < len(trace.records)]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(names) + more


def flow_summary(flow: PassFlow) -> str:
    """One line under the chart: which pass, the total norm and what is flagged."""
    vanishing = sum(1 for p in flow.params if p.flag == "vanishing")
    exploding = sum(1 for p in flow.params if p.flag == "exploding")
    text = f"pass {flow.pass_index + 1}: {len(flow.params)} parameters, total gradient norm {number(flow.total)}"
    nonfinite = sum(1 for p in flow.params if p.norm is not None and not math.isfinite(p.norm))
    if flow.largest is None:  # no finite norm to compare: `_flag` found none
        text += ", no finite norm" if nonfinite else ""
    elif nonfinite:
        text += f", {nonfinite} non-finite; of the finite ones, largest {number(flow.largest)}, median {number(flow.median)}"
    else:
        text += f", largest {number(flow.largest)}, median {number(flow.median)}"
    if vanishing:
        text += f"; {vanishing} vanishing (< {VANISHING:g} × largest)"
    if exploding:
        text += f"; {exploding} exploding (> {EXPLODING:g} × the norm of its own value, or non-finite)"
    return text


def iteration_sentence(it: IterationScalars) -> str:
    """'Backward call 31 (line 7, past --limit): loss nan, total gradient norm nan'."""
    where = f"line {it.line}, " if it.line is not None else ""
    recorded = f"pass {it.pass_index + 1}" if it.pass_index is not None else "past --limit, not recorded"
    return (f"First non-finite iteration: backward call {it.index + 1} ({where}{recorded}): "
            f"loss {number(it.loss)}, total gradient norm {number(it.grad_norm)}")


def training_summary(iterations: list[IterationScalars], left_out: int = 0) -> str:
    """One line under the training chart: how many calls, the first and last loss, the first non-finite one."""
    n = len(iterations)
    recorded = sum(1 for it in iterations if it.recorded)
    text = f"{n} backward calls ({recorded} recorded in detail)"
    losses = [it.loss for it in iterations if it.loss is not None]
    if losses:
        text += f": loss {number(losses[0])} → {number(losses[-1])}"
    bad = next((it for it in iterations if not it.finite), None)
    if bad is not None:
        text += f"; first non-finite at call {bad.index + 1}"
    if left_out:
        text += f"; {left_out} later calls not kept"
    return text
