"""Why-explanations for the autograd errors a cell can raise.

Each known error message maps to a function that names the tensor and the
line involved and says what to do. Pure: reads only the Trace.
"""

from __future__ import annotations

import re
from typing import Optional

from . import wording
from .why import (
    _DETACH_OPS, _cut_how, _flipped, first_cut, integral_cut, _mutations_of, _pass_where, _quote, _variant_cut, _where, _why_no_requires_grad,
)
from ..data.trace import BackwardPass, Record, Trace


def explain_error(trace: Trace) -> Optional[str]:
    """A plain-language reason for the cell's autograd error, or None."""
    e = trace.error
    if e is None:
        return None
    msg = e.message
    failed = next((p for p in trace.passes if p.error), None)
    for key, explain in _ERRORS:
        if key in msg:
            text = explain(trace, failed)
            # a sentence that opens with "the earlier `w`" (a tensor no name holds now), capitalised
            return re.sub(r"(^|\. )the earlier `", r"\1The earlier `", text) if text else text
    return None


def _root(trace: Trace, p: Optional[BackwardPass]) -> Optional[Record]:
    if p is None or not p.roots or p.roots[0] is None:
        return None
    return trace.records[p.roots[0]]


def _at(trace: Trace) -> str:
    line = trace.error.line if trace.error else None
    return f"line {line}" if line is not None else "the failing line"


def _non_scalar(trace: Trace, p: Optional[BackwardPass]) -> str:
    r = _root(trace, p)
    what = f"{_quote(r)} has shape {tuple(r.shape or ())}" if r is not None else "the tensor is not a scalar"
    return (
        f"backward() on {_at(trace)} was called on a tensor with more than one element: {what}. "
        "grad can be implicitly created only for scalar outputs: reduce it first (e.g. .sum() or .mean()) "
        "or pass a gradient of the same shape, e.g. .backward(torch.ones_like(...))."
    )


def _no_grad_root(trace: Trace, p: Optional[BackwardPass]) -> str:
    r = _root(trace, p)
    head = f"backward() on {_at(trace)} was called on "
    if r is None:
        return head + "a tensor that does not require grad and has no grad_fn: nothing it came from had requires_grad=True."
    toggled = _variant_cut(trace, r) is not None
    if toggled:
        why = _why_no_requires_grad(trace, r)[0]
    elif r.external and (r.origin is not None or r.grad_of is not None):
        why = _why_no_requires_grad(trace, r)[0]
    elif r.external:
        why = (
            f"{_quote(r)} was made before this cell without a grad_fn: the tensors it was computed from "
            "never had requires_grad=True."
        )
    elif r.inputs or not r.grad_enabled or r.op in _DETACH_OPS:
        why = _why_no_requires_grad(trace, r)[0]
    else:
        why = f"{_where(r)} itself never had requires_grad=True."
    fix = "Set requires_grad=True on the input you want gradients for, before computing."
    cut = first_cut(trace, r) if not toggled else None
    how = None if cut is None else (cut.origin.how if cut.origin is not None else cut.op if cut.op in _DETACH_OPS else "no_grad")
    if toggled:
        fix = wording.REAL_RUN_UNAFFECTED
    elif trace.grad_mode == "no_grad":
        fix = "Nothing in this variant is recorded for backward(); the real run, without the toggle, is unaffected."
    elif how == "no_grad":
        fix = "Compute it outside the torch.no_grad() block if you want to differentiate it."
    elif how is not None:
        fix = f"Differentiate what it was cut from instead, or drop the {_cut_how(how)}."
    elif r.inputs and integral_cut(trace, r) is not None:
        fix = "Compute it from floating point values if it should have a gradient (an index or a comparison has none)."
    elif r.grad_of is not None:
        fix = "A gradient is a result, not part of a graph: to differentiate through it, compute it with torch.autograd.grad(..., create_graph=True)."
    return (
        head + f"{_quote(r)}, which does not require grad and has no grad_fn (element 0 of tensors does not "
        f"require grad). {why} {fix}"
    )


