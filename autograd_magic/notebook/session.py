"""One traced cell's controller: the shell, the source, the snapshot and the real run.

The magic builds a `CellSession` per traced cell and hands it to the view; the
view only draws and forwards clicks. Re-runs (`rerun`) and the gradient
check (`check`) go through here, so this is where the snapshot lives and dies:
one is taken only when a re-run is possible, within one budget for the whole
notebook (`SnapshotBudget`, one per shell: a new snapshot makes room by
releasing the least recently used ones), and released when its view is
replaced (the same notebook cell run again, known by its cell id) or closed.
What did not fit is recorded by version counter; when the real run changed it
in place, or it lives on a device and copying there was not allowed, the view
says so in one line and the toggles are off (`rerun_blocked`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Optional

from ..capture.earlier import EarlierCells
from ..data.trace import Trace
from ..variants.messages import skipped_line, snapshot_missing_line, snapshot_released_line
from ..run.execute import CellRun, cell_number, execute
from ..data.explore import Exploration, ScalarInput
from ..variants import explore as explorer
from ..variants.gradcheck import LeafCheck, gradcheck_cell
from ..variants.interventions import Toggles
from ..variants.sandbox import Snapshot, run_variant, take_snapshot
from ..variants.side_effects import shell_calls
from ..variants.snapshot import Allowance
from .. import limits

NO_RERUN = "this view has no kernel state to re-run the cell with"


class CellSession:
    """A traced cell and everything needed to run it again differently."""

    def __init__(
        self,
        shell: Any,
        source: str,
        trace: Trace,
        snapshot: Optional[Snapshot],
        *,
        first_line: int = 2,
        detail_limit: int = limits.DETAIL_LIMIT,
    ) -> None:
        self.shell = shell
        self.source = source
        self.trace = trace  # the real run: the user's namespace reflects this one
        self.first_line = first_line
        self.detail_limit = detail_limit
        self._snapshot = snapshot
        self._blocked = ""  # why no re-run can start from the pre-run state any more
        self._budget: Optional["SnapshotBudget"] = None
        self._on_replaced: list = []  # callbacks for when the same notebook cell runs again
        self._exploration: Optional[Exploration] = None
        self._curves: dict = {}  # the explorer's curves, by toggles and the other inputs' values

    @classmethod
    def run(
        cls, shell: Any, source: str, *, detail_limit: int = limits.DETAIL_LIMIT, rerunnable: bool = True,
        first_line: int = 2, copy_device: bool = False, snapshot_bytes: Optional[int] = None,
    ) -> tuple["CellSession", CellRun]:
        """Run the cell for real (traced); with `rerunnable`, take the snapshot re-runs start from first.

        `first_line` is the editor line of the source's first line: 2 under a written
        `%%autograd` line, 1 when `%autograd on` traces the cell. The snapshot takes what the
        notebook's budget (`snapshot_bytes`, one for every cell) grants; tensors on a device are
        copied only with `copy_device`."""
        budget = snapshot_budget(shell, snapshot_bytes)
        cell_id = current_cell_id(shell)
        if budget is not None:
            budget.replace(cell_id)  # this cell's previous view is replaced: its snapshot goes first
        snapshot = None
        if rerunnable:
            allowance = budget.allowance() if budget is not None else None
            snapshot = _snapshot(shell, source, allowance, copy_device)
        run = execute(shell, source, first_line=first_line, detail_limit=detail_limit, earlier=earlier_cells(shell))
        session = cls(shell, source, run.trace, snapshot, first_line=first_line, detail_limit=detail_limit)
        register_cell(shell, cell_number(shell), session)
        if budget is not None and snapshot is not None:
            budget.admit(session, cell_id)
        elif budget is not None:
            budget.track(session, cell_id)
        if session.rerun_blocked:
            session.close()
            run.trace.notes.append(session.rerun_blocked)
        elif snapshot is not None:
            calls = shell_calls(shell, source)
            if calls:
                run.trace.notes.append(skipped_line(calls, variant=False))
        return session, run

    @property
    def snapshot_nbytes(self) -> int:
        """Bytes this cell's snapshot holds (0 once released)."""
        return self._snapshot.nbytes if self._snapshot is not None else 0

    @property
    def rerun_blocked(self) -> str:
        """Why variants and the check can't run at all, in one line ("" when they can)."""
        cells = sorted({r.cell for r in self.trace.records if r.cell is not None})
        if cells:
            where = ", ".join(f"[{c}]" for c in cells)
            return (
                f"Toggles and the gradient check are off for this cell: its graph was built by earlier cells ({where}), "
                "and a re-run of this cell alone would not build it again. Run forward and backward in one cell to explore variants."
            )
        if not self._blocked and self._snapshot is not None and self.shell is not None:
            try:
                missing = self._snapshot.missing(self.shell.user_ns)
            except Exception:  # bookkeeping must not break the view
                missing = []
            if missing:  # changed in place since, with no copy from before: it never comes back
                self._blocked = snapshot_missing_line(missing, self._snapshot.budget)
                self.close()
        return self._blocked

    @property
    def can_rerun(self) -> bool:
        return self.shell is not None and self._snapshot is not None and not self.rerun_blocked

    def rerun(self, toggles: Toggles) -> Optional[Trace]:
        """The cell re-run in a sandbox with `toggles`; None when no toggle is on (the real run is shown)."""
        if not toggles.any:
            return None
        if not self.can_rerun:
            raise RuntimeError(self.rerun_blocked or NO_RERUN)
        self._touch()
        probe = self._measure(toggles)
        variant = run_variant(
            self.shell, self.source, self.trace, self._snapshot, toggles,
            detail_limit=self.detail_limit, first_line=self.first_line, probe=probe,
        )
        if toggles.values:
            variant.exploration = self._explore(toggles, getattr(probe, "at", None), variant)
        return variant

    # ---- the explorer ----
    def inputs(self) -> list[ScalarInput]:
        """The cell's scalar inputs (a scan of the real run's records: no re-run)."""
        try:
            return explorer.scalar_inputs(self.trace)
        except Exception:  # bookkeeping never breaks the view
            return []

    def exploration(self) -> Exploration:
        """What the explorer shows for the real run (computed once, kept on `self.trace.exploration`)."""
        if self._exploration is None:
            self._exploration = self._explore(Toggles(), None, None)
            self.trace.exploration = self._exploration
        return self._exploration

    def _measure(self, toggles: Toggles):
        """The probe that measures the output and its slopes on a re-run's own graph (when inputs are set)."""
        if not toggles.values:
            return None
        try:
            out = explorer.explored_output(self.trace)
            inputs = explorer.scalar_inputs(self.trace, out) if out is not None else []
            return explorer.measure_at(out, inputs, self.trace) if inputs else None
        except Exception:
            return None

    def _explore(self, toggles: Toggles, at, variant: Optional[Trace]) -> Exploration:
        try:
            ex = self._explore_unsafe(toggles, at)
        except Exception as exc:  # the explorer never breaks the cell or the view
            ex = Exploration(note=f"the explorer failed: {type(exc).__name__}: {exc}"[: limits.WIDGET_TEXT])
        if variant is not None and variant.error is not None and not ex.note:
            ex.note = f"the re-run raised {variant.error.type}: {variant.error.message}"[: limits.WIDGET_TEXT]
        return ex

    def _explore_unsafe(self, toggles: Toggles, at) -> Exploration:
        blocked = self.rerun_blocked
        if blocked:
            ex = explorer.explore(explorer.Runs(None, self.source, self.trace, None), blocked=blocked)
            jac = self._earlier_jacobian()
            if jac is not None:
                ex.jacobian = jac
                ex.output, ex.output_label = jac.output, jac.output_label
                ex.note = ex.note or blocked
            return ex
        if not self.can_rerun:
            ex = explorer.explore(explorer.Runs(None, self.source, self.trace, None), blocked=NO_RERUN)
            return ex
        self._touch()
        base = Toggles(no_grad=toggles.no_grad, detach_ids=toggles.detach_ids, flip_ids=toggles.flip_ids,
                       detach_names=toggles.detach_names)
        runs = explorer.Runs(self.shell, self.source, self.trace, self._snapshot, self.first_line, base)
        return explorer.explore(runs, values=dict(toggles.values), at=at, cache=self._curves.setdefault(base, {}))

    def _earlier_jacobian(self):
        """backward(v) here of a graph an earlier traced cell built: its Jacobian, by re-running that cell."""
        p = self.trace.passes[0] if self.trace.passes else None
        rid = p.roots[0] if p is not None and p.roots else None
        if rid is None:
            return None
        root = self.trace.records[rid]
        if root.cell is None or not p.gradient_given:  # backward() of a scalar: its Jacobian is the gradient shown
            return None
        earlier = cell_session(self.shell, root.cell)
        if earlier is None or not earlier.can_rerun:
            why = earlier.rerun_blocked if earlier is not None and earlier.rerun_blocked else "it is not traced or its snapshot is gone"
            from ..data.explore import Jacobian

            return Jacobian(output=root.id, output_label=root.label, input=-1, input_label="",
                            note=f"no Jacobian: {root.label} was built by cell [{root.cell}], which cannot be re-run ({why})"[: limits.WIDGET_TEXT])
        return explorer.earlier_jacobian(earlier, self.trace, root)

    def check(self) -> list[LeafCheck]:
        """The gradient check of the real run's first backward pass, kept on its Trace."""
        if self.rerun_blocked:  # each leaf says why, as any leaf the check can't reach does
            reached = {rid for p in self.trace.passes[:1] for s in p.steps for rid in s.records}
            leaves = [r for r in self.trace.records if r.is_leaf and r.requires_grad and r.id in reached]
            self.trace.gradcheck = [LeafCheck(r.id, r.label, note=self.rerun_blocked) for r in leaves]
            return self.trace.gradcheck
        if not self.can_rerun:
            raise RuntimeError(NO_RERUN)
        self._touch()
        self.trace.gradcheck = gradcheck_cell(self.shell, self.source, self.trace, self._snapshot, first_line=self.first_line)
        return self.trace.gradcheck

    def close(self) -> None:
        """Release the snapshot (its copies of the cell's inputs); re-runs are off from now on."""
        self._snapshot = None
        if self._budget is not None:
            self._budget.forget(self)

    def on_replaced(self, callback) -> None:
        """Call `callback()` when the same notebook cell runs again (its output, this view, is replaced)."""
        self._on_replaced.append(callback)

    def replaced(self) -> None:
        """The cell ran again: the snapshot goes, and whatever showed this session (its view) closes."""
        self.close()
        callbacks, self._on_replaced = self._on_replaced, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a view that can't close must not stop the new run
                pass

    def release(self, why: str) -> None:
        """The notebook's budget took this snapshot back (for newer cells): re-runs are off, said in `why`."""
        if self._snapshot is not None and not self._blocked:
            self._blocked = why
        self.close()

    def _touch(self) -> None:
        if self._budget is not None:
            self._budget.touch(self)


