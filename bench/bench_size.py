"""The snapshot's weight in the notebook file, and the time it takes to build.

Through the magic as users run it: an IPython shell, `%%autograd` cells, the
display_data each cell publishes captured. For each traced cell, the bytes of
its snapshot output (text/html + text/plain: what the notebook file keeps of
it; the widget's own output has an empty text/plain) against the goals of
issue 14: <= 150 KB per traced cell whatever the model, <= 20 KB every seed
cell. Cases: the Transformer (6 x TransformerEncoderLayer(256, 4, 512) on
randn(8, 32, 256), `.pow(2).mean().backward()`), an LSTMCell(16, 32) unrolled
50 steps, every cell of notebooks/seed_*.ipynb (median, max) and of the tour.

`snapshot_build_<case>`: the time `snapshot_html` took inside that cell (best of
3 runs of the cell), against the same cell run plainly (best of 3).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

try:
    from . import cases
except ImportError:  # run as a script
    import cases

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KB = 1000
GOAL_MODEL, GOAL_SEED = 150 * KB, 20 * KB

MODELS = cases.MODELS


def snapshot_bytes(outputs) -> int:
    """Bytes the notebook keeps of the snapshot outputs among `outputs` (html + plain text)."""
    total = 0
    for o in outputs:
        html = o.data.get("text/html", "")
        if "agm-snapshot" in html or "autograd-magic" in html:
            total += len(html.encode()) + len(o.data.get("text/plain", "").encode())
    return total


class _BuildClock:
    """Adds up the time spent in `snapshot_html` wherever the magic calls it (widget or static)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        from autograd_magic.notebook import widget
        from autograd_magic.render import snapshot

        self._saved = (widget.snapshot_html, snapshot.snapshot_html)
        real = snapshot.snapshot_html

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        widget.snapshot_html = snapshot.snapshot_html = timed
        return self

    def __exit__(self, *exc) -> None:
        from autograd_magic.notebook import widget
        from autograd_magic.render import snapshot

        widget.snapshot_html, snapshot.snapshot_html = self._saved


def _shell() -> InteractiveShell:
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext autograd_magic", store_history=False)
    return shell


def traced(shell, cell: str) -> tuple[int, float, float]:
    """(snapshot bytes, snapshot build seconds, the whole cell's seconds) of one `%%autograd` run
    (`cell` under a plain `%%autograd` line unless it brings its own, with its flags)."""
    code = cell if cell.startswith("%%autograd") else "%%autograd\n" + cell
    with capture_output(display=True) as cap, _BuildClock() as clock:
        t0 = time.perf_counter()
        shell.run_cell(code)
        wall = time.perf_counter() - t0
    return snapshot_bytes(cap.outputs), clock.seconds, wall


def plain(shell, cell: str) -> float:
    with capture_output(display=True):
        t0 = time.perf_counter()
        shell.run_cell(cell)
        return time.perf_counter() - t0


def notebook_cells(path: Path) -> list[tuple[str, bool]]:
    """(source, traced) of each code cell as the notebook has it (flags kept), `%load_ext` lines dropped."""
    cells = []
    for c in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if c["cell_type"] != "code":
            continue
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        src = "\n".join(line for line in src.splitlines() if not line.startswith("%load_ext"))
        if src.strip():
            cells.append((src, src.startswith("%%autograd")))
    return cells


def models(shell) -> None:
    for name, (setup, cell) in MODELS.items():
        runs = []
        for _ in range(3):
            shell.reset(new_session=False)
            plain(shell, setup)
            runs.append(traced(shell, cell))
        size = runs[0][0]
        build = min(r[1] for r in runs)
        wall = min(r[2] for r in runs)
        shell.reset(new_session=False)
        plain(shell, setup)
        base = min(plain(shell, cell) for _ in range(3))
        print(f"snapshot_bytes_{name} {size}  # goal <= {GOAL_MODEL}: {'ok' if size <= GOAL_MODEL else 'OVER'}")
        print(
            f"snapshot_build_{name} {build / base:.2f}  # x the plain cell: build {build * 1e3:.1f} ms,"
            f" plain cell {base * 1e3:.1f} ms, traced cell {wall * 1e3:.0f} ms"
        )


def notebooks(shell) -> None:
    for kind, paths in (("seed", sorted(NOTEBOOKS.glob("seed_*.ipynb"))), ("tour", [NOTEBOOKS / "tour.ipynb"])):
        sizes, builds = [], []
        for path in paths:
            if not path.exists():
                continue
            shell.reset(new_session=False)
            for i, (src, is_traced) in enumerate(notebook_cells(path)):
                if kind == "seed" or is_traced:
                    size, build, _ = traced(shell, src)
                    if size:
                        sizes.append((size, f"{path.stem}[{i}]"))
                        builds.append(build)
                else:
                    plain(shell, src)
        if not sizes:
            print(f"# {kind}: no notebooks")
            continue
        worst = max(sizes)
        goal = GOAL_SEED if kind == "seed" else GOAL_MODEL
        over = sum(1 for s, _ in sizes if s > goal)
        print(
            f"snapshot_bytes_{kind}_median {statistics.median(s for s, _ in sizes):.0f}"
            f"  # {len(sizes)} traced cells that publish a snapshot"
        )
        print(f"snapshot_bytes_{kind}_max {worst[0]}  # {worst[1]}; goal <= {goal} each: {over} over")
        print(f"snapshot_build_{kind}_max_ms {max(builds) * 1e3:.1f}  # median {statistics.median(builds) * 1e3:.1f} ms")


def main() -> None:
    shell = _shell()
    models(shell)
    notebooks(shell)


if __name__ == "__main__":
    main()