def _second_time(trace: Trace, p: Optional[BackwardPass]) -> str:
    earlier = [q for q in trace.passes if q.error is None and (p is None or q.index < p.index) and not q.retain_graph]
    first = (
        f"{_pass_where(earlier[-1])} already went through this graph and freed its saved values"
        if earlier
        else "an earlier backward call (in a previous cell) already went through this graph and freed its saved values"
    )
    fix = f"pass retain_graph=True to the call on line {earlier[-1].line}" if earlier and earlier[-1].line else (
        "pass retain_graph=True to the earlier call"
    )
    return (
        f"Trying to backward through the graph a second time on {_at(trace)}: {first}. "
        f"To differentiate it again, {fix}, or recompute the forward pass before each backward."
    )


def _modified_inplace(trace: Trace, p: Optional[BackwardPass]) -> str:
    node = re.search(r"output \d+ of (\w+)", trace.error.message if trace.error else "")
    changed = [r for r in trace.records if r.version_changed and _mutations_of(trace, r.id)]
    if node:
        name = node.group(1)
        match = [r for r in changed if (r.grad_fn or "").startswith(name)]
        changed = match or changed
    if changed:
        r = changed[0]
        m = _mutations_of(trace, r.id)[0]
        what = (
            f"{_where(r)} was saved for the backward pass, then modified by an inplace operation, "
            f"`{m.expr or m.op}` on line {m.line}"
        )
    else:
        what = "a tensor saved for the backward pass was modified by an inplace operation"
    return (
        f"backward() on {_at(trace)} failed: {what}. Its gradient needs the old values. "
        "Use an out-of-place version (y = y + 1 instead of y += 1) or clone the tensor before changing it."
    )


def _on_error_line(trace: Trace, want) -> list[Record]:
    """Records named on the failing line that satisfy `want`, last first."""
    text = (trace.error.expr or "") if trace.error else ""
    found = [r for r in trace.records if r.name and want(r) and re.search(rf"\b{re.escape(r.name)}\b", text)]
    return list(reversed(found))


def _error_where(trace: Trace) -> str:
    e = trace.error
    text = f"`{e.expr}` " if e and e.expr else ""
    return text + (f"on line {e.line}" if e and e.line is not None else "")


def _leaf_inplace(trace: Trace, p: Optional[BackwardPass]) -> str:
    leaves = _on_error_line(trace, lambda r: r.is_leaf and r.requires_grad)
    who = f"{_quote(leaves[0])} is a leaf that requires grad" if leaves else "the tensor is a leaf that requires grad"
    view = "a view of " if trace.error and "a view of a leaf" in trace.error.message else ""
    return (
        f"{_error_where(trace)} changes {view}a leaf Variable that requires grad in place: {who}, and autograd "
        "cannot track in-place changes to it. Do parameter updates under `with torch.no_grad():` "
        "(as an optimizer does), or use an out-of-place expression." + _flipped_on(trace, leaves)
    )


def _flipped_on(trace: Trace, found: list[Record]) -> str:
    """When the tensor requires grad only because the variant's toggle flipped it on."""
    if found and found[0].requires_grad and _flipped(trace, found[0]):
        return f" Here {wording.flipped_in_variant(found[0].label, on=True)} (the toggle); {wording.REAL_RUN_UNAFFECTED[0].lower()}{wording.REAL_RUN_UNAFFECTED[1:]}"
    return ""


def _numpy_of_grad_tensor(trace: Trace, p: Optional[BackwardPass]) -> str:
    found = _on_error_line(trace, lambda r: r.requires_grad)
    who = _quote(found[0]) if found else "the tensor"
    name = found[0].name if found else "tensor"
    return (
        f"{_error_where(trace)} turns {who} into a NumPy array, but it requires grad: NumPy values would leave "
        f"autograd's graph silently, so PyTorch refuses. Use `{name}.detach().numpy()` (for plotting or printing, "
        "detach first)." + _flipped_on(trace, found)
    )


def _integer_requires_grad(trace: Trace, p: Optional[BackwardPass]) -> str:
    return (
        f"{_error_where(trace)} asks for requires_grad=True on a tensor of integers: only floating point (and "
        "complex) tensors can require gradients. Write the numbers as floats (`1.` instead of `1`), pass "
        "dtype=torch.float32, or convert first (`x = x.float()`, then `x.requires_grad_()`)."
    )


