"""The gradient check: every leaf's gradient against central finite differences.

The cell is re-run in a sandbox (copies of what it reads, the RNG states it
started from) in float64: once to read each leaf's analytic gradient from the
first backward pass, then twice per sampled element with that element nudged
by ±h. The function checked is the root of the first backward pass (a
scalar, or its dot product with the gradient backward() was given). The user's namespace, tensors, grads, RNG states and default dtype
are never touched. Work is bounded: a few elements per leaf, a few leaves.
"""

from __future__ import annotations

import math
import re

import time
from typing import Optional

import numpy as np
import torch

from .gradcheck_run import ROOT, _Runner, _RunFailed
from .interventions import record_key
from ..data.checks import LeafCheck
from ..data.trace import BackwardPass, Record, Trace
from .. import limits

MAX_LEAVES = limits.CHECK_LEAVES
MAX_ELEMENTS = limits.CHECK_ELEMENTS
STEP = 1e-6  # central differences in float64: truncation ~h², rounding ~1e-16/h
ATOL = 1e-5
RTOL = 1e-3
TIME_BUDGET = limits.CHECK_SECONDS
REFERENCE_LIMIT = limits.CHECK_REFERENCE_LIMIT


def gradcheck_cell(
    shell,
    source: str,
    trace: Trace,
    snapshot,
    *,
    first_line: int = 2,
    max_leaves: int = MAX_LEAVES,
    max_elements: int = MAX_ELEMENTS,
    time_budget: float = TIME_BUDGET,
) -> list[LeafCheck]:
    """Check the gradient of every leaf the first backward pass of `trace` reached.

    Never raises for the cell's sake (the real run already happened): a leaf
    that cannot be checked gets `ok=None` and a note saying why.
    """
    if not trace.passes:
        return []
    p = trace.passes[0]
    leaves = _leaves(trace, p)[:max_leaves]
    if not leaves:
        return []
    try:
        checks = _check_all(shell, source, trace, snapshot, p, leaves, first_line, max_elements, time_budget)
    except Exception as exc:  # a bug here must not turn a good cell into a failed one
        note = f"the gradient check itself failed: {type(exc).__name__}: {exc}"
        return [LeafCheck(r.id, r.label, note=note) for r in leaves]
    return [checks[r.id] for r in leaves]


