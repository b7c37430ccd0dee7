"""Record identity across runs: which record of a variant is which record of the real run.

`match_records` pairs each record of the original run with its counterpart
in a toggled variant (same source span, same run of it, same output);
`changed_fields` says which of a record's columns differ between the two.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .trace import Preview, Record, Trace

FIELDS = ("value", "requires_grad", "is_leaf", "grad_fn", "grad", "detached")


def _key(r: Record) -> Optional[tuple]:
    return (r.span, r.occurrence, r.output_index) if r.span is not None else None


def match_records(original: Trace, variant: Trace) -> dict[int, int]:
    """Original record id -> variant record id: by (span, occurrence, output_index), then by name."""
    by_key: dict[tuple, int] = {}
    for r in variant.records:
        k = _key(r)
        if k is not None:
            by_key.setdefault(k, r.id)
    matched: dict[int, int] = {}
    used: set[int] = set()
    for r in original.records:
        k = _key(r)
        if k is not None and k in by_key and by_key[k] not in used:
            matched[r.id] = by_key[k]
            used.add(by_key[k])
    by_name: dict[str, list[int]] = {}
    for r in variant.records:
        if r.id not in used and r.name:
            by_name.setdefault(r.name, []).append(r.id)
    for r in original.records:
        if r.id in matched or not r.name:
            continue
        candidates = by_name.get(r.name)
        if candidates:
            matched[r.id] = candidates.pop(0)
    return matched


def same_preview(a: Optional[Preview], b: Optional[Preview]) -> bool:
    """True when two previews show the same tensor contents (NaN equals NaN)."""
    if a is None or b is None:
        return a is b
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    if a.values is None or b.values is None:
        return a.values is None and b.values is None
    va, vb = np.asarray(a.values), np.asarray(b.values)
    if va.shape != vb.shape:
        return False
    try:
        return bool(np.array_equal(va, vb, equal_nan=True))
    except TypeError:  # bool/int arrays do not take equal_nan
        return bool(np.array_equal(va, vb))


def changed_fields(orig: Record, var: Record) -> set[str]:
    """Which of `FIELDS` differ between a record and its counterpart in a variant."""
    changed = set()
    if not same_preview(orig.preview, var.preview):
        changed.add("value")
    for name in ("requires_grad", "is_leaf", "grad_fn", "detached"):
        if getattr(orig, name) != getattr(var, name):
            changed.add(name)
    if not same_preview(orig.grad_preview, var.grad_preview):
        changed.add("grad")
    return changed
