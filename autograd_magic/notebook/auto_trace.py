"""`%autograd on`: trace every cell without writing the magic on each.

A teacher who wants the whole notebook traced turns it on once; each cell
that follows runs as if it began with `%%autograd --auto OPTIONS` (plain
cells are then traced and shown the same way). It is an input transformer,
IPython's own hook for rewriting a cell's text before it runs, so the cell's
history, its errors and `%%time`-style cell magics are untouched: a cell that
starts with a cell magic of its own is left alone.
"""

from __future__ import annotations

from typing import Any

_ON: dict[int, "_Transformer"] = {}  # id(shell) -> its transformer


class _Transformer:
    # run/execute.py leaves such transformers out when it transforms a traced cell's own text
    wraps_in_autograd = True

    def __init__(self, options: str) -> None:
        self.options = options

    def __call__(self, lines: list[str]) -> list[str]:
        first = next((line for line in lines if line.strip()), None)
        if first is None or first.lstrip().startswith(("%%", "%autograd", "?")) or first.rstrip().endswith("?"):
            return lines
        head = f"%%autograd --auto {self.options}".rstrip() + "\n"
        return [head] + lines


def turn_on(shell: Any, options: str = "") -> None:
    turn_off(shell)
    transformer = _ON[id(shell)] = _Transformer(options)
    shell.input_transformers_cleanup.append(transformer)


def turn_off(shell: Any) -> None:
    transformer = _ON.pop(id(shell), None)
    if transformer is not None and transformer in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.remove(transformer)


def is_on(shell: Any) -> bool:
    return id(shell) in _ON