class SnapshotBudget:
    """One budget for the snapshots of every traced cell of a notebook (one per shell).

    A new snapshot that does not fit releases the least recently used ones (the
    oldest cells first, a re-run or check counts as a use); what still does not fit
    is not copied (`Allowance.reserve` says no). A cell run again (same cell id)
    releases its previous snapshot before it takes a new one.
    """

    def __init__(self, budget: int = limits.NOTEBOOK_SNAPSHOT_BYTES) -> None:
        self.budget = budget
        self._held: "OrderedDict[int, tuple[weakref.ref, int]]" = OrderedDict()  # oldest use first
        self._by_cell: dict[str, weakref.ref] = {}
        self.used = 0

    def allowance(self) -> "_Grant":
        return _Grant(self)

    def admit(self, session: CellSession, cell_id: Optional[str] = None) -> None:
        nbytes = session.snapshot_nbytes
        key = id(session)
        self._held[key] = (weakref.ref(session, lambda _ref, key=key: self._drop(key)), nbytes)
        self.used += nbytes
        session._budget = self
        self.track(session, cell_id)

    def track(self, session: CellSession, cell_id: Optional[str]) -> None:
        """Remember which notebook cell `session` shows, so that the cell's next run replaces it."""
        if cell_id:
            self._by_cell[cell_id] = weakref.ref(session)

    def replace(self, cell_id: Optional[str]) -> None:
        """The cell `cell_id` runs again: its previous view's snapshot is released."""
        if not cell_id:
            return
        ref = self._by_cell.pop(cell_id, None)
        old = ref() if ref is not None else None
        if old is not None:
            old.replaced()

    def touch(self, session: CellSession) -> None:
        if id(session) in self._held:
            self._held.move_to_end(id(session))

    def forget(self, session: CellSession) -> None:
        self._drop(id(session))

    def _drop(self, key: int) -> None:
        entry = self._held.pop(key, None)
        if entry is not None:
            self.used -= entry[1]

    def make_room(self, nbytes: int, reserved: int) -> bool:
        """Release the least recently used snapshots until `nbytes` more (beyond `reserved`) fit."""
        if reserved + nbytes > self.budget:
            return False
        while self.used + reserved + nbytes > self.budget and self._held:
            key, (ref, _) = next(iter(self._held.items()))
            session = ref()
            if session is None:
                self._drop(key)
            else:
                session.release(snapshot_released_line(self.budget))
                self._drop(key)  # if release did not already
        return self.used + reserved + nbytes <= self.budget

    def sessions(self) -> list[CellSession]:
        """The sessions holding a snapshot now, least recently used first."""
        return [s for s in (ref() for ref, _ in self._held.values()) if s is not None]


