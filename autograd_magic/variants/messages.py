"""What a re-run says about itself: a snapshot that could not keep the pre-run state, what it skipped.

Variants and the gradient check re-run the cell in a sandbox from a snapshot
(`snapshot.py`); these are the one-line messages the view shows when that
cannot be done faithfully within the notebook's budget (the toggles are then
off), and the notes saying what a re-run repeats and what it skips.
"""

from __future__ import annotations


RERUN_OFF = "Toggles and the gradient check are off for this cell: "


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MB" if nbytes >= 2**20 else f"{max(nbytes, 1) / 2**10:.0f} KB"


def snapshot_missing_line(missing: list[tuple[str, str, int]], budget: int) -> str:
    """One line: why no variant can start from the state before this run, and how to allow it.

    `missing` holds (what, kind, bytes): kind "values" / "gradients" (changed in place by the
    run, with no copy from before it: over the notebook's snapshot budget), "replaced" (a
    name bound to another object), "device:<device>" (tensors on a device, copied only on opt-in)."""
    devices = [(w, k.split(":", 1)[1], n) for w, k, n in missing if k.startswith("device:")]
    if devices:
        what, dev, _ = devices[0]
        total = sum(n for _, _, n in devices)
        return (
            RERUN_OFF + f"a re-run would copy `{what}`'s tensors on {dev} ({_mb(total)}), and tensors on a device "
            "are never copied unless you ask: `%%autograd --copy-device` allows it."
        )
    replaced = [w for w, k, _ in missing if k == "replaced"]
    if replaced:
        return (
            RERUN_OFF + f"this run bound `{replaced[0]}` to another object, and the one it started from was too "
            f"large to copy before it (one {_mb(budget)} snapshot budget for the notebook)."
        )
    what, kind, _ = max(missing, key=lambda m: m[2])
    total = sum(n for _, _, n in missing)
    whose = f"`{what}`'s {kind}" if not what.startswith("tensors ") else f"the {kind} of the {what}"
    return (
        RERUN_OFF + f"a re-run needs a {_mb(total)} copy of {whose} from before this run (it changed them in place), "
        f"over the {_mb(budget)} snapshot budget for the notebook; "
        "`%config AutogradMagics.snapshot_mb = N` raises it for the cells run after."
    )


def snapshot_released_line(budget: int) -> str:
    return (
        RERUN_OFF + f"its snapshot was released to make room for newer cells' (one {_mb(budget)} budget for the "
        "notebook); run the cell again to explore variants."
    )


RERUN_REPEATS_CODE = "Toggles and the gradient check re-run this cell's Python code (a file it writes is written again)"


def skipped_line(skipped: list[str], variant: bool) -> str:
    """What a re-run does not do again: the cell's shell commands and magics."""
    shown = ", ".join(f"`{s}`" for s in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    if variant:
        said = "This variant re-ran the cell's Python code in a sandbox (a file it writes is written again)"
        return f"{said}; it skipped {shown}." if skipped else f"{said}; shell commands and magics never run again."
    return f"{RERUN_REPEATS_CODE}, but never its shell commands and magics: {shown} ran once, in the real run."
