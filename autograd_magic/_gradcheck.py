"""The gradient check: every leaf's gradient against central finite differences.

The cell is re-run in a sandbox (copies of what it reads, the RNG states it
started from) in float64: once to read each leaf's analytic gradient from the
first backward pass, then twice per sampled element with that element nudged
by ±h. The function checked is the root of the first backward pass (a
scalar). The user's namespace, tensors, grads, RNG states and default dtype
are never touched. Work is bounded: a few elements per leaf, a few leaves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from ._execute import execute
from ._records import BackwardPass, Record, Trace

MAX_LEAVES = 10
MAX_ELEMENTS = 8
STEP = 1e-6  # central differences in float64: truncation ~h², rounding ~1e-16/h
ATOL = 1e-5
RTOL = 1e-3
TIME_BUDGET = 20.0  # seconds of nudged re-runs per cell; fewer elements are sampled for slow cells


@dataclass
class LeafCheck:
    """The verdict for one leaf: `ok` is None when it could not be checked (see `note`)."""

    record: int
    name: str
    max_abs_err: Optional[float] = None
    max_rel_err: Optional[float] = None
    elements_checked: int = 0
    ok: Optional[bool] = None
    note: str = ""
    # (flat index, analytic, numeric) for each element checked
    samples: list[tuple[int, float, float]] = field(default_factory=list)
    # flat indices where the function has a kink (one-sided slopes differ) and autograd's value lies between them
    kinks: list[int] = field(default_factory=list)


class _RunFailed(Exception):
    pass


def _key(r: Record) -> tuple:
    return (r.span, r.occurrence, r.output_index)


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
    checks = _skipped_leaves(trace, p, leaves)
    todo = [r for r in leaves if r.id not in checks]
    runner = _Runner(shell, source, trace, snapshot, first_line, p)
    started = time.perf_counter()
    try:
        runner.value, analytic = runner.run(None, todo)
    except _RunFailed as exc:
        checks.update({r.id: LeafCheck(r.id, r.label, note=f"the sandboxed re-run failed: {exc}") for r in todo})
        return checks
    for rid, why in runner.unavailable.items():
        checks[rid] = LeafCheck(rid, trace.records[rid].label, note=why)
    todo = [r for r in todo if r.id not in checks]
    # bounded work: as many nudged runs as the budget allows at the reference run's pace
    per_run = max(time.perf_counter() - started, 1e-4)
    per_leaf = max(1, min(max_elements, int(time_budget / per_run) // (2 * max(len(todo), 1))))
    deadline = time.perf_counter() + time_budget
    for r in todo:
        checks[r.id] = _check_leaf(runner, r, analytic.get(r.id), per_leaf, deadline, time_budget)
    return checks


def _skipped_leaves(trace: Trace, p: BackwardPass, leaves: list[Record]) -> dict[int, LeafCheck]:
    """Leaves a re-run of this cell alone cannot nudge faithfully, with why."""
    opaque = _opaque_ancestry(trace, p.roots[0])
    skipped = {}
    for r in leaves:
        if r.external and opaque:
            skipped[r.id] = LeafCheck(r.id, r.label, note=f"its path to the output goes through `{opaque}`, computed before this cell")
        elif not r.external and r.span is None:
            skipped[r.id] = LeafCheck(r.id, r.label, note="it was made where the tracer could not place it")
    return skipped


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
    if root.preview is None or root.preview.numel != 1:
        return f"`{root.label}` is not a scalar (backward was given a gradient): only scalar outputs are checked"
    return None


def _opaque_ancestry(trace: Trace, root_id: int) -> Optional[str]:
    """A tensor with history made before this cell that the root depends on, by label."""
    seen, stack = set(), [root_id]
    while stack:
        i = stack.pop()
        if i in seen or not 0 <= i < len(trace.records):
            continue
        seen.add(i)
        r = trace.records[i]
        if r.external and r.grad_fn is not None:
            return r.label
        stack.extend(r.inputs)
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
    try:
        for i in planned:
            if time.perf_counter() > deadline:
                break
            plus, _ = runner.run((r, i, STEP), [])
            minus, _ = runner.run((r, i, -STEP), [])
            ana = float(flat[i])
            check.samples.append((i, ana, (plus - minus) / (2 * STEP)))
            scale = max(scale, abs(plus), abs(minus))
            if _at_kink(ana, (f0 - minus) / STEP, (plus - f0) / STEP):
                check.kinks.append(i)
    except _RunFailed as exc:
        check.note = f"a perturbed re-run failed: {exc}"
        return check
    if not check.samples:
        check.note = f"not checked: the time budget ({budget:g} s) ran out"
        return check
    _score(check, scale)
    if check.ok and len(check.samples) < len(planned):
        check.note = f"{len(check.samples)} of {len(planned)} planned elements checked within the time budget ({budget:g} s)"
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


class _Runner:
    """Re-runs the cell in float64 in a sandbox, optionally with one leaf element nudged."""

    def __init__(self, shell, source: str, trace: Trace, snapshot, first_line: int, p: BackwardPass):
        self.shell, self.source, self.snapshot, self.first_line = shell, source, snapshot, first_line
        self.root = trace.records[p.roots[0]]
        self.unavailable: dict[int, str] = {}  # external leaves the sandbox cannot reach -> why
        self.value = 0.0  # the root's value in the reference re-run

    def run(self, nudge: Optional[tuple[Record, int, float]], capture: list[Record]) -> tuple[float, dict]:
        """(the root's value, {record id: gradient from the first backward pass} for `capture`)."""
        grads: dict[int, torch.Tensor] = {}
        state = {"handles": [], "root": None}
        dtype = torch.get_default_dtype()
        try:
            with _sandbox(self.shell, self.snapshot) as ns:
                torch.set_default_dtype(torch.float64)
                self.shared = _shared_ids(self.snapshot, self.shell.user_ns)
                _double_namespace(ns, self.shared, _names_used(self.snapshot, ns))
                self._prepare_external(ns, nudge, capture, grads, state)
                hook = self._output_hook(nudge, capture, grads, state)
                run = execute(
                    self.shell, self.source, first_line=self.first_line, namespace=ns, display=False,
                    capture=True, output_hook=hook, sandbox=True,
                )
                if run.error is not None:
                    raise _RunFailed(f"{type(run.error).__name__}: {run.error}")
                return self._root_value(state, run.trace), grads
        except _RunFailed:
            raise
        except Exception as exc:  # the sandbox could not be set up or restored
            raise _RunFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            torch.set_default_dtype(dtype)
            for h in state["handles"]:
                h.remove()

    def _prepare_external(self, ns: dict, nudge, capture: list[Record], grads: dict, state: dict) -> None:
        for r in capture:
            if r.external:
                try:
                    t = self._external(ns, r)
                except _RunFailed as exc:  # this leaf only: the others can still be checked
                    self.unavailable[r.id] = str(exc)
                    continue
                state["handles"].append(t.register_hook(_first_grad(grads, r.id)))
        if nudge is not None and nudge[0].external:
            _nudge(self._external(ns, nudge[0]), nudge[1], nudge[2])

    def _external(self, ns: dict, r: Record) -> torch.Tensor:
        from ._sandbox import _find_tensor

        t = _find_tensor(ns, r.name)
        if t is None or not t.is_leaf:
            raise _RunFailed(f"`{r.label}` cannot be found by name before the cell runs, so it cannot be nudged")
        if id(t) in self.shared:
            raise _RunFailed(f"`{r.label}` is shared with the real run and cannot be changed safely")
        return t

    def _output_hook(self, nudge, capture: list[Record], grads: dict, state: dict) -> Callable:
        wanted = {_key(r): r.id for r in capture if not r.external}
        target = _key(nudge[0]) if nudge is not None and not nudge[0].external else None
        root_key = _key(self.root)

        def hook(record: Record, t: torch.Tensor):
            out = _as_double(record, t)
            k = _key(record)
            if k == target:
                _nudge(out, nudge[1], nudge[2])
            if k in wanted and out.requires_grad:
                state["handles"].append(out.register_hook(_first_grad(grads, wanted[k])))
            if k == root_key:
                state["root"] = out
            return out if out is not t else None

        return hook

    def _root_value(self, state: dict, trace: Trace) -> float:
        t = state["root"]
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.detach().to(torch.float64).reshape(()))
        roots = trace.passes[0].roots if trace.passes else []
        rec = trace.records[roots[0]] if roots and roots[0] is not None else None
        if rec is None or rec.preview is None or not rec.preview.complete or rec.preview.numel != 1:
            raise _RunFailed("the re-run did not compute the differentiated value again")
        return float(np.asarray(rec.preview.values, dtype=np.float64).reshape(()))


