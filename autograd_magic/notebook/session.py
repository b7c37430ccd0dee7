"""One traced cell's controller: the shell, the source, the snapshot and the real run.

The magic builds a `CellSession` per traced cell and hands it to the view; the
view only draws and forwards clicks. Re-runs (`rerun`) and the gradient
check (`check`) go through here, so this is where the snapshot lives and dies:
one is taken only when a re-run is possible, and `close()` (the view replaced
or closed) releases it.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

from ..capture.earlier import EarlierCells
from ..data.trace import Trace
from ..run.execute import CellRun, execute
from ..variants.gradcheck import LeafCheck, gradcheck_cell
from ..variants.interventions import Toggles
from ..variants.sandbox import Snapshot, run_variant, take_snapshot
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

    @classmethod
    def run(
        cls, shell: Any, source: str, *, detail_limit: int = limits.DETAIL_LIMIT, rerunnable: bool = True, first_line: int = 2
    ) -> tuple["CellSession", CellRun]:
        """Run the cell for real (traced); with `rerunnable`, take the snapshot re-runs start from first.

        `first_line` is the editor line of the source's first line: 2 under a written
        `%%autograd` line, 1 when `%autograd on` traces the cell."""
        snapshot = _snapshot(shell, source) if rerunnable else None
        run = execute(shell, source, first_line=first_line, detail_limit=detail_limit, earlier=earlier_cells(shell))
        session = cls(shell, source, run.trace, snapshot, first_line=first_line, detail_limit=detail_limit)
        if session.rerun_blocked:
            session.close()
            run.trace.notes.append(session.rerun_blocked)
        return session, run

    @property
    def rerun_blocked(self) -> str:
        """Why variants and the check can't run at all, in one line ("" when they can)."""
        cells = sorted({r.cell for r in self.trace.records if r.cell is not None})
        if not cells:
            return ""
        where = ", ".join(f"[{c}]" for c in cells)
        return (
            f"Toggles and the gradient check are off for this cell: its graph was built by earlier cells ({where}), "
            "and a re-run of this cell alone would not build it again. Run forward and backward in one cell to explore variants."
        )

    @property
    def can_rerun(self) -> bool:
        return self.shell is not None and self._snapshot is not None and not self.rerun_blocked

    def rerun(self, toggles: Toggles) -> Optional[Trace]:
        """The cell re-run in a sandbox with `toggles`; None when no toggle is on (the real run is shown)."""
        if not toggles.any:
            return None
        if not self.can_rerun:
            raise RuntimeError(self.rerun_blocked or NO_RERUN)
        return run_variant(
            self.shell, self.source, self.trace, self._snapshot, toggles,
            detail_limit=self.detail_limit, first_line=self.first_line,
        )

    def check(self) -> list[LeafCheck]:
        """The gradient check of the real run's first backward pass, kept on its Trace."""
        if self.rerun_blocked:  # each leaf says why, as any leaf the check can't reach does
            reached = {rid for p in self.trace.passes[:1] for s in p.steps for rid in s.records}
            leaves = [r for r in self.trace.records if r.is_leaf and r.requires_grad and r.id in reached]
            self.trace.gradcheck = [LeafCheck(r.id, r.label, note=self.rerun_blocked) for r in leaves]
            return self.trace.gradcheck
        if not self.can_rerun:
            raise RuntimeError(NO_RERUN)
        self.trace.gradcheck = gradcheck_cell(self.shell, self.source, self.trace, self._snapshot, first_line=self.first_line)
        return self.trace.gradcheck

    def close(self) -> None:
        """Release the snapshot (its copies of the cell's inputs); re-runs are off from now on."""
        self._snapshot = None


_NOTEBOOKS: "weakref.WeakKeyDictionary[Any, EarlierCells]" = weakref.WeakKeyDictionary()


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


def _snapshot(shell: Any, source: str) -> Optional[Snapshot]:
    """What re-runs need: the cell's inputs and the RNG states before it runs."""
    try:
        return take_snapshot(shell, source)
    except Exception:  # never let the sandbox's bookkeeping stop the real cell
        return None