def _check_all(shell, source, trace, snapshot, p, leaves, first_line, max_elements, time_budget) -> dict[int, LeafCheck]:
    reason = _unverifiable(trace, p)
    if reason:
        return {r.id: LeafCheck(r.id, r.label, note=reason) for r in leaves}
    tied = _tied_modules(shell, snapshot)
    if tied:
        return {r.id: LeafCheck(r.id, r.label, note=_tied_note(r, tied, snapshot)) for r in leaves}
    checks = {
        r.id: LeafCheck(r.id, r.label, note="it was made where the tracer could not place it")
        for r in leaves if not r.external and r.span is None
    }
    todo = [r for r in leaves if r.id not in checks]
    runner = _Runner(shell, source, trace, snapshot, first_line, p)
    started = time.perf_counter()
    try:
        # the reference run records every op (not just a loop's first runs) to see every path to the output
        runner.value, analytic, seen = runner.run(None, todo, detail_limit=REFERENCE_LIMIT)
        runner.set_weights(analytic.pop(ROOT, None), p.gradient_given)
    except _RunFailed as exc:
        note = _freed_graph(trace, p, str(exc)) or f"the sandboxed re-run failed: {exc}"
        checks.update({r.id: LeafCheck(r.id, r.label, note=note) for r in todo})
        return checks
    for rid, why in runner.unavailable.items():
        checks[rid] = LeafCheck(rid, trace.records[rid].label, note=why)
    if _reads_earlier_history(snapshot):
        checks.update(_behind_earlier_cells(seen, [r for r in todo if r.id not in checks]))
    todo = [r for r in todo if r.id not in checks]
    # bounded work: as many nudged runs as the budget allows at the reference run's pace
    per_run = max(time.perf_counter() - started, 1e-4)
    per_leaf = max(1, min(max_elements, int(time_budget / per_run) // (2 * max(len(todo), 1))))
    deadline = time.perf_counter() + time_budget
    for r in todo:
        check = _check_leaf(runner, r, analytic.get(r.id), per_leaf, deadline, time_budget)
        if check.ok is False:
            _excuse(check, seen, r)
        checks[r.id] = check
    return checks


def _freed_graph(trace: Trace, p: BackwardPass, error: str) -> Optional[str]:
    """The usual reason a re-run cannot go backward: the graph came from an earlier cell and is freed."""
    if "backward through the graph a second time" not in error:
        return None
    hidden = _first_opaque_ancestor(trace, p.roots[0])
    if hidden is None:
        return None
    return (
        f"the cell goes backward through `{hidden.label}`, computed in an earlier cell whose graph the real "
        "backward() already freed, so it cannot be re-run; put the forward pass in this cell to check it"
    )


def _tied_modules(shell, snapshot) -> list[str]:
    """Modules the cell reads whose weights the sandbox must share with the real run.

    A tensor computed from a module in an earlier cell (`h = enc(X)`) and read by this one keeps
    the module's real weights in its graph; the sandbox shares them rather than copy them, so the
    check can neither cast that module to float64 nor nudge its weights.
    """
    shared = getattr(snapshot, "shared", None) or {}
    if not shared or shell is None:
        return []
    tied = []
    for name in sorted(getattr(snapshot, "read", {}) or {}):
        obj = shell.user_ns.get(name)
        if isinstance(obj, torch.nn.Module):
            try:
                tensors = list(obj.parameters()) + list(obj.buffers())
            except Exception:
                continue
            if any(id(t) in shared for t in tensors):
                tied.append(name)
    return tied


def _tied_note(r: Record, tied: list[str], snapshot) -> str:
    """Why a leaf is not checked when a module is tied to the real run, what it means, what to do."""
    earlier = [n for n in getattr(snapshot, "shared_names", []) if n not in tied]
    via = " and ".join(f"`{n}`" for n in earlier) or "a tensor"
    mods = " and ".join(f"`{m}`" for m in tied)
    owner = next((m for m in tied if (r.name or "").startswith(m + ".")), None)
    what = f"`{r.label}` is a weight of `{owner}`" if owner else f"the re-run also needs {mods}"
    return (
        f"{what}, and this cell also uses {via}, computed from {mods} in an earlier cell. The graph of {via} "
        f"holds your real {mods}, so the check cannot re-run the cell on a float64 copy of it, and it never "
        "nudges your real weights. This says nothing about whether the gradient is right. To have it checked, "
        f"compute {via} in this cell too (or keep only its value in the earlier cell, with .detach())."
    )


def _reads_earlier_history(snapshot) -> bool:
    """Whether the cell reads a tensor with history (a grad_fn) made in an earlier cell.

    The snapshot shares exactly those with the real run (they cannot be copied with their graph).
    Without one, assume it may. A tensor with a grad_fn that the recorder first meets mid-call
    (the output of an op it could not see into, e.g. inside MultiheadAttention.forward) looks
    like one from before the cell, but the re-run computes it again, so a nudge reaches it.
    """
    shared = getattr(snapshot, "shared", None)
    if snapshot is None or shared is None:
        return True
    return any(t.grad_fn is not None for t in shared.values())


def _behind_earlier_cells(seen: Trace, leaves: list[Record]) -> dict[int, LeafCheck]:
    """External leaves when the output also depends on a tensor with history from an earlier cell:
    nudging the leaf cannot change that tensor, so finite differences would miss that path."""
    roots = seen.passes[0].roots if seen.passes else []
    if not roots or roots[0] is None:
        return {}
    hidden = _first_opaque_ancestor(seen, roots[0])
    if hidden is None:
        return {}
    note = f"the output also depends on `{hidden.label}`, computed before this cell, which a nudge cannot change"
    return {r.id: LeafCheck(r.id, r.label, note=note) for r in leaves if r.external}


def _leaves(trace: Trace, p: BackwardPass) -> list[Record]:
    found = [
        r for r in trace.records
        if r.is_leaf and r.requires_grad and p.index in r.grads and r.preview is not None and r.preview.numel > 0
    ]
    # an in-place op on a leaf (requires_grad_, an init like uniform_) gets a record of its own for the
    # same tensor: keep the last one, where a nudge is not overwritten by the op
    replaced = {r.mutates for r in found if r.inplace and r.mutates is not None}
    return [r for r in found if r.id not in replaced]


def _unverifiable(trace: Trace, p: BackwardPass) -> Optional[str]:
    """Why the first pass's output cannot be re-computed and checked, or None."""
    if p.error:
        return "the backward call failed"
    if len(p.roots) != 1 or p.roots[0] is None:
        return "the backward call differentiated several outputs at once"
    root = trace.records[p.roots[0]]
    if root.external:
        return f"the value differentiated, `{root.label}`, was computed before this cell: check the cell that computes it"
    if root.preview is None or (root.preview.numel != 1 and not p.gradient_given):
        return f"`{root.label}` is not a scalar and backward() was given no gradient"
    return None


def _sample(n: int, k: int) -> list[int]:
    """Up to `k` flat indices spread over `n` elements, first and last included (deterministic)."""
    return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()))


