"""The explorer's engine: the cell's scalar inputs, the output's curve against each, the Jacobian.

A student moves an input and sees the output follow. Everything here runs the
cell again in the sandbox (`run_variant`: copies of what it reads, the RNG
states it started from, prints kept, the user's namespace, tensors, `.grad`s
and RNG states left exactly as the real run left them), with the input
replaced where its op made it (`SetValues`) or rebound by name (an earlier
cell's tensor). The output is found again by where it was made (`record_key`)
and differentiated on the re-run's retained graph with `torch.autograd.grad`,
which writes no `.grad`.

The curve is computed in one batched run when the cell allows it (the input
replaced by a 1-D tensor of every x; accepted only when every record on the
path from input to output was 0-d and comes out (N,), and it matches point-wise
values), else point by point within `limits.EXPLORE_CURVE_SECONDS`. Every
failure is caught and said in a `note`; the user's cell is never affected.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from ..capture.interventions import Intervention
from ..data.explore import TOO_BIG, Curve, Exploration, Jacobian, ScalarInput
from ..data.trace import Preview, Record, Trace
from .interventions import SetValues, Toggles, record_key
from .sandbox import SandboxError, run_variant, set_external_value
from .. import limits

FLOATS = ("torch.float16", "torch.bfloat16", "torch.float32", "torch.float64")
STEPS = 20  # grid steps each side of x0: the curve has 2 * STEPS + 1 points


# ---- the scan (no runs) ----
def _is_float(r: Record) -> bool:
    return r.preview is not None and r.preview.dtype in FLOATS


def _ancestors(trace: Trace, rid: int) -> set[int]:
    """Every record `rid` was computed from (through `Record.inputs` and in-place targets)."""
    seen, stack, recs = set(), [rid], trace.records
    while stack:
        i = stack.pop()
        if i in seen or not 0 <= i < len(recs):
            continue
        seen.add(i)
        stack.extend(recs[i].inputs)
        if recs[i].mutates is not None:
            stack.append(recs[i].mutates)
    return seen


def _settable(r: Record) -> bool:
    """A leaf a re-run can replace: made by a recorded op of this cell, or bound to a plain name."""
    if r.cell is not None or r.mutates is not None or r.inplace:
        return False
    if not r.external and r.span is not None:
        return True
    return r.external and bool(r.name) and r.name.isidentifier() and r.created_by is None


def _is_input(r: Record) -> bool:
    return r.is_leaf and r.requires_grad and _is_float(r) and _settable(r)


def explored_output(trace: Trace) -> Optional[Record]:
    """The root of the first backward pass the cell made, else its last named float result that needs grad."""
    for p in trace.passes[:1]:
        rid = p.roots[0] if p.roots else None
        if rid is not None and 0 <= rid < len(trace.records):
            root = trace.records[rid]
            if _is_float(root) and root.cell is None:
                return root
    for r in reversed(trace.records):
        if r.name and not r.external and r.span is not None and r.requires_grad and _is_float(r) and not r.is_leaf:
            return r
    return None


def _uses_gradient(trace: Trace, out: Record) -> bool:
    """The output is differentiated as root · v (backward(v) of a non-scalar root)."""
    return bool(trace.passes) and trace.passes[0].roots[:1] == [out.id] and trace.passes[0].gradient_given


def nice_step(x0: float) -> float:
    """1, 2 or 5 · 10^k nearest above 2·max(1, |x0|) / 40: x0 ± 20 steps spans about ±2·max(1, |x0|)."""
    target = 2 * max(1.0, abs(x0)) / (2 * STEPS)
    k = math.floor(math.log10(target))
    for m in (1, 2, 5, 10):
        if m * 10**k >= target * (1 - 1e-9):
            return float(m * 10**k)
    return float(10 ** (k + 1))


def scalar_inputs(trace: Trace, output: Optional[Record] = None) -> list[ScalarInput]:
    """The 0-d float leaves with requires_grad that the explored output depends on (a scan, no runs)."""
    out = output if output is not None else explored_output(trace)
    if out is None:
        return []
    found = []
    for rid in sorted(_ancestors(trace, out.id)):
        r = trace.records[rid]
        if not _is_input(r) or r.shape != () or r.preview.values is None:
            continue
        x0 = float(np.asarray(r.preview.values, dtype=np.float64).reshape(()))
        if not math.isfinite(x0):
            continue
        step = nice_step(x0)
        found.append(ScalarInput(
            record=r.id, label=r.label, value=x0, lo=x0 - STEPS * step, hi=x0 + STEPS * step, step=step,
            external=r.external,
        ))
    return found


def grid(inp: ScalarInput) -> list[float]:
    return [inp.value + (i - STEPS) * inp.step for i in range(2 * STEPS + 1)]


# ---- one sandboxed run, with the output caught ----
class _Probe(Intervention):
    """Catches the output (and the inputs the cell makes) in a re-run, and differentiates there.

    `batch` = (input record, 1-D tensor of xs): the batched curve's run (the
    input replaced by all xs at once; backward() of a batched root differentiates its sum).
    `jac` = (input record, tensor): the Jacobian's run (the input replaced by
    the tensor `torch.autograd.functional.jacobian` passes).
    """

    def __init__(self, out: Record, want: list[Record], batch=None, replace=None):
        self.out_key = record_key(out)
        self.want = want  # the inputs to differentiate with respect to
        self.replace = replace  # (Record, tensor or value) to put in place of that input
        self.batch = batch is not None
        self.out: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None  # the gradient backward() was given for the output
        self.leaves: dict[int, torch.Tensor] = {}
        self.after_run: Optional[Callable] = None
        self.error = ""
        self._snapshot = None  # set by `Runs.run` (an external input is rebound there)
        setter = {}
        if replace is not None and not replace[0].external:
            setter[record_key(replace[0])] = replace[1]
        self._setter = SetValues(setter) if setter else None
        self._keys = {record_key(r): r.id for r in want if not r.external}
        self.interventions = ([self._setter] if self._setter else []) + [self]

    def replace_output(self, record: Record, t: torch.Tensor) -> None:
        k = record_key(record)
        if k in self._keys:
            self.leaves[self._keys[k]] = t
        if k == self.out_key and record.cell is None:
            self.out = t
        return None

    def sees_backward(self, roots: tuple, gradient) -> None:
        if self.out is not None and self.v is None and len(roots) == 1 and roots[0] is self.out:
            g = gradient[0] if isinstance(gradient, (tuple, list)) and gradient else gradient
            self.v = g.detach() if isinstance(g, torch.Tensor) else None

    def backward_roots(self, roots: tuple, gradient):
        if not self.batch or gradient is not None or self.out is None or not any(r is self.out for r in roots):
            return None
        return tuple(r.sum() if r.numel() != 1 else r for r in roots)  # every point's own backward, at once

    def before(self, ns: dict) -> None:
        for r in self.want:
            if r.external:
                if self.replace is not None and self.replace[0].id == r.id:
                    self.leaves[r.id], _ = set_external_value(ns, self._snapshot, r, self.replace[1])
                else:
                    t = ns.get(r.name)
                    if isinstance(t, torch.Tensor):
                        self.leaves[r.id] = t

    def after(self, ns: dict, trace: Trace) -> None:
        if self.after_run is not None:
            try:
                self.after_run(self, trace)
            except Exception as exc:  # said in the curve's note
                self.error = f"{type(exc).__name__}: {exc}"


class Runs:
    """The sandboxed runs of one cell for the explorer, with the toggles `base` on."""

    def __init__(self, shell, source: str, trace: Trace, snapshot, first_line: int = 2, base: Toggles = Toggles()):
        self.shell, self.source, self.trace, self.snapshot = shell, source, trace, snapshot
        self.first_line, self.base = first_line, base
        self.runs = 0

    def run(self, probe: "_Probe", values: dict[int, float]) -> Trace:
        probe._snapshot = self.snapshot
        self.runs += 1
        return run_variant(self.shell, self.source, self.trace, self.snapshot, self.toggles(values),
                           first_line=self.first_line, probe=probe)

    def toggles(self, values: dict[int, float]) -> Toggles:
        b = self.base
        return Toggles(no_grad=b.no_grad, detach_ids=b.detach_ids, flip_ids=b.flip_ids, detach_names=b.detach_names,
                       values=tuple(sorted(values.items())))


def _scalar_of(probe: _Probe, weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The function plotted: the output, or its dot product with the gradient backward() was given."""
    out = probe.out
    if out is None:
        return None
    if weights is not None:
        if weights.shape != out.shape:
            return None
        return (out * weights.to(out.dtype)).sum()
    return out if out.numel() == 1 else None


