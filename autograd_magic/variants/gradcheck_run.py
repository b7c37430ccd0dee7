"""Re-running a cell for the gradient check: float64, in a sandbox, one element nudged.

The user's namespace, tensors, grads, RNG states and default dtype are never
touched: the run happens in `Sandbox` copies, float tensors there are cast to
float64 (never an object shared with the real run), and ops' outputs are cast
and nudged through interventions the recorder consults (`Float64`, `_Probe`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..capture.interventions import Intervention
from ..data.trace import BackwardPass, Record, Trace
from ..run.execute import execute
from .interventions import Float64, KeepGraphs, is_low_float, nudge_element, record_key
from .sandbox import Sandbox, find_tensor
from .. import limits


class _RunFailed(Exception):
    pass


ROOT = -1  # key of the root's own received gradient among captured grads


class _Runner:
    """Re-runs the cell in float64 in a sandbox, optionally with one leaf element nudged."""

    def __init__(self, shell, source: str, trace: Trace, snapshot, first_line: int, p: BackwardPass):
        self.shell, self.source, self.snapshot, self.first_line = shell, source, snapshot, first_line
        self.root = trace.records[p.roots[0]]
        self.unavailable: dict[int, str] = {}  # external leaves the sandbox cannot reach -> why
        self.value = 0.0  # the root's value in the reference re-run
        self.weights: Optional[torch.Tensor] = None  # the gradient a non-scalar root was given
        self._last_root: Optional[torch.Tensor] = None

    def run(
        self, nudge: Optional[tuple[Record, int, float]], capture: list[Record], detail_limit: int = limits.DETAIL_LIMIT
    ) -> tuple[float, dict, Trace]:
        """(the root's value, {record id: first backward pass's gradient} for `capture`, the re-run's trace)."""
        grads: dict[int, torch.Tensor] = {}
        state = {"handles": [], "root": None}
        dtype = torch.get_default_dtype()
        try:
            with _sandbox(self.shell, self.snapshot) as ns:
                torch.set_default_dtype(torch.float64)
                self.shared = _shared_ids(self.snapshot, self.shell.user_ns)
                _double_namespace(ns, self.shared, _names_used(self.snapshot, ns))
                self._prepare_external(ns, nudge, capture, grads, state)
                run = execute(
                    self.shell, self.source, first_line=self.first_line, namespace=ns, display=False,
                    capture=True, interventions=self._interventions(nudge, capture, grads, state),
                    detail_limit=detail_limit,
                )
                if run.error is not None:
                    raise _RunFailed(f"{type(run.error).__name__}: {run.error}")
                return self._root_value(state, run.trace), grads, run.trace
        except _RunFailed:
            raise
        except Exception as exc:  # the sandbox could not be set up or restored
            raise _RunFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            torch.set_default_dtype(dtype)
            for h in state["handles"]:
                h.remove()

    def set_weights(self, received: Optional[torch.Tensor], gradient_given: bool) -> None:
        """After the reference run: f = root · gradient when backward() was given one."""
        if gradient_given:
            if received is None:
                raise _RunFailed("the re-run did not pass the same gradient to backward()")
            self.weights = received.to(torch.float64)
            if self._last_root is None or self._last_root.shape != self.weights.shape:
                raise _RunFailed("the re-run's output and its gradient do not match")
            self.value = float((self._last_root * self.weights).sum())

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
            nudge_element(self._external(ns, nudge[0]), nudge[1], nudge[2])

    def _external(self, ns: dict, r: Record) -> torch.Tensor:
        t = find_tensor(ns, r.name)
        if t is None or not t.is_leaf:
            raise _RunFailed(f"`{r.label}` cannot be found by name before the cell runs, so it cannot be nudged")
        if id(t) in self.shared:
            raise _RunFailed(
                f"`{r.label}` is your real tensor here, not a copy (an earlier cell's result that this cell uses "
                "reaches it through its graph), and the check never changes your tensors. "
                "This says nothing about whether the gradient is right; to have it checked, compute everything "
                "from it to the loss in this cell"
            )
        return t

    def _interventions(self, nudge, capture: list[Record], grads: dict, state: dict) -> list[Intervention]:
        target = (record_key(nudge[0]), nudge[1], nudge[2]) if nudge is not None and not nudge[0].external else None
        return [KeepGraphs(), Float64(target), _Probe(self, capture, grads, state)]

    def _root_value(self, state: dict, trace: Trace) -> float:
        """The root's value; for a non-scalar root, its dot product with the gradient backward() got."""
        t = state["root"]
        roots = trace.passes[0].roots if trace.passes else []
        rec = trace.records[roots[0]] if roots and roots[0] is not None else None
        if rec is not None and rec.version_changed:
            # changed in place after backward(): the live tensor no longer holds the value
            # that was differentiated, so no finite difference of it can be trusted
            raise _RunFailed("the differentiated value was changed in place after backward()")
        if isinstance(t, torch.Tensor):
            self._last_root = t.detach().to(torch.float64)
            if self.weights is not None and t.shape == self.weights.shape:
                return float((self._last_root * self.weights).sum())
            if t.numel() == 1:
                return float(self._last_root.reshape(()))
            if self.weights is None:
                return float("nan")  # the reference run: weighed once the gradient is known
        roots = trace.passes[0].roots if trace.passes else []
        rec = trace.records[roots[0]] if roots and roots[0] is not None else None
        if rec is None or rec.preview is None or not rec.preview.complete or rec.preview.numel != 1:
            raise _RunFailed("the re-run did not compute the differentiated value again")
        return float(np.asarray(rec.preview.values, dtype=np.float64).reshape(()))


class _Probe(Intervention):
    """Reads the first backward pass's gradient of each checked record, and the root's value."""

    def __init__(self, runner: "_Runner", capture: list[Record], grads: dict, state: dict):
        self.runner, self.grads, self.state = runner, grads, state
        self.wanted = {record_key(r): r.id for r in capture if not r.external}
        self.root_key = record_key(runner.root)

    def replace_output(self, record: Record, out: torch.Tensor) -> None:
        k = record_key(record)
        if k in self.wanted and out.requires_grad:
            self.state["handles"].append(out.register_hook(_first_grad(self.grads, self.wanted[k])))
        if k == self.root_key:
            self.state["root"] = out
            if self.runner.weights is None and out.requires_grad:  # the gradient backward() was given
                self.state["handles"].append(out.register_hook(_first_grad(self.grads, ROOT)))
        return None


def _first_grad(store: dict, rid: int):
    """A tensor hook keeping the first gradient (the first backward pass's)."""

    def hook(grad):
        if rid not in store:
            store[rid] = grad.detach().clone()

    return hook


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
        if isinstance(value, torch.Tensor) and is_low_float(value):
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


def _sandbox(shell, snapshot) -> Sandbox:
    return Sandbox(shell, snapshot)
