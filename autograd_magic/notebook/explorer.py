"""The widget's explorer: the inputs a slider has moved, what the page may send, what changed.

`AutogradView` keeps one `Explorer` per traced cell. It asks the session for the real run's
exploration once (that re-runs the cell for the curve), holds the values the sliders set away
from the cell's own, checks every value the page sends (ids of the exploration's inputs only,
finite numbers within `limits.EXPLORE_VALUE_BOUND`), and builds the payload's `explore` part:
the real run's controls and drawn range with the shown run's point, tangent and Jacobian.
`moved` says which rows a re-run changed from the run shown before, for the page to flash.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..data.explore import Exploration, ScalarInput
from ..data.identity import changed_fields, match_records
from ..data.trace import Trace
from ..render.explore import at_point, explore_payload
from .. import limits


class Explorer:
    """The sliders' state for one view: the exploration, and the inputs moved from the cell's values."""

    def __init__(self, session: Any, trace: Trace) -> None:
        self._session = session
        self._trace = trace
        self._exploration: Optional[Exploration] = None
        self._asked = False
        self.values: dict[int, float] = {}  # record id -> value, only where it differs from the cell's

    @property
    def exploration(self) -> Optional[Exploration]:
        """The real run's, asked of the session once; kept on the real run's Trace so that the
        snapshot shows it too. A failure is said in its note, never raised."""
        if not self._asked:
            self._asked = True
            found = getattr(self._trace, "exploration", None)
            explore = getattr(self._session, "exploration", None)
            if found is None and callable(explore):
                try:
                    found = explore()
                except Exception as e:  # the table and the graph still show; the explorer says why not
                    found = Exploration(note=one_line(f"The explorer could not run: {type(e).__name__}: {e}"))
            if isinstance(found, Exploration):
                self._exploration = found
                if getattr(self._trace, "exploration", None) is None:
                    self._trace.exploration = found
        return self._exploration

    def payload(self, variant: Optional[Trace]) -> Optional[dict]:
        """The payload's `explore`: the controls at the values set, the shown run's curves and Jacobian."""
        real = self.exploration
        if real is None:
            return None
        shown = getattr(variant, "exploration", None) if variant is not None else real
        merged = at_point(real, shown if isinstance(shown, Exploration) else None, variant=variant is not None)
        out = explore_payload(merged, self.values)
        if out is not None and out["note"] and real.note in self._trace.notes:
            out["note"] = ""  # the view's own line above says it (why re-runs are off): once is enough
        return out

    def toggles(self) -> tuple[tuple[int, float], ...]:
        """`Toggles.values`: the moved inputs, in record order."""
        return tuple(sorted(self.values.items()))

    def moved_to(self, values: dict[int, float]) -> dict[int, float]:
        """The values in effect once `values` (already checked) are set: a slider back at the
        cell's own value is no longer moved."""
        controls = {i.record: i for i in self.exploration.inputs}
        merged = {**self.values, **values}
        return {rid: v for rid, v in merged.items() if not _same_value(v, controls[rid])}

    def check(self, values: Any) -> dict[int, float]:
        """Record id -> value from the page, each id one of the exploration's inputs, each value a
        finite number within EXPLORE_VALUE_BOUND, at most one per input; else ValueError."""
        exploration = self.exploration
        inputs = {i.record for i in exploration.inputs} if exploration is not None else set()
        if not inputs:
            raise ValueError("this cell has no input to set")
        if type(values) is not dict:
            raise ValueError("values must map input ids to numbers")
        if len(values) > len(inputs):
            raise ValueError(f"{len(values)} values for {len(inputs)} inputs")
        out = {}
        for key, value in values.items():
            rid = int(key) if type(key) is str and key.isdigit() and len(key) <= 16 else None
            if rid not in inputs:
                raise ValueError(f"{str(key)[:40]!r} is not one of the inputs")
            # the bound first: a thousand-digit int has no float to test for finiteness
            if type(value) not in (int, float) or abs(value) > limits.EXPLORE_VALUE_BOUND or not math.isfinite(value):
                raise ValueError(f"the value for input {rid} is not a finite number within ±{limits.EXPLORE_VALUE_BOUND:g}")
            out[rid] = float(value)
        return out


def _same_value(value: float, control: ScalarInput) -> bool:
    """A slider back at the cell's own value (to a millionth of its step: float steps don't land exactly)."""
    tolerance = 1e-6 * abs(control.step) if control.step else 1e-12 * max(1.0, abs(control.value))
    return abs(value - control.value) <= tolerance


def one_line(text: str, limit: int = limits.WIDGET_TEXT) -> str:
    """A message for `status`: its first line, cut to `limit` characters."""
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def moved(before: Trace, now: Trace) -> dict[int, list[str]]:
    """Record id in `now` -> the columns (value, grad) that differ from the same record in `before`."""
    out = {}
    for old, new in match_records(before, now).items():
        fields = changed_fields(before.records[old], now.records[new]) & {"value", "grad"}
        if fields:
            out[new] = sorted(fields)
    return out


def mark_moved(lines: list, changed: dict[int, list[str]]) -> None:
    """Flag the payload's rows that `changed` names (top-level rows and rows folded in calls)."""
    if not changed:
        return
    for group in lines:
        for row in [*group["rows"], *(r for call in group["folded"] for r in call["rows"])]:
            if row["id"] in changed:
                row["moved"] = changed[row["id"]]
