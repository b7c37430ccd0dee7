"""Shift+Enter to the published output: traced-and-shown over plain, through the magic.

Each cell runs in an IPython shell as users run it (`%%autograd` through
`run_cell`). The shell's display publisher serialises what is published to
JSON, as a kernel does, and widgets get a comm that serialises their
messages (the comm_open carrying the widget's state, every update after it).
Printed per case, best of 3:

    CASE traced SECONDS plain SECONDS ratio R
    CASE breakdown trace=.. rerun_snapshot=.. view=.. html_snapshot=.. publish=..
    CASE widget_state BYTES html BYTES

`widget_state` is the JSON size of the view's synced traits after the cell
(what Lab saves in a notebook's widget state); the on-demand parts the page
asks for over the comm (steps, graph) are not in it.
Seed notebooks (notebooks/seed_*.ipynb) run top to bottom, each in a fresh
process (the first traced cell pays whatever a first cell pays), 3 times
traced and 3 times plain; per cell the best traced minus the best plain is
what the magic adds: `seed added median .. worst .. (first cell ..)`.

    python -m bench.bench_latency
    PYTHONPATH=/path/to/other/checkout python bench/bench_latency.py   # the same cases on another tree
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the child loads this file by path: the cases come from beside it
    sys.path.append(str(ROOT))
from bench import cases  # noqa: E402
NOTEBOOKS = sorted((ROOT / "notebooks").glob("seed_*.ipynb"))
MAGIC = "%%autograd\n"

CASES = [("transformer", cases.TRANSFORMER_SETUP, cases.TRANSFORMER), ("lstm50", cases.LSTM_SETUP, cases.LSTM)]


# ---- a shell that serialises what it publishes, as a kernel does ----------------------------


class Wire:
    """Bytes a kernel would send: display_data bundles and widget comm messages, as JSON."""

    def __init__(self) -> None:
        self.display_bytes = 0
        self.comm_bytes = 0
        self.seconds = 0.0

    def add_display(self, data, metadata) -> None:
        t0 = time.perf_counter()
        self.display_bytes += len(json.dumps({"data": data, "metadata": metadata or {}}).encode())
        self.seconds += time.perf_counter() - t0

    def add_comm(self, msg) -> None:
        t0 = time.perf_counter()
        self.comm_bytes += len(json.dumps(msg, default=str).encode())
        self.seconds += time.perf_counter() - t0


WIRE = Wire()


def make_shell():
    """The shell, a JSON-serialising display publisher, and comms that serialise their messages."""
    import comm
    from comm.base_comm import BaseComm
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class SerialisingComm(BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            WIRE.add_comm({"msg_type": msg_type, "data": data, "metadata": metadata or {}, **keys})

    class SerialisingPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            WIRE.add_display(data, metadata)

    comm.create_comm = lambda *a, **k: SerialisingComm(*a, **k)
    shell = InteractiveShell.instance()
    shell.display_pub = SerialisingPublisher(shell=shell)
    return shell


class Breakdown:
    """Time spent in the magic's stages, by wrapping the functions the magic calls (same code path)."""

    STAGES = ("trace", "rerun_snapshot", "view", "html_snapshot")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.views: list = []
        self.html_bytes = 0

    def install(self) -> None:
        import autograd_magic.notebook.display as display
        import autograd_magic.notebook.session as session
        import autograd_magic.notebook.widget as widget

        def timed(stage, fn, after=None):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    out = fn(*a, **k)
                finally:
                    self.seconds[stage] += time.perf_counter() - t0
                if after:
                    after(out)
                return out

            return wrapper

        session.execute = timed("trace", session.execute)
        session.take_snapshot = timed("rerun_snapshot", session.take_snapshot)
        display.make_view = timed("view", display.make_view, after=self.views.append)
        real_snapshot = widget.AutogradView.snapshot

        def snapshot(view):
            out = real_snapshot(view)
            self.html_bytes += len(out.html.encode())
            return out

        widget.AutogradView.snapshot = timed("html_snapshot", snapshot)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self.views.clear()
        self.html_bytes = 0


def widget_state_bytes(view) -> int:
    """JSON size of the view's synced state: what a notebook saves for this widget."""
    try:
        state, _paths, _buffers = view._split_state_buffers(view.get_state()) if hasattr(view, "_split_state_buffers") else (view.get_state(), [], [])
    except Exception:
        state = view.get_state()
    return len(json.dumps(state, default=str).encode())


def _run(shell, cell: str) -> float:
    from IPython.utils.capture import capture_output

    with capture_output():
        t0 = time.perf_counter()
        result = shell.run_cell(cell, store_history=False)
        seconds = time.perf_counter() - t0
    if result.error_in_exec is not None or result.error_before_exec is not None:
        raise RuntimeError(f"bench cell failed: {result.error_in_exec or result.error_before_exec}")
    return seconds