class _Grant(Allowance):
    """What one new snapshot may take from the notebook's budget, making room as it goes."""

    def __init__(self, owner: SnapshotBudget) -> None:
        super().__init__(owner.budget)
        self.owner = owner
        self.taken = 0

    def reserve(self, nbytes: int) -> bool:
        if nbytes <= 0:
            return True
        if not self.owner.make_room(nbytes, self.taken):
            return False
        self.taken += nbytes
        self.left = self.owner.budget - self.owner.used - self.taken
        return True


_NOTEBOOKS: "weakref.WeakKeyDictionary[Any, EarlierCells]" = weakref.WeakKeyDictionary()
_CELLS: "weakref.WeakKeyDictionary[Any, dict[int, weakref.ref]]" = weakref.WeakKeyDictionary()


def register_cell(shell: Any, number: Any, session: CellSession) -> None:
    """Remember the session of the traced cell with execution count `number` (weakly): a later
    cell's backward(v) through its graph re-runs it there for the Jacobian."""
    if shell is None or not isinstance(number, int):
        return
    try:
        cells = _CELLS.setdefault(shell, {})
    except TypeError:
        return
    cells[number] = weakref.ref(session)
    for n in [n for n, ref in cells.items() if ref() is None]:
        del cells[n]


def cell_session(shell: Any, number: int) -> Optional[CellSession]:
    """The session of the traced cell `number` (its execution count), while it is alive."""
    try:
        ref = _CELLS.get(shell, {}).get(number)
    except TypeError:
        return None
    return ref() if ref is not None else None
