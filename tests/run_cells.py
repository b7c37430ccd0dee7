"""Running a test's cell as a user would: under `%%autograd -o t --quiet`, or plainly."""

from __future__ import annotations

import torch
from IPython.utils.capture import capture_output


def traced(shell, cell: str):
    """`cell` through the magic in `shell` (torch imported there first): the Trace it made."""
    shell.run_cell("import torch")
    with capture_output(display=True):
        result = shell.run_cell("%%autograd -o t --quiet\n" + cell)
    assert result.success, result.error_in_exec
    return shell.user_ns["t"]


def plain(cell: str) -> dict:
    """`cell` run by plain Python with torch: its namespace afterwards."""
    ns: dict = {"torch": torch}
    exec(cell, ns)
    return ns