def _check_leaf(
    runner: "_Runner", r: Record, analytic: Optional[torch.Tensor], elements: int, deadline: float, budget: float
) -> LeafCheck:
    check = LeafCheck(r.id, r.label)
    if analytic is None:
        check.note = "the re-run did not give it a gradient (the cell may not compute the same thing again)"
        return check
    flat = analytic.detach().reshape(-1).to(torch.float64)
    planned = _sample(flat.numel(), elements)
    f0, scale = runner.value, abs(runner.value)
    if not math.isfinite(f0):
        # f(x±h) - f(x-h) of a NaN or an Inf is no slope: there is nothing to compare autograd's value with
        check.note = f"not checked: the output is {f0} here, and finite differences of a NaN or an Inf say nothing"
        return check
    undefined = []  # elements where a nudge makes the output NaN or Inf (the edge of sqrt's or log's domain)
    try:
        for i in planned:
            if time.perf_counter() > deadline:
                break
            plus = runner.run((r, i, STEP), [])[0]
            minus = runner.run((r, i, -STEP), [])[0]
            if not (math.isfinite(plus) and math.isfinite(minus)):
                undefined.append(i)
                continue
            ana = float(flat[i])
            check.samples.append((i, ana, (plus - minus) / (2 * STEP)))
            scale = max(scale, abs(plus), abs(minus))
            if _at_kink(ana, (f0 - minus) / STEP, (plus - f0) / STEP):
                check.kinks.append(i)
    except _RunFailed as exc:
        check.note = f"a perturbed re-run failed: {exc}"
        return check
    if not check.samples:
        check.note = (f"not checked: a nudge of {STEP:g} makes the output NaN or Inf at every element tried"
                      if undefined else f"not checked: the time budget ({budget:g} s) ran out")
        return check
    _score(check, scale)
    if check.ok and len(check.samples) + len(undefined) < len(planned):
        check.note = f"{len(check.samples)} of {len(planned)} planned elements checked within the time budget ({budget:g} s)"
    if undefined:
        skipped = f"element(s) {', '.join(map(str, undefined))} not checked: a nudge of {STEP:g} makes the output NaN or Inf there"
        check.note = f"{check.note}; {skipped}" if check.note else skipped
    return check


def _tolerance(ana: float, f_scale: float) -> float:
    # rounding in f(x±h) is ~1e-16·|f|/h: allow 10x that on top of the usual tolerances
    return ATOL + RTOL * abs(ana) + 1e-9 * f_scale


def _at_kink(ana: float, left: float, right: float) -> bool:
    """A non-differentiable point: the one-sided slopes differ and autograd's value lies between them."""
    tol = _tolerance(ana, 0.0)
    lo, hi = min(left, right), max(left, right)
    return hi - lo > 100 * tol and lo - tol <= ana <= hi + tol


def _score(check: LeafCheck, f_scale: float = 0.0) -> None:
    abs_errs, rel_errs, ok = [], [], True
    for i, ana, num in check.samples:
        err = abs(num - ana)
        scale = max(abs(ana), abs(num))
        abs_errs.append(err)
        rel_errs.append(err / scale if scale > 1e-12 else 0.0)
        ok = ok and (err <= _tolerance(ana, f_scale) or i in check.kinks)
    check.elements_checked = len(check.samples)
    check.max_abs_err = max(abs_errs, default=0.0)
    check.max_rel_err = max(rel_errs, default=0.0)
    check.ok = ok
    if not ok:
        check.note = "the gradient autograd computed differs from the finite-difference estimate"
    elif check.kinks:
        check.note = (
            f"element(s) {', '.join(map(str, check.kinks))} sit at a kink (a non-differentiable point, e.g. relu at 0): "
            "autograd's value lies between the one-sided slopes, as PyTorch defines it there"
        )




