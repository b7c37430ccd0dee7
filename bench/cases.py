"""The issue's big cells, one definition for every benchmark that runs them.

A 6-layer TransformerEncoder(256, 4, 512) on randn(8, 32, 256) with
`.pow(2).mean().backward()`, and an LSTMCell(16, 32) unrolled 50 steps with
`h.sum().backward()`: each a setup cell run plainly, then the measured cell.
And the seed notebooks' cells, read from the repository's own notebooks.
"""

import json
from pathlib import Path

SEED_NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("seed_*.ipynb"))


def seed_notebooks() -> dict:
    """{"000": [cell, ...], ...}: each seed notebook's code cells as users run them, from
    notebooks/seed_*.ipynb, the `%load_ext` cell dropped and each cell's `%%autograd` line
    stripped (a benchmark runs a cell plainly or under the magic itself)."""
    notebooks = {}
    for path in SEED_NOTEBOOKS:
        cells = []
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            if src.strip() == "%load_ext autograd_magic":
                continue
            cells.append(src[len("%%autograd\n"):] if src.startswith("%%autograd\n") else src)
        notebooks[path.stem.removeprefix("seed_")] = cells
    if not notebooks:
        raise FileNotFoundError("no notebooks/seed_*.ipynb in the repository")
    return notebooks


TRANSFORMER_SETUP = """\
import torch, warnings
warnings.filterwarnings("ignore")  # TransformerEncoder's note on nested tensors, once per process
torch.manual_seed(0)
m = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 4, 512, batch_first=True), 6)
inp = torch.randn(8, 32, 256)"""
TRANSFORMER = "m(inp).pow(2).mean().backward()"
# the same with the loss named, as the memory and size cells have it (the snapshot shows `loss`)
TRANSFORMER_NAMED = "loss = m(inp).pow(2).mean()\nloss.backward()"

LSTM_SETUP = """\
import torch
torch.manual_seed(0)
cell = torch.nn.LSTMCell(16, 32)
xs = torch.randn(50, 4, 16)"""
LSTM = """\
h = torch.zeros(4, 32)
c = torch.zeros(4, 32)
for t in range(50):
    h, c = cell(xs[t], (h, c))
h.sum().backward()"""

#: name -> (setup, cell), for the snapshot-size benchmark
MODELS = {"transformer": (TRANSFORMER_SETUP, TRANSFORMER_NAMED), "lstm": (LSTM_SETUP, LSTM)}