def big_cases(repeats: int = 3) -> dict:
    shell = make_shell()
    shell.run_cell("%load_ext autograd_magic", store_history=False)
    parts = Breakdown()
    parts.install()
    out = {}
    for name, setup, cell in CASES:
        shell.reset(new_session=False)
        shell.run_cell(setup, store_history=False)
        plain = min(_run(shell, cell) for _ in range(repeats))
        best, best_parts, state, html = None, None, 0, 0
        for _ in range(repeats):
            parts.reset()
            WIRE.seconds = 0.0
            seconds = _run(shell, MAGIC + cell)
            if best is None or seconds < best:
                best, best_parts = seconds, dict(parts.seconds, publish=WIRE.seconds)
                state = max((widget_state_bytes(v) for v in parts.views if hasattr(v, "get_state")), default=0)
                html = parts.html_bytes
            for v in parts.views:  # each re-run replaces its view, as a notebook cell does
                if hasattr(v, "close"):
                    v.close()
        out[name] = {"traced": best, "plain": plain, "ratio": best / plain, "parts": best_parts, "state": state, "html": html}
        print(f"{name} traced {best:.3f} plain {plain:.4f} ratio {best / plain:.1f}")
        print(f"{name} breakdown " + " ".join(f"{k}={v:.3f}" for k, v in best_parts.items()))
        print(f"{name} widget_state {state} html {html}")
    return out


# ---- seed notebooks, each in a fresh process --------------------------------------------------


def _cells(path: Path) -> list[str]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    cells = []
    for c in doc["cells"]:
        if c["cell_type"] == "code":
            src = c["source"]
            cells.append("".join(src) if isinstance(src, list) else src)
    return cells


_CHILD = r"""
import importlib.util, json, sys, time, warnings
# this file by its path: the package measured is whichever PYTHONPATH names (a baseline checkout too)
spec = importlib.util.spec_from_file_location("bench_latency", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
make_shell, widget_state_bytes, Breakdown = bench.make_shell, bench.widget_state_bytes, bench.Breakdown
from IPython.utils.capture import capture_output
# Both modes start with torch imported, untimed: %load_ext imports it (the package needs it), so
# without this the plain run's `import torch` cell would pay what the traced run paid at %load_ext.
import torch
# torch's first backward() with an explicit gradient imports sympy (~0.3 s, in plain torch too): paid
# here, untimed, or that one-time import swamps what the magic adds to seed_003's `z.backward(v)` cell
_w = torch.ones(2, requires_grad=True)
(_w * 2).backward(torch.ones(2))
del _w
cells, traced = json.loads(sys.stdin.read()), sys.argv[2] == "traced"
shell = make_shell()
# IPython's first traceback imports what it formats with (~0.1 s, in plain IPython too): paid here,
# untimed, or a seed's raising cell reads as faster traced than plain (%load_ext imports some of it)
with capture_output():
    shell.run_cell("raise ValueError('warm-up')", store_history=False)
parts = Breakdown()
times, states, raised = [], [], []
if traced:
    t0 = time.perf_counter()
    shell.run_cell("%load_ext autograd_magic", store_history=False)
    load_ext = time.perf_counter() - t0
    parts.install()
else:
    load_ext = 0.0
for cell in cells:
    if cell.strip().startswith("%load_ext"):
        times.append(None); states.append(0); raised.append(False); continue
    if not traced and cell.startswith("%%autograd\n"):
        cell = cell[len("%%autograd\n"):]
    parts.reset()
    with capture_output():
        t0 = time.perf_counter()
        ran = shell.run_cell(cell, store_history=True)
        times.append(time.perf_counter() - t0)
    raised.append(not ran.success)
    states.append(max((widget_state_bytes(v) for v in parts.views if hasattr(v, "get_state")), default=0))
print(json.dumps({"times": times, "states": states, "raised": raised, "load_ext": load_ext}))
"""


def _child(cells: list[str], mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).resolve()), mode], input=json.dumps(cells), capture_output=True, text=True, timeout=600
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def seed_cases(repeats: int = 3) -> dict:
    added, firsts, states, load_ext = [], [], [], []
    for path in NOTEBOOKS:
        cells = _cells(path)
        runs = {mode: [_child(cells, mode) for _ in range(repeats)] for mode in ("traced", "plain")}
        load_ext.append(min(r["load_ext"] for r in runs["traced"]))
        first = True
        for i, cell in enumerate(cells):
            if not cell.startswith(MAGIC):
                continue
            traced = min(r["times"][i] for r in runs["traced"])
            plain = min(r["times"][i] for r in runs["plain"])
            extra = (traced - plain) * 1000
            added.append(extra)
            states.append(max(r["states"][i] for r in runs["traced"]))
            if first:
                firsts.append(extra)
                first = False
        # "!": the cell raises (as it does plainly): most of its time is IPython rendering the traceback,
        # which differs traced and plain (more than the cell's own run), so it may read as negative
        print(f"{path.stem} added_ms " + " ".join(
            f"{(min(r['times'][i] for r in runs['traced']) - min(r['times'][i] for r in runs['plain'])) * 1000:.1f}"
            + ("!" if runs["plain"][0]["raised"][i] else "") for i, c in enumerate(cells) if c.startswith(MAGIC)))
    print(f"seed added_ms median {statistics.median(added):.1f} worst {max(added):.1f} first-cells worst {max(firsts):.1f}  # {len(added)} cells")
    print(f"seed widget_state max {max(states)}  load_ext_s {max(load_ext):.3f}")
    return {"median_ms": statistics.median(added), "worst_ms": max(added), "first_ms": max(firsts), "state": max(states)}


def main() -> dict:
    warnings.filterwarnings("ignore")
    import autograd_magic

    print(f"# autograd_magic from {Path(autograd_magic.__file__).parent}")
    results = {"big": big_cases()}
    if NOTEBOOKS:
        results["seeds"] = seed_cases()
    return results


if __name__ == "__main__":
    main()