def _finite(x) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _point(runs: Runs, out: Record, inp: ScalarInput, x: float, values: dict) -> tuple:
    """(y, slope, why) at input = x, the other inputs at `values`: measured as a variant's point is."""
    probe = measure_at(out, [inp], runs.trace)
    trace = runs.run(probe, {**values, inp.record: float(x)})
    y, slope = probe.at.get(inp.record, (None, None))
    if trace.error is not None:
        return y, slope, f"{trace.error.type}: {trace.error.message}"
    if probe.error:
        return y, slope, probe.error
    if inp.record not in probe.at:
        return None, None, f"the re-run did not compute {out.label} again"
    return y, slope, ""


def _path_keys(trace: Trace, out: Record, inp: Record) -> Optional[list[tuple]]:
    """The records between the input and the output; None when one of them is not 0-d (not elementwise)."""
    down = _descendants(trace, inp.id)
    path = [trace.records[i] for i in sorted(_ancestors(trace, out.id) & down)]
    if any(r.shape != () or r.span is None and r.id != inp.id for r in path):
        return None
    return [record_key(r) for r in path if r.span is not None]


def _descendants(trace: Trace, rid: int) -> set[int]:
    seen = {rid}
    for r in trace.records[rid + 1:]:
        if any(i in seen for i in r.inputs) or (r.mutates is not None and r.mutates in seen):
            seen.add(r.id)
    return seen


