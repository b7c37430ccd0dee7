"""The gradient check's verdicts: plain data, kept on `Trace.gradcheck`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
