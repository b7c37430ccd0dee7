"""Graph drawing time: DOT generation + Graphviz layout, per case.

Cases: every seed notebook cell, a 6-layer TransformerEncoder (d_model=256)
forward+backward, an LSTMCell unrolled 50 steps, and a 200-step training
loop (Linear 32->64->1, batch 128, SGD); the big ones twice, with the
default detail limit and with every op kept (`--limit 100000`), which is
what folding exists for. Then `first-drawing` (a seed cell with the layout
worker not yet started: what the first graph of a session costs) and
`lstm50-unfolded` (every call and loop run unfolded, capped at 300 nodes).
Targets: each case drawn in 2 s or less, each seed cell in 0.3 s or less.
The SVG cache is cleared before each case.

    python -m bench.bench_layout      # prints `CASE layout SECONDS` per case
"""

from __future__ import annotations

import time
from typing import Iterator

try:
    from . import cases
except ImportError:  # run as a script
    import cases


TRANSFORMER = """\
torch.manual_seed(0)
enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=256, nhead=8, batch_first=True), num_layers=6)
src = torch.randn(4, 16, 256)"""
TRANSFORMER_RUN = """\
out = enc(src)
loss = out.pow(2).mean()
loss.backward()"""

LSTM = """\
torch.manual_seed(0)
cell = nn.LSTMCell(10, 20)
xs = torch.randn(50, 3, 10)
h0 = torch.zeros(3, 20)
c0 = torch.zeros(3, 20)"""
LSTM_RUN = """\
h, c = h0, c0
for t in range(50):
    h, c = cell(xs[t], (h, c))
loss = h.pow(2).sum()
loss.backward()"""

TRAIN = """\
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
X = torch.randn(128, 32)
Y = torch.randn(128, 1)"""
TRAIN_RUN = """\
for step in range(200):
    opt.zero_grad()
    loss = ((model(X) - Y) ** 2).mean()
    loss.backward()
    opt.step()"""

BIG = [("transformer", TRANSFORMER, TRANSFORMER_RUN), ("lstm50", LSTM, LSTM_RUN), ("train200", TRAIN, TRAIN_RUN)]


def _shell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext autograd_magic", store_history=False)
    return shell


def _traced(shell, cell: str, flags: str = ""):
    from IPython.utils.capture import capture_output

    shell.user_ns.pop("_bench_trace", None)
    with capture_output():  # the cells' own prints and the seed cell that raises
        shell.run_cell(f"%%autograd --quiet -o _bench_trace {flags}\n{cell}", store_history=False, silent=True)
    return shell.user_ns.get("_bench_trace")


def _seed_traces(shell) -> Iterator[tuple[str, object]]:
    for notebook, cells in cases.seed_notebooks().items():
        shell.reset(new_session=False)
        for i, cell in enumerate(cells):
            trace = _traced(shell, cell)
            if trace is not None and len(trace.records):
                yield f"seed-{notebook}-{i}", trace


def _big_traces(shell) -> Iterator[tuple[str, object]]:
    for name, setup, run in BIG:
        shell.reset(new_session=False)
        shell.run_cell("import torch\nimport torch.nn as nn\n" + setup, store_history=False, silent=True)
        for suffix, flags in (("", ""), ("-full", "--limit 100000")):
            trace = _traced(shell, run, flags)
            if trace is not None:
                yield name + suffix, trace


def draw_seconds(trace, timeout: float = 5.0, **options) -> tuple[float, bool]:
    """DOT + layout time with the SVG cache cleared, and whether an SVG came out."""
    from autograd_magic.render import layout as _layout
    from autograd_magic.render.dot import render_dot

    _layout._CACHE.clear()
    start = time.perf_counter()
    result = _layout.layout(render_dot(trace, **options), timeout=timeout)
    return time.perf_counter() - start, result.svg is not None


def _extra_cases(traces: dict) -> Iterator[tuple[str, object, dict]]:
    """The first drawing of a session (the layout worker starts), and the worst case we know."""
    from autograd_magic.render import layout as _layout

    first = next(iter(traces.values()))
    _layout._SERVER_PROCESS.close()
    yield "first-drawing", first, {}
    lstm = traces.get("lstm50-full")
    if lstm is not None:  # every call and loop run unfolded: the shape that ran dot for minutes
        yield "lstm50-unfolded", lstm, {"unfold": [r.id for r in lstm.records]}


def main() -> dict:
    shell = _shell()
    results: dict[str, float] = {}
    traces: dict[str, object] = {}

    def report(name: str, trace, options: dict) -> None:
        seconds, drawn = draw_seconds(trace, **options)
        results[name] = seconds
        print(f"{name} layout {seconds:.3f}")
        if not drawn:
            print(f"# {name}: no SVG, the DOT-text fallback would be shown")

    for found in (_seed_traces(shell), _big_traces(shell)):
        for name, trace in found:
            traces[name] = trace
            report(name, trace, {})
    for name, trace, options in _extra_cases(traces):
        report(name, trace, options)
    return results


if __name__ == "__main__":
    main()