def _batched(runs: Runs, out: Record, inp: ScalarInput, xs: list[float], values: dict) -> Optional[tuple]:
    """(ys, slopes) from one run with the input replaced by every x at once; None when not verifiably elementwise."""
    rec = runs.trace.records[inp.record]
    keys = _path_keys(runs.trace, out, rec)
    if keys is None or _uses_gradient(runs.trace, out):
        return None
    n = len(xs)
    like = torch.tensor(0.0, dtype=_dtype(rec))
    xb = torch.tensor(xs, dtype=like.dtype)
    probe = _Probe(out, [rec], batch=True, replace=(rec, xb))
    result: dict = {}

    def measure(p: _Probe, trace: Trace) -> None:
        o, leaf = p.out, p.leaves.get(inp.record)
        if o is None or leaf is None or tuple(o.shape) != (n,):
            return
        by_key = {record_key(r): r for r in trace.records}
        if any(k not in by_key or by_key[k].shape != (n,) for k in keys):
            return
        result["ys"] = [_finite(v) for v in o.detach().double().tolist()]
        if o.requires_grad and leaf.requires_grad:
            (g,) = torch.autograd.grad(o.sum(), leaf, retain_graph=True, allow_unused=True)
            result["slopes"] = [_finite(v) for v in g.double().tolist()] if g is not None else [0.0] * n
        else:
            result["slopes"] = []

    probe.after_run = measure
    trace = runs.run(probe, {k: v for k, v in values.items() if k != inp.record})
    if trace.error is not None or probe.error or "ys" not in result:
        return None
    return result["ys"], result["slopes"]


def _dtype(r: Record) -> torch.dtype:
    return getattr(torch, (r.dtype or "torch.float32").split(".")[-1])


def _close(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))


