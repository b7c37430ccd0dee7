"""The explorer's costs on the seed polynomial, through the magic as users run it (issue 15).

`explore_cell_<case> MS`: what the explorer adds to the `%%autograd` cell (its curve and
point, computed when the cell ends so that the saved snapshot keeps them): the traced cell
with the explorer against the same traced cell with it switched off, medians of 15, each
after a plain run of the cell measured in the same loop (after `#`).
`slider_step_<case> MS`: the Python side of one slider step — the page's `explore` message
handled by the widget: the sandboxed re-run at the new value, the point and slope on its own
graph, the payload — median of 20 steps alternating between two grid values, with the plain
cell's time and the ratio after `#`. The browser's figure (slider input event to the view
drawn, ≤ 150 ms the goal) is printed by tests/test_browser_explore.py.
"""

from __future__ import annotations

import statistics
import time

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from autograd_magic.data.explore import Exploration
from autograd_magic.notebook.session import CellSession

X = "import torch\nx = torch.tensor(2.0, requires_grad=True)"
POLY = "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\nprint(y)"
ONE_CELL = "x = torch.tensor(2.0, requires_grad=True)\ny = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()\nprint(x.grad)"
CASES = [("seed_polynomial", X, POLY), ("one_cell_backward", "import torch", ONE_CELL)]


def _shell() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext autograd_magic", store_history=False)
    return shell


def _timed(shell, cell: str) -> float:
    with capture_output(display=True):
        t = time.perf_counter()
        result = shell.run_cell(cell, store_history=False)
        dt = time.perf_counter() - t
    assert result.success, result.error_in_exec
    return dt


def _last_view(made: list):
    """The widget the magic displayed for the session made last (it registered its close)."""
    session = made[-1]
    for callback in session._on_replaced:
        view = getattr(callback, "__self__", None)
        if view is not None and hasattr(view, "_on_explore"):
            return view
    raise RuntimeError("no widget for the traced cell")


def main(repeats: int = 15, steps: int = 20) -> None:
    shell = _shell()
    made: list = []
    original = CellSession.run.__func__

    def spy(cls, *args, **kwargs):
        out = original(cls, *args, **kwargs)
        made.append(out[0])
        return out

    CellSession.run = classmethod(spy)
    real_exploration = CellSession.exploration
    try:
        for name, setup, cell in CASES:
            shell.run_cell(setup, store_history=False)
            _timed(shell, "%%autograd\n" + cell)  # one-time imports and the worker's start are not the explorer's
            plain, with_, without = [], [], []
            for _ in range(repeats):
                shell.run_cell(setup, store_history=False)
                plain.append(_timed(shell, cell))
                shell.run_cell(setup, store_history=False)
                with_.append(_timed(shell, "%%autograd\n" + cell))
                shell.run_cell(setup, store_history=False)
                CellSession.exploration = lambda self: Exploration()  # the explorer off
                try:
                    without.append(_timed(shell, "%%autograd\n" + cell))
                finally:
                    CellSession.exploration = real_exploration
            p, w, o = (statistics.median(v) * 1e3 for v in (plain, with_, without))
            print(f"explore_cell_{name} {w - o:.1f}  # ms added; traced cell {w:.1f} ms with the explorer, "
                  f"{o:.1f} ms without, plain {p:.2f} ms")

            shell.run_cell(setup, store_history=False)
            _timed(shell, "%%autograd\n" + cell)
            view = _last_view(made)
            x_id = view.payload["explore"]["inputs"][0]["record"]
            view.send = lambda content, buffers=None: None
            times = []
            for i in range(steps):
                value = 1.0 if i % 2 == 0 else 2.5
                t = time.perf_counter()
                view._on_explore({"type": "explore", "values": {str(x_id): value}, "seq": i + 1})
                times.append(time.perf_counter() - t)
            assert view.status == "", view.status
            step = statistics.median(times) * 1e3
            print(f"slider_step_{name} {step:.1f}  # ms, median of {steps}; plain cell {p:.2f} ms "
                  f"({step / p:.0f}x); worst {max(times) * 1e3:.1f} ms")
    finally:
        CellSession.run = classmethod(original)
        CellSession.exploration = real_exploration


if __name__ == "__main__":
    main()
