"""Shell commands and magics run once: in the real run, never again in a variant or the check.

IPython turns `!cmd` into `get_ipython().system('cmd')`, `x = !cmd` into
`get_ipython().getoutput('cmd')`, `%name line` into
`get_ipython().run_line_magic('name', 'line')` and a cell magic into
`get_ipython().run_cell_magic(...)`: every one of them is a call on the shell
that `get_ipython` returns. A sandboxed re-run binds `get_ipython` in its own
namespace to a shell whose four entry points only note what was skipped;
everything else is the real shell. The cell's Python code does run again, so a
file it writes from Python is written again: the view says so.
"""

from __future__ import annotations

import ast
from typing import Any, Optional

ENTRY_POINTS = ("system", "getoutput", "run_line_magic", "run_cell_magic")


def describe(method: str, args: tuple) -> str:
    """The text the user wrote, as well as the call's arguments tell it."""
    text = [a for a in args if isinstance(a, str)]
    if method in ("system", "getoutput"):
        return "!" + (text[0] if text else "")
    if method == "run_line_magic":
        return ("%" + " ".join(text[:2])).rstrip()
    return ("%%" + " ".join(text[:2])).rstrip()


def shell_calls(shell: Any, source: Optional[str]) -> list[str]:
    """The shell commands and magics in a cell's text (after IPython's transform), in order."""
    if not source or shell is None:
        return []
    try:
        tree = ast.parse(shell.transform_cell(source))
    except Exception:
        return []
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if (
            node.func.attr in ENTRY_POINTS
            and isinstance(owner, ast.Call)
            and isinstance(owner.func, ast.Name)
            and owner.func.id == "get_ipython"
        ):
            args = tuple(a.value for a in node.args if isinstance(a, ast.Constant))
            found.append((node.lineno, node.col_offset, describe(node.func.attr, args)))
    return [text for _, _, text in sorted(found)]


class QuietShell:
    """The real shell, except that shell commands and magics are noted and skipped."""

    def __init__(self, shell: Any, skipped: list[str]):
        object.__setattr__(self, "_shell", shell)
        object.__setattr__(self, "_skipped", skipped)

    def _skip(self, method: str, args: tuple) -> None:
        text = describe(method, args)
        if text not in self._skipped:
            self._skipped.append(text)

    def system(self, *args, **kwargs):
        self._skip("system", args)

    def getoutput(self, *args, **kwargs):
        self._skip("getoutput", args)
        try:
            from IPython.utils.text import SList

            return SList()
        except Exception:
            return []

    def run_line_magic(self, *args, **kwargs):
        self._skip("run_line_magic", args)

    def run_cell_magic(self, *args, **kwargs):
        self._skip("run_cell_magic", args)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_shell"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_shell"), name, value)


def quiet_get_ipython(shell: Any, skipped: list[str]):
    """A `get_ipython` for a sandbox namespace: it returns the quiet shell."""
    quiet = QuietShell(shell, skipped)

    def get_ipython():
        return quiet

    return get_ipython