def curve(runs: Runs, out: Record, inp: ScalarInput, values: dict, budget: float = limits.EXPLORE_CURVE_SECONDS,
          known: Optional[tuple] = None) -> Curve:
    """The output against `inp` over its grid; `known` = (y, slope) at x0 from the run shown, if any."""
    c = Curve(input=inp.record, input_label=inp.label, output=out.id, output_label=out.label, xs=grid(inp), h=inp.step)
    batched = _batched(runs, out, inp, c.xs, values)
    if batched is not None:
        ys, slopes = batched
        # checked against the run at x0: the real run's own value when known (no run needed), else point runs
        # at x0 and at one end. A batched op that mixes points (softmax, cumsum) changes the value at x0.
        ok = _close(ys[STEPS], known[0]) if known is not None else (
            _close(ys[STEPS], _point(runs, out, inp, c.xs[STEPS], values)[0])
            and _close(ys[0], _point(runs, out, inp, c.xs[0], values)[0]))
        if ok:
            c.ys, c.slopes, c.batched = ys, slopes, True
            return c
    deadline = time.perf_counter() + budget
    failed: list[tuple[float, str]] = []
    n = len(c.xs)
    c.ys, c.slopes = [None] * n, [None] * n
    for i in _coarse_to_fine(n):  # a slow cell's budget still spans the whole range, only coarser
        if time.perf_counter() > deadline:
            break
        y, slope, why = _point(runs, out, inp, c.xs[i], values)
        c.ys[i], c.slopes[i] = y, slope
        if why:
            failed.append((c.xs[i], why))
    failed.sort()
    skipped = sum(1 for y, s in zip(c.ys, c.slopes) if y is None and s is None) - len(failed)
    notes = []
    if failed:
        x, why = failed[0]
        notes.append(f"the cell failed at {len(failed)} of {len(c.xs)} points (at {inp.label} = {x:g}: {why})"[: limits.WIDGET_TEXT])
    if skipped > 0:
        notes.append(f"{skipped} of {len(c.xs)} points left out: the cell is too slow to re-run for all within {budget:g} s")
    c.note = "; ".join(notes)
    return c


def _coarse_to_fine(n: int) -> list[int]:
    """0 … n-1 with the ends and the middle first, then each half's middle, and so on."""
    order, seen, step = [], set(), n - 1
    while step >= 1:
        for i in range(0, n, step):
            if i not in seen:
                seen.add(i)
                order.append(i)
        step //= 2
    return order + [i for i in range(n) if i not in seen]


def _at(c: Curve, x0: float, y0: Optional[float], slope: Optional[float], runs: Runs, out: Record,
        inp: ScalarInput, values: dict) -> Curve:
    """The curve with its point, tangent and secant at x0."""
    from dataclasses import replace

    c = replace(c, xs=list(c.xs), ys=list(c.ys), slopes=list(c.slopes))
    c.x0, c.y0, c.slope, c.h = x0, y0, slope, inp.step
    i = (x0 - inp.lo) / inp.step
    j = round(i)
    if abs(i - j) < 1e-6 and 1 <= j <= len(c.xs) - 2:
        lo, hi = c.ys[j - 1], c.ys[j + 1]
    else:
        lo = _point(runs, out, inp, x0 - inp.step, values)[0]
        hi = _point(runs, out, inp, x0 + inp.step, values)[0]
    if lo is not None and hi is not None:
        c.secant = (hi - lo) / (2 * inp.step)
    return c


