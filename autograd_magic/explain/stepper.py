"""The backward stepper: the chain rule, one autograd node at a time.

Reads the steps `_backward.py` recorded for one backward pass and turns each
into something a student can follow: which tensor the node belongs to, the
gradient it received, the rule it applies (in words), and the gradients it
sent on and to whom. Pure: reads only the Trace.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .format import format_short
from ..data.trace import BackwardPass, BackwardStep, Preview, Trace

# The rule each common node applies, in words. `{a}`/`{b}` name the operands.
RULES: dict[str, str] = {
    "AddBackward0": "d(a + b) = da + db: the gradient is passed on unchanged to both inputs",
    "AddBackward1": "d(a + c) = da: the gradient is passed on unchanged to the tensor input",
    "SubBackward0": "d(a - b): the gradient goes on unchanged to a and negated to b",
    "SubBackward1": "d(a - c) = da: the gradient is passed on unchanged to the tensor input",
    "RsubBackward0": "d(c - a) = -da: the gradient is negated",
    "RsubBackward1": "d(c - a) = -da: the gradient is negated",
    "MulBackward0": "d(a·b) = b·da + a·db: each input gets the gradient times the other operand",
    "MulBackward1": "d(c·a) = c·da: the gradient is multiplied by the constant",
    "DivBackward0": "d(a/b): a gets grad / b, b gets -grad·a / b²",
    "DivBackward1": "d(a/c): the gradient is divided by the constant",
    "NegBackward0": "d(-a) = -da: the gradient is negated",
    "PowBackward0": "d(xⁿ) = n·xⁿ⁻¹ dx: the gradient is multiplied by n·x^(n-1)",
    "PowBackward1": "d(aᵇ): a gets grad·b·a^(b-1), b gets grad·aᵇ·ln a",
    "PowBackward2": "d(cˣ) = cˣ·ln c dx: the gradient is multiplied by cˣ·ln c",
    "MeanBackward0": "mean = sum / N: every element gets the gradient divided by the number of elements N",
    "MeanBackward1": "mean over a dimension: each element gets the gradient divided by that dimension's size",
    "SumBackward0": "sum: the gradient is broadcast (copied) to every element",
    "SumBackward1": "sum over a dimension: the gradient is broadcast back along that dimension",
    "MmBackward0": "C = A @ B: A gets grad @ Bᵀ, B gets Aᵀ @ grad",
    "MvBackward0": "y = A @ v: A gets outer(grad, v), v gets Aᵀ @ grad",
    "DotBackward0": "a · b: a gets grad·b, b gets grad·a",
    "BmmBackward0": "batched C = A @ B: A gets grad @ Bᵀ, B gets Aᵀ @ grad, per batch",
    "AddmmBackward0": "b + A @ W: b gets the gradient summed over rows, A gets grad @ Wᵀ, W gets Aᵀ @ grad",
    "ExpBackward0": "d(eˣ) = eˣ dx: the gradient is multiplied by the output eˣ",
    "LogBackward0": "d(ln x) = dx / x: the gradient is divided by x",
    "SqrtBackward0": "d(√x) = dx / (2√x): the gradient is divided by 2√x",
    "SinBackward0": "d(sin x) = cos x dx: the gradient is multiplied by cos x",
    "CosBackward0": "d(cos x) = -sin x dx: the gradient is multiplied by -sin x",
    "AbsBackward0": "d|x| = sign(x) dx: the gradient is multiplied by the sign of x",
    "ReluBackward0": "relu: the gradient passes where the input was positive and is zero elsewhere",
    "SigmoidBackward0": "d σ(x) = σ(x)(1-σ(x)) dx: the gradient is multiplied by σ(x)·(1-σ(x))",
    "TanhBackward0": "d tanh(x) = (1 - tanh²x) dx: the gradient is multiplied by 1 - tanh²(x)",
    "SoftmaxBackward0": "softmax: grad_in = s·(grad - Σ grad·s) along the softmax dimension",
    "LogSoftmaxBackward0": "log_softmax: grad_in = grad - softmax·Σ grad along the dimension",
    "BinaryCrossEntropyWithLogitsBackward0": "BCE with logits: the logits get (σ(z) - target) · grad / N (N with mean reduction)",
    "MseLossBackward0": "MSE: the input gets 2·(input - target)·grad / N",
    "NllLossBackward0": "NLL: -grad / N at each target class, zero elsewhere",
    "ViewBackward0": "view: the gradient is reshaped back to the input's shape",
    "UnsafeViewBackward0": "view: the gradient is reshaped back to the input's shape",
    "ReshapeAliasBackward0": "reshape: the gradient is reshaped back to the input's shape",
    "TBackward0": "transpose: the gradient is transposed back",
    "PermuteBackward0": "permute: the gradient is permuted back",
    "TransposeBackward0": "transpose: the gradient is transposed back",
    "ExpandBackward0": "expand: the gradient is summed over the expanded dimensions",
    "SelectBackward0": "indexing: the gradient goes to the selected element, zeros elsewhere",
    "SliceBackward0": "slicing: the gradient goes to the selected slice, zeros elsewhere",
    "IndexBackward0": "indexing: the gradient is scattered back to the indexed positions",
    "CatBackward0": "cat: the gradient is split back into the pieces",
    "StackBackward0": "stack: the gradient is split back into the pieces",
    "CloneBackward0": "clone: the gradient is passed on unchanged",
    "ToCopyBackward0": "dtype/device copy: the gradient is converted back",
    "SqueezeBackward0": "squeeze: the gradient gets its dimension back",
    "UnsqueezeBackward0": "unsqueeze: the extra dimension is removed from the gradient",
    "MaximumBackward0": "maximum: the gradient goes to the larger input",
    "ClampBackward1": "clamp: the gradient passes inside the range and is zero outside",
    "AccumulateGrad": "AccumulateGrad: the gradient is added into the leaf's .grad",
}


@dataclass
class Target:
    """Where one output gradient of a node flows next."""

    node: Optional[str]  # the next node's name; None when that input needs no gradient
    node_id: Optional[int]
    records: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class Step:
    """One node of a backward pass, ready to show."""

    index: int
    node: str
    node_id: int
    records: list[int]
    labels: list[str]
    exprs: list[str]
    line: Optional[int]
    grad_in: list[Optional[Preview]]
    grad_out: list[Optional[Preview]]
    targets: list[Target]
    rule: str
    text: str


def steps(trace: Trace, pass_index: int = 0, start: int = 0, stop: Optional[int] = None) -> list[Step]:
    """The recorded steps of backward pass `pass_index`, in the order the engine ran them.

    `start`/`stop` pick a slice (as `list[start:stop]`): a view shows a few steps first and
    says the rest when asked, so only the steps asked for are put in words."""
    p = trace.passes[pass_index]
    by_node = {s.node_id: s for s in p.steps}
    return [_step(trace, p, s, by_node) for s in p.steps[start:stop]]


def _step(trace: Trace, p: BackwardPass, s: BackwardStep, by_node: dict[int, BackwardStep]) -> Step:
    recs = [trace.records[r] for r in s.records if 0 <= r < len(trace.records)]
    targets = [_target(trace, p, nid, by_node) for nid in s.next_ids]
    step = Step(
        index=s.index,
        node=s.node,
        node_id=s.node_id,
        records=list(s.records),
        labels=list(dict.fromkeys(r.label for r in recs)),  # a leaf updated in place has a record per version
        exprs=[r.expr or r.label for r in recs],
        line=next((r.line for r in recs if r.line is not None), None),
        grad_in=list(s.grad_in),
        grad_out=list(s.grad_out),
        targets=targets,
        rule=rule_for(s.node, recs[0].expr if recs else None),
        text="",
    )
    step.text = sentence(step)
    return step


def _target(trace: Trace, p: BackwardPass, nid: Optional[int], by_node: dict[int, BackwardStep]) -> Target:
    if nid is None:
        return Target(node=None, node_id=None)
    name = p.nodes[nid] if 0 <= nid < len(p.nodes) else None
    nxt = by_node.get(nid)
    rids = list(nxt.records) if nxt else _captured(trace, p, name)
    labels = list(dict.fromkeys(trace.records[r].label for r in rids if 0 <= r < len(trace.records)))
    return Target(node=name, node_id=nid, records=rids, labels=labels)


def _captured(trace: Trace, p: BackwardPass, node: Optional[str]) -> list[int]:
    """autograd.grad stops at its `inputs`: their nodes never run, so name them from the inputs."""
    if p.kind != "grad" or node is None:
        return []
    found = []
    for i in p.inputs:
        r = trace.records[i] if i is not None and 0 <= i < len(trace.records) else None
        if r is not None and (r.grad_fn or ("AccumulateGrad" if r.is_leaf else None)) == node:
            found.append(i)
    return found


def _constant_operand(expr: Optional[str]) -> tuple[Optional[str], Optional[float], bool]:
    """For `2*y**2` or `y**2`: the operator, the Python constant beside the tensor, whether it is on the right."""
    if not expr:
        return None, None, False
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        return None, None, False
    if not isinstance(node, ast.BinOp):
        return None, None, False
    op = type(node.op).__name__
    for side in (node.right, node.left):
        if isinstance(side, ast.Constant) and isinstance(side.value, (int, float)):
            return op, side.value, side is node.right
    return op, None, False


def rule_for(node: str, expr: Optional[str] = None) -> str:
    """The rule `node` applies, in words; made concrete when the source shows a constant."""
    op, const, right = _constant_operand(expr)
    if const is not None:
        c = f"{const:g}"
        if node == "PowBackward0" and op == "Pow":
            power = "x" if const - 1 == 1 else f"x^{const - 1:g}"
            return f"d(x^{c}) = {c}·{power} dx: the gradient is multiplied by {c}·{power}"
        if node in ("MulBackward0", "MulBackward1") and op == "Mult":
            return f"d({c}·x) = {c}·dx: the gradient is multiplied by the other operand, {c}"
        if node in ("DivBackward0", "DivBackward1") and op == "Div" and right:
            return f"d(x/{c}) = dx/{c}: the gradient is divided by {c}"
        if node in ("AddBackward0", "AddBackward1") and op == "Add":
            return f"d(x + {c}) = dx: the gradient is passed on unchanged (the constant {c} needs none)"
        if node in ("SubBackward0", "SubBackward1") and op == "Sub" and right:
            return f"d(x - {c}) = dx: the gradient is passed on unchanged (the constant {c} needs none)"
    if node in RULES:
        return RULES[node]
    if node.endswith("Backward"):  # torch names a custom Function's node after its class, without a number
        cls = node[: -len("Backward")] or "the Function"
        return f"a custom torch.autograd.Function: {cls}.backward() decides what gradient is sent on (the gradient check tests it)"
    base = node.rstrip("0123456789")
    for known, text in RULES.items():
        if known.rstrip("0123456789") == base:
            return text
    return f"{node}: applies the derivative of its forward operation (the chain rule)"


SENTENCE_VALUE = 60  # characters of a gradient's values in a step's sentence


def describe_grad(p: Optional[Preview]) -> str:
    """A gradient in a sentence: `1.`, `0.1667 in each of 6 elements`, `[10., 16., 22.]`."""
    if p is None:
        return "nothing"
    if p.complete and p.numel > 1:
        vals = np.asarray(p.values).reshape(-1)
        if np.all(vals == vals[0]):
            one = format_short(Preview(shape=(), dtype=p.dtype, values=np.asarray(vals[0])))
            return f"{one} in each of {p.numel} elements"
    if p.values is not None and getattr(p.values, "size", 0) * 3 > SENTENCE_VALUE:
        # n values print in at least 3n characters on one line: format_short's summary, unformatted
        return f"[{'x'.join(map(str, p.shape))}]" + (f" mean {p.mean:.4g}" if p.mean is not None else "")
    return format_short(p, SENTENCE_VALUE)


def _who(labels: list[str], node: Optional[str]) -> str:
    if labels:
        return " and ".join(labels)
    return node or "nowhere"


def sentence(step: Step) -> str:
    """One line with the numbers: what the node got and what it sent where."""
    who = f" for {step.labels[0]}" if step.labels else ""
    where = f" (line {step.line})" if step.line is not None else ""
    got = ", ".join(describe_grad(g) for g in step.grad_in) or "nothing"
    if step.node == "AccumulateGrad":
        leaf = step.labels[0] if step.labels else "the leaf"
        return f"AccumulateGrad{where}: {got} is added into {leaf}.grad"
    sent = []
    for g, t in zip(step.grad_out, step.targets):
        if t.node is None:
            continue
        sent.append(f"{describe_grad(g)} to {_who(t.labels, t.node)}")
    tail = "; sent " + "; ".join(sent) if sent else "; sent nothing on (no input needs a gradient)"
    return f"{step.node}{who}{where} received {got}{tail}"