# ---- paths autograd ignores by design ----
def _excuse(check: LeafCheck, seen: Trace, leaf: Record) -> None:
    """A disagreement is not a wrong gradient when the leaf also reaches the output where autograd
    is told not to look (`.detach()`, `torch.no_grad()`) or where the re-run could not see."""
    start = _find_in(seen, leaf)
    root = seen.passes[0].roots[0] if seen.passes and seen.passes[0].roots else None
    if start is None or root is None:
        return
    on_path = _descendants(seen, start) & (_ancestors(seen, root) | {root})
    # a custom Function's forward runs under no_grad by design: its node (`CubeBackward`) covers it
    custom = {n[: -len("Backward")] for n in seen.passes[0].nodes if n.endswith("Backward")}
    cuts = [seen.records[i] for i in sorted(on_path) if _cuts_graph(seen.records[i], custom)]
    hidden = _first_opaque_ancestor(seen, root)
    if cuts:
        c = cuts[0]
        how = "`.detach()`" if c.op in ("detach", "detach_") else "torch.no_grad()"
        check.ok = None
        check.note = (
            f"the numbers differ because `{leaf.label}` also reaches the output through {how} on line {c.line} "
            f"(`{c.expr or c.op}`): autograd ignores that path by design, finite differences cannot"
        )
    elif hidden is not None:
        check.ok = None
        check.note = (
            f"the numbers differ, but part of the computation (`{hidden.label}`) was not visible to the re-run, "
            "so a path autograd ignores cannot be ruled out"
        )
    else:
        hook = _hook_line(seen.source)
        if hook is not None:
            check.ok = None
            check.note = (
                f"the numbers differ, but the cell registers a gradient hook on line {hook[0]} (`{hook[1]}`): "
                "a hook may change the gradient autograd reports, and finite differences of the function cannot see it"
            )


_HOOK_CALL = re.compile(r"\.register_(hook|prehook|post_accumulate_grad_hook|full_backward_hook|full_backward_pre_hook)\s*\(")


def _hook_line(source: str) -> Optional[tuple[int, str]]:
    """(line, text) of the cell's first gradient-hook registration: a tensor's or a node's hook,
    or a module's backward hook."""
    for i, line in enumerate(source.splitlines(), 1):
        if _HOOK_CALL.search(line) and not line.lstrip().startswith("#"):
            return i, line.strip()
    return None


def _find_in(seen: Trace, leaf: Record) -> Optional[int]:
    if leaf.external:
        found = [r.id for r in seen.records if r.external and r.name == leaf.name]
    else:
        found = [r.id for r in seen.records if record_key(r) == record_key(leaf) and r.op == leaf.op]
    return found[-1] if found else None


def _cuts_graph(r: Record, custom: set[str]) -> bool:
    if r.internal and r.internal.split(".")[0] in custom:
        return False
    return r.op in ("detach", "detach_") or (not r.grad_enabled and not r.requires_grad)


def _first_opaque_ancestor(trace: Trace, rid: int) -> Optional[Record]:
    """The earliest tensor the record depends on that has history from before this cell."""
    for i in sorted(_ancestors(trace, rid)):
        r = trace.records[i]
        if r.external and r.grad_fn is not None:
            return r
    return None


def _ancestors(trace: Trace, rid: int) -> set[int]:
    seen, stack = set(), list(trace.records[rid].inputs)
    while stack:
        i = stack.pop()
        if i not in seen and 0 <= i < len(trace.records):
            seen.add(i)
            stack.extend(trace.records[i].inputs)
    return seen


def _descendants(trace: Trace, rid: int) -> set[int]:
    found = {rid}
    for r in trace.records[rid + 1:]:  # records are in execution order: inputs come first
        if any(i in found for i in r.inputs):
            found.add(r.id)
    return found