# ---- the Jacobian ----
def jacobian_for(runs: Runs, out: Record, leaf: Record, x: torch.Tensor, shown: Trace,
                 shown_out: Record, shown_leaf: Record) -> Jacobian:
    """J = d out / d leaf by `torch.autograd.functional.jacobian` over sandboxed re-runs; v·J against `.grad`.

    `runs` re-runs the cell that made `out` (records `out`, `leaf` are its); `shown`
    is the trace the view shows, with `shown_out`, `shown_leaf` its records (the same
    tensors, as the backward cell saw them)."""
    j = Jacobian(output=shown_out.id, output_label=shown_out.label, input=shown_leaf.id, input_label=shown_leaf.label,
                 out_shape=tuple(out.shape or ()), in_shape=tuple(leaf.shape or ()))
    caught: dict = {}

    def f(xin: torch.Tensor) -> torch.Tensor:
        probe = _Probe(out, [leaf], replace=(leaf, xin))
        trace = runs.run(probe, {})
        if trace.error is not None:
            raise _Failed(f"{trace.error.type}: {trace.error.message}")
        if probe.out is None:
            raise _Failed(f"the re-run did not compute {out.label} again")
        caught["out"] = probe.out.detach().clone()
        return probe.out

    try:
        J = torch.autograd.functional.jacobian(f, x)
    except (_Failed, SandboxError, RuntimeError) as exc:
        j.note = f"the Jacobian could not be computed: {exc}"[: limits.WIDGET_TEXT]
        return j
    rows = J.detach().double().reshape(int(np.prod(j.out_shape, dtype=np.int64)), -1)
    j.rows = [[_finite(v) for v in row] for row in rows.tolist()]
    recorded = _values(shown_out.preview)
    if recorded is not None and "out" in caught:
        again = caught["out"].double().reshape(-1).numpy()
        if again.shape != recorded.shape or not np.allclose(again, recorded, rtol=1e-5, atol=1e-6):
            j.note = f"the re-run's {shown_out.label} differs from the one your cell differentiated: the Jacobian is of the re-run"
    v = _pass_gradient(shown, shown_out)
    grad = _values(shown_leaf.attr_grad)
    if v is not None:
        j.v = [float(a) for a in v]
        if v.shape[0] == rows.shape[0]:
            vj = v @ rows.numpy()
            j.vj = [_finite(a) for a in vj]
            if grad is not None:
                j.grad = [_finite(a) for a in grad]
                j.agrees = bool(grad.shape == vj.shape and np.allclose(vj, grad, rtol=1e-4, atol=1e-5))
    elif grad is not None:
        j.grad = [_finite(a) for a in grad]
    return j


class _Failed(Exception):
    pass


def _values(p: Optional[Preview]) -> Optional[np.ndarray]:
    if p is None or not p.complete:
        return None
    return np.asarray(p.values, dtype=np.float64).reshape(-1)


def _pass_gradient(trace: Trace, root: Record) -> Optional[np.ndarray]:
    """The gradient the first backward pass gave the root (the `v` of backward(v))."""
    if not trace.passes or trace.passes[0].roots[:1] != [root.id] or not trace.passes[0].gradient_given:
        return None
    return _values(root.grads.get(0))


def jacobian_leaf(trace: Trace, out: Record) -> Optional[Record]:
    """The leaf for the Jacobian of a non-scalar output: the first vector leaf it depends on, else a scalar one.

    A scalar output has none: its Jacobian is the gradient row the table already shows as `.grad`."""
    if out.preview is None or out.preview.numel <= 1:
        return None
    leaves = [trace.records[i] for i in sorted(_ancestors(trace, out.id))]
    leaves = [r for r in leaves if r.is_leaf and r.requires_grad and _is_float(r) and r.shape is not None]
    vectors = [r for r in leaves if r.preview.numel > 1]
    small = [r for r in vectors if out.preview.numel * r.preview.numel <= limits.JACOBIAN_MAX_ENTRIES]
    if small or vectors:  # the first one small enough; else the first, whose Jacobian is said too big
        return (small or vectors)[0]
    if out.shape is not None and out.preview.numel > 1 and leaves:
        return leaves[0]
    return None


def too_big(out_n: int, in_n: int) -> str:
    n = out_n * in_n
    if n > limits.JACOBIAN_MAX_ENTRIES:
        return f"{TOO_BIG} {out_n} × {in_n} = {n} entries > {limits.JACOBIAN_MAX_ENTRIES}"
    return ""


