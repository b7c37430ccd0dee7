"""The widget's costs: payload size for 10,000 ops, and the Python side of a toggle.

`widget_payload_10k_ops BYTES`: JSON size of the first payload (the first
screen, synced widget state) for a loop cell that ran 10,000 tensor ops, traced
with every op kept (`detail_limit` = 10,000, the worst case; the default limit
keeps 3 runs per expression); after `#`, the size of every row page the page can
ask for on top of it. Targets: first payload < 300 KB, all pages < 1 MB.
`toggle_<notebook>_<cell> SECONDS`: switching no_grad on for a seed cell —
the sandboxed re-run, the payload and the graph layout — best of 3
(the first toggle of the process also pays one-time imports: shown after #).
"""

from __future__ import annotations

import json
import time

from IPython.core.interactiveshell import InteractiveShell

from autograd_magic.run.execute import execute
from autograd_magic.variants.sandbox import take_snapshot
from autograd_magic.notebook.session import CellSession
from autograd_magic.notebook.widget import make_view
from autograd_magic.render.payload import build_rows

try:
    from . import cases
except ImportError:  # run as a script
    import cases

LOOP = "h = x\nfor i in range(5000):\n    h = h * 0.999 + 0.001\nh.sum().backward()"


def _shell() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext autograd_magic", store_history=False)
    return shell


def _view(shell, cell: str, detail_limit: int = 3, graph: bool = True):
    snapshot = take_snapshot(shell, cell)
    run = execute(shell, cell, first_line=2, display=False, capture=True, detail_limit=detail_limit)
    session = CellSession(shell, cell, run.trace, snapshot, detail_limit=detail_limit)
    return run.trace, make_view(session, graph=graph)


def payload_sizes(shell) -> None:
    for limit, label in ((10_000, "widget_payload_10k_ops"), (3, "widget_payload_10k_ops_default_limit")):
        shell.reset(new_session=False)
        shell.run_cell("import torch\nx = torch.randn(8, requires_grad=True)")
        trace, view = _view(shell, LOOP, detail_limit=limit, graph=False)
        size = len(json.dumps(view.payload).encode())
        pages, page = 0, view.payload
        while page.get("more_rows"):
            loaded = sum(len(g["rows"]) + sum(len(c["rows"]) for c in g["folded"]) for g in page["lines"]) + page.get("start", 0)
            page = build_rows(view.shown, None, loaded)
            pages += len(json.dumps(page).encode())
        print(f"{label} {size}  # {len(trace.records)} records kept; all row pages {size + pages} bytes")


def _seeds():
    return cases.seed_notebooks()


def toggle_times(shell) -> None:
    for nb, cells in _seeds().items():
        shell.reset(new_session=False)
        for i, cell in enumerate(cells):
            try:
                trace, view = _view(shell, cell)
            except Exception:  # cells that raise in the notebooks themselves
                continue
            if not trace.records or view.variant is not None:
                continue
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                view.no_grad = True
                times.append(time.perf_counter() - t0)
                view.no_grad = False
            print(f"toggle_{nb}_{i} {min(times):.4f}  # first {times[0]:.4f}")


def main() -> None:
    shell = _shell()
    payload_sizes(shell)
    toggle_times(shell)


if __name__ == "__main__":
    main()