_BUDGETS: "weakref.WeakKeyDictionary[Any, SnapshotBudget]" = weakref.WeakKeyDictionary()


def earlier_cells(shell: Any) -> Optional[EarlierCells]:
    """The records of this kernel's earlier traced cells (one store per shell)."""
    if shell is None:
        return None
    try:
        store = _NOTEBOOKS.get(shell)
        if store is None:
            store = _NOTEBOOKS[shell] = EarlierCells()
        return store
    except TypeError:  # a shell that can't be weakly referenced: no notebook-wide graph
        return None


def snapshot_budget(shell: Any, nbytes: Optional[int] = None) -> Optional[SnapshotBudget]:
    """This kernel's one snapshot budget (`nbytes`, when given, is its size from now on)."""
    if shell is None:
        return None
    try:
        budget = _BUDGETS.get(shell)
        if budget is None:
            budget = _BUDGETS[shell] = SnapshotBudget()
    except TypeError:
        return None
    if nbytes is not None:
        budget.budget = nbytes
    return budget


def current_cell_id(shell: Any) -> Optional[str]:
    """The notebook cell running now, as the front end names it (None outside a notebook).

    IPython passes the cell id to `run_cell` (`ExecutionInfo.cell_id`, filled by
    ipykernel from the request's `metadata.cellId`); an older kernel leaves it on the
    parent message's metadata only."""
    result = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    cell_id = getattr(getattr(result, "info", None), "cell_id", None)
    if not cell_id:
        header = getattr(shell, "parent_header", None)
        meta = header.get("metadata") if isinstance(header, dict) else None
        cell_id = meta.get("cellId") if isinstance(meta, dict) else None
    return str(cell_id) if cell_id else None


def _snapshot(shell: Any, source: str, allowance: Optional[Allowance] = None, copy_device: bool = False) -> Optional[Snapshot]:
    """What re-runs need: the cell's inputs and the RNG states before it runs."""
    try:
        return take_snapshot(shell, source, allowance=allowance, copy_device=copy_device)
    except Exception:  # never let the sandbox's bookkeeping stop the real cell
        return None