# ---- what a view asks for ----
def explore(runs: Runs, *, values: Optional[dict[int, float]] = None, at: Optional[dict] = None,
            cache: Optional[dict] = None, blocked: str = "") -> Exploration:
    """Everything the explorer shows for `runs.trace` (the real run) at `values` (record id -> value).

    `at` = {input record id: (y, slope)} measured on the run shown (a variant's own
    graph), else the real run's point is measured here. `cache` keeps curves between
    calls (a curve depends on the other inputs' values only). Cells with no input
    and no Jacobian cost a scan of their records."""
    trace = runs.trace
    ex = Exploration()
    out = explored_output(trace)
    if out is None:
        return ex
    inputs = scalar_inputs(trace, out)
    leaf = jacobian_leaf(trace, out)
    if not inputs and leaf is None:
        return ex
    ex.output, ex.output_label = out.id, out.label
    if blocked:
        ex.inputs, ex.note = inputs, blocked
        return ex
    values = dict(values or {})
    now = {i.record: values.get(i.record, i.value) for i in inputs}
    ex.inputs = [_moved(i, now[i.record]) for i in inputs]
    cache = {} if cache is None else cache
    real = all(now[i.record] == i.value for i in inputs)
    for inp in inputs:
        try:
            ex.curves.append(_curve_at(runs, out, inp, now, at, cache, real))
        except Exception as exc:  # one curve's failure never fails the view
            ex.curves.append(Curve(input=inp.record, input_label=inp.label, output=out.id, output_label=out.label,
                                   note=f"the curve could not be computed: {type(exc).__name__}: {exc}"[: limits.WIDGET_TEXT]))
    if leaf is not None and not values:
        ex.jacobian = jacobian_in_cell(runs, out, leaf)
    return ex


def _moved(inp: ScalarInput, x: float) -> ScalarInput:
    from dataclasses import replace

    return replace(inp, value=x)


def _curve_at(runs: Runs, out: Record, inp: ScalarInput, now: dict, at: Optional[dict], cache: dict, real: bool) -> Curve:
    others = {k: v for k, v in now.items() if k != inp.record}
    key = (inp.record, tuple(sorted(others.items())))
    x0 = now[inp.record]
    known = None
    if real:
        y = _real_value(runs.trace, out)
        known = (y, None) if y is not None else None
    base = cache.get(key)
    if base is None:
        base = cache[key] = curve(runs, out, inp, others, known=known)
    if at is not None and inp.record in at:
        y0, slope = at[inp.record]
    elif _on_grid(inp, x0) is not None and base.ys:
        j = _on_grid(inp, x0)
        y0 = known[0] if known is not None else base.ys[j]
        slope = base.slopes[j] if base.slopes else None
        if slope is None or (not base.batched and y0 is None):
            y0, slope, _ = _point(runs, out, inp, x0, others)
    else:
        y0, slope, _ = _point(runs, out, inp, x0, others)
    return _at(base, x0, y0, slope, runs, out, inp, others)


def _on_grid(inp: ScalarInput, x: float) -> Optional[int]:
    i = (x - inp.lo) / inp.step
    j = round(i)
    return j if abs(i - j) < 1e-6 and 0 <= j <= 2 * STEPS else None


def _real_value(trace: Trace, out: Record) -> Optional[float]:
    """The output's value in the real run, when it is the plotted scalar itself."""
    if _uses_gradient(trace, out) or out.preview is None or out.preview.numel != 1 or not out.preview.complete:
        return None
    return _finite(np.asarray(out.preview.values, dtype=np.float64).reshape(()))