def _first_grad(store: dict, rid: int):
    """A tensor hook keeping the first gradient (the first backward pass's)."""

    def hook(grad):
        if rid not in store:
            store[rid] = grad.detach().clone()

    return hook


def _nudge(t: torch.Tensor, flat_index: int, delta: float) -> None:
    idx = tuple(int(i) for i in np.unravel_index(flat_index, tuple(t.shape)))
    with torch.no_grad():
        t[idx] += delta


def _is_low_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64


def _as_double(record: Record, t: torch.Tensor) -> torch.Tensor:
    """The op's output in float64, keeping its graph (or its leafness and requires_grad)."""
    if not _is_low_float(t):
        return t
    if record.inplace:
        if t.is_leaf:
            t.data = t.data.to(torch.float64)  # same object: the cell keeps using it
        return t
    if t.grad_fn is not None:
        return t.to(torch.float64)
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def _names_used(snapshot, ns: dict) -> list[str]:
    """The names the cell reads (as the snapshot found them), else every name."""
    if snapshot is None or not hasattr(snapshot, "frozen"):
        return list(ns)
    names = set(snapshot.read) | set(snapshot.frozen) | set(getattr(snapshot, "live", ()))
    return [n for n in names if n in ns]


def _shared_ids(snapshot, user_ns: dict) -> set[int]:
    """Objects the sandbox shares with the real run: never cast or nudge these."""
    ids = {id(v) for v in user_ns.values()}
    ids |= set(getattr(snapshot, "shared", {}) or {})
    return ids


def _double_namespace(ns: dict, shared: set[int], names: list[str]) -> None:
    """Cast the sandbox's float tensors and modules to float64, never an object of the user's."""
    for name in names:
        value = ns[name]
        mine = id(value) not in shared
        if isinstance(value, torch.Tensor) and _is_low_float(value):
            if mine and value.is_leaf:
                value.grad = None  # a float32 .grad cannot take float64 gradients
                value.data = value.data.to(torch.float64)
            elif value.grad_fn is not None:
                ns[name] = value.to(torch.float64)  # shared non-leaf: a float64 view of its graph
            else:
                ns[name] = value.detach().to(torch.float64).requires_grad_(value.requires_grad)
        elif mine and isinstance(value, torch.nn.Module):
            tensors = list(value.parameters()) + list(value.buffers())
            if not any(id(t) in shared for t in tensors):  # .double() changes params in place
                value.zero_grad(set_to_none=True)
                value.double()


def _sandbox(shell, snapshot):
    from ._sandbox import Sandbox

    return Sandbox(shell, snapshot)