def _unused_input(trace: Trace, p: Optional[BackwardPass]) -> str:
    m = re.search(r"index (\d+)", trace.error.message if trace.error else "")
    who = "one of the inputs"
    if m and p is not None and int(m.group(1)) < len(p.inputs) and p.inputs[int(m.group(1))] is not None:
        who = _quote(trace.records[p.inputs[int(m.group(1))]])
    return (
        f"torch.autograd.grad {_error_where(trace)}: {who} was not used to compute the output, so it has no "
        "gradient. Pass allow_unused=True (its gradient is then None, or zeros with "
        "materialize_grads=True) or leave it out of `inputs`."
    )


def _no_grad_to_keep(trace: Trace, p: Optional[BackwardPass]) -> str:
    found = _on_error_line(trace, lambda r: not r.requires_grad)
    who = _quote(found[0]) if found else "the tensor"
    why = ""
    if found:
        why = " " + _why_no_requires_grad(trace, found[0])[0]
    return (
        f"{_error_where(trace)}: {who} does not require grad, so there is no gradient to keep or hook.{why}"
    )


_GRAD_OF = re.compile(r"([A-Za-z_][\w.]*)\.grad\b")


def _grad_is_none(trace: Trace, p: Optional[BackwardPass]) -> Optional[str]:
    """`x.grad.zero_()`, `w -= lr * w.grad`: a `.grad` that is None where the failing line uses it."""
    e = trace.error
    names = _GRAD_OF.findall(e.expr or "") if e is not None else []
    if not names or "NoneType" not in e.message:
        return None
    for name in names:
        found = [r for r in trace.records if r.name == name and (e.line is None or r.line is None or r.line <= e.line)]
        if found:
            from .why import explain_record, rebound_sentences  # the record's own reason for its .grad

            try:
                rebound = rebound_sentences(trace, found[-1])
                reason = (" ".join(rebound[:1] + rebound[2:]) if rebound is not None  # what it is, and the fix
                          else next((s for s in explain_record(trace, found[-1].id) if "grad" in s), None))
            except Exception:  # an explanation never breaks the view: the head alone then
                reason = None
            head = f"{_error_where(trace)} uses `{name}.grad`, which is None there."
            return f"{head} {reason}" if reason else head
    return (f"{_error_where(trace)} uses `{names[0]}.grad`, which is None there: .grad is filled only by a backward "
            "call that reaches a leaf which requires grad.")


def _not_real(trace: Trace, p: Optional[BackwardPass]) -> str:
    r = _root(trace, p)
    m = re.search(r"but got (\S+)", trace.error.message if trace.error else "")
    what = f"{_quote(r)} is {m.group(1)}" if r is not None and m else "the tensor is not real"
    return (
        f"backward() on {_at(trace)} was called on a tensor that is not real: {what}. "
        "A gradient needs a real scalar to start from: take one first, e.g. `.abs().sum()` or `.real.sum()`, "
        "or pass a gradient of the same shape and dtype."
    )


_ERRORS = [
    ("grad can be implicitly created only for real scalar outputs", _not_real),
    ("grad can be implicitly created only for scalar outputs", _non_scalar),
    ("does not require grad and does not have a grad_fn", _no_grad_root),
    ("backward through the graph a second time", _second_time),
    ("modified by an inplace operation", _modified_inplace),
    ("a leaf Variable that requires grad", _leaf_inplace),
    ("Can't call numpy() on Tensor that requires grad", _numpy_of_grad_tensor),
    ("Only Tensors of floating point and complex dtype can require gradients", _integer_requires_grad),
    ("only Tensors of floating point dtype can require gradients", _integer_requires_grad),  # requires_grad_()
    ("appears to not have been used in the graph", _unused_input),
    ("can't retain_grad on Tensor that has requires_grad=False", _no_grad_to_keep),
    ("cannot register a hook on a tensor that doesn't require gradient", _no_grad_to_keep),
    ("NoneType", _grad_is_none),  # AttributeError or TypeError on a .grad that is None
]