def jacobian_in_cell(runs: Runs, out: Record, leaf: Record, shown: Optional[Trace] = None,
                     shown_out: Optional[Record] = None, shown_leaf: Optional[Record] = None) -> Optional[Jacobian]:
    """The Jacobian of `out` with respect to `leaf` (records of `runs.trace`), bounded; None for 1 × 1."""
    shown = shown or runs.trace
    shown_out, shown_leaf = shown_out or out, shown_leaf or leaf
    n_out, n_in = out.preview.numel, leaf.preview.numel
    if n_out * n_in <= 1:
        return None
    j = Jacobian(output=shown_out.id, output_label=shown_out.label, input=shown_leaf.id, input_label=shown_leaf.label,
                 out_shape=tuple(out.shape), in_shape=tuple(leaf.shape))
    j.note = too_big(n_out, n_in)
    if j.note:
        return j
    if not _settable(leaf):
        j.note = f"`{leaf.label}` cannot be replaced in a re-run (it was not made by a recorded op or bound to a name)"
        return j
    try:
        x = _leaf_value(runs, out, leaf)
        return jacobian_for(runs, out, leaf, x, shown, shown_out, shown_leaf)
    except Exception as exc:
        j.note = f"the Jacobian could not be computed: {type(exc).__name__}: {exc}"[: limits.WIDGET_TEXT]
        return j


def _leaf_value(runs: Runs, out: Record, leaf: Record) -> torch.Tensor:
    """The leaf's value as the re-run makes it (from its record when whole, else caught in one re-run)."""
    full = _values(leaf.preview)
    if full is not None:
        return torch.tensor(full, dtype=_dtype(leaf)).reshape(leaf.shape)
    probe = _Probe(out, [leaf])
    trace = runs.run(probe, {})
    t = probe.leaves.get(leaf.id)
    if trace.error is not None or t is None:
        raise _Failed(f"the re-run did not make {leaf.label} again")
    return t.detach().clone()


def measure_at(out: Record, inputs: list[ScalarInput], trace: Trace) -> "_Probe":
    """The probe a variant run carries to measure y and every input's slope on its own graph (`probe.at`)."""
    want = [trace.records[i.record] for i in inputs]
    probe = _Probe(out, want)
    weighted = _uses_gradient(trace, out)
    probe.at = {}

    def measure(p: _Probe, _trace: Trace) -> None:
        f = _scalar_of(p, p.v if weighted else None)
        if f is None:
            return
        y = _finite(f.detach())
        leaves = [p.leaves.get(i.record) for i in inputs]
        usable = [t is not None and t.requires_grad for t in leaves]
        grads = [None] * len(leaves)
        if f.requires_grad and any(usable):
            got = iter(torch.autograd.grad(f, [t for t, u in zip(leaves, usable) if u], retain_graph=True, allow_unused=True))
            grads = []
            for u in usable:
                g = next(got) if u else None
                grads.append(None if not u else (_finite(g) if g is not None else 0.0))
        for i, g in zip(inputs, grads):
            p.at[i.record] = (y, g)

    probe.after_run = measure
    return probe


def earlier_jacobian(earlier, shown: Trace, root: Record) -> Jacobian:
    """The Jacobian of `root` (a record of `shown` made by the earlier traced cell whose session is
    `earlier`), by re-running that cell in its own sandbox (its snapshot, its RNG states)."""
    et = earlier.trace
    outs = [r for r in et.records if r.name == root.name and r.line == root.cell_line and not r.external]
    if not outs:
        return Jacobian(output=root.id, output_label=root.label, input=-1, input_label="",
                        note=f"no Jacobian: {root.label} could not be found again in cell [{root.cell}]")
    out = outs[-1]
    leaf = jacobian_leaf(et, out)
    if leaf is None:
        return Jacobian(output=root.id, output_label=root.label, input=-1, input_label="",
                        note=f"no Jacobian: {root.label} depends on no leaf that needs grad in cell [{root.cell}]")
    same = [r for r in shown.records if r.cell == root.cell and r.name == leaf.name and r.cell_line == leaf.line]
    same = same or [r for r in shown.records if r.name == leaf.name and r.is_leaf]
    shown_leaf = same[-1] if same else leaf
    runs = Runs(earlier.shell, earlier.source, et, earlier._snapshot, earlier.first_line)
    j = jacobian_in_cell(runs, out, leaf, shown, root, shown_leaf)
    if j is not None and not same:
        j.input = -1
        j.note = j.note or f"{leaf.label} is not among this cell's records: no .grad to compare"
        j.grad, j.agrees = None, None
    return j
