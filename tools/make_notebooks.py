"""Write notebooks/seed_*.ipynb from the seed cells, and notebooks/tour.ipynb.

Run from the repo root: `python tools/make_notebooks.py [path/to/shared/seeds/cells.py]`.
The seed notebooks are committed; this script is how they were made.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
TITLES = {
    "000": "PyTorch gradients: back-propagation on one and several steps",
    "001": "PyTorch gradients: the polynomial, the exercise, a one-layer network",
    "002": "AutoGrad: tensors, grad_fn, backprop",
    "003": "Gradients with autograd: when backward fails",
    "004": "Automatic differentiation: grad_fn, requires_grad, detach, no_grad",
}


def _traced(cell: str) -> bool:
    """A student wants the trace wherever the cell does tensor work."""
    stripped = [l for l in cell.splitlines() if l.strip() and not l.strip().startswith("#")]
    return not all(l.startswith(("import ", "from ")) for l in stripped)


def seed_notebook(key: str, cells: list[str], raises: dict) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells.append(new_markdown_cell(f"# {TITLES.get(key, key)}\n\nEvery code cell runs under `%%autograd`: "
                                      "the cell runs as usual, then the view shows each intermediate tensor."))
    nb.cells.append(new_code_cell("%load_ext autograd_magic"))
    for i, cell in enumerate(cells):
        code = ("%%autograd\n" + cell) if _traced(cell) else cell
        c = new_code_cell(code)
        if (key, i) in raises:
            c.metadata["tags"] = ["raises-exception"]
            nb.cells.append(new_markdown_cell(f"The next cell fails, as it does without the magic: *{raises[(key, i)]}*. "
                                              "The view above the error says why."))
        nb.cells.append(c)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


TOUR = [
    ("md", "# autograd_magic: a tour\n\n`%%autograd` runs a cell exactly as usual, records every tensor operation, "
           "and shows each intermediate: its value, `grad_fn`, `requires_grad`, and the gradient it received in `backward()`."),
    ("code", "%load_ext autograd_magic\nimport torch"),
    ("md", "## One step: a polynomial\n$y = 2x^4 + x^3 + 3x^2 + 5x + 1$, so $y'(2) = 8\\cdot 8 + 3\\cdot 4 + 6\\cdot 2 + 5 = 93$. "
           "Each sub-expression (`x**4`, `2*x**4`, ...) is its own row, with the gradient that reached it."),
    ("code", "%%autograd\nx = torch.tensor(2.0, requires_grad=True)\ny = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()\nx.grad"),
    ("md", "## Several steps: the chain rule\nWhy is `y.grad` None? `y` is not a leaf: torch does not keep its gradient "
           "unless you call `y.retain_grad()`. The view shows the gradient `y` received anyway."),
    ("code", "%%autograd\nx = torch.tensor([[1., 2, 3], [3, 2, 1]], requires_grad=True)\ny = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()\nprint(x.grad)\nprint(y.grad)"),
    ("md", "## What if...? Variants\n`--no-grad` and `--detach NAME` show the same cell re-run under `torch.no_grad()` "
           "or with a tensor detached, next to the real run, which is left untouched. In the widget these are toggles."),
    ("code", "%%autograd --detach y\nx = torch.tensor([[1., 2, 3], [3, 2, 1]], requires_grad=True)\ny = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()"),
    ("code", "%%autograd --no-grad\nx = torch.tensor([[1., 2, 3], [3, 2, 1]], requires_grad=True)\ny = 3*x + 2\nout = (2*y**2).mean()\nprint(out.requires_grad)"),
    ("md", "## A small network, a training loop\nModule internals fold into the line that called them (`model(X)`); "
           "a loop's later iterations are counted, not repeated."),
    ("code", "%%autograd\ntorch.manual_seed(0)\nmodel = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
             "opt = torch.optim.SGD(model.parameters(), lr=0.1)\nX, Y = torch.randn(16, 4), torch.randn(16, 1)\n"
             "for step in range(20):\n    opt.zero_grad()\n    loss = torch.nn.functional.mse_loss(model(X), Y)\n    loss.backward()\n    opt.step()\nloss"),
    ("md", "## Without the magic\nThe same engine as a context manager, in a script or a cell:"),
    ("code", "import autograd_magic as am\nw = torch.tensor([1.0, -2.0], requires_grad=True)\nwith am.trace() as t:\n    loss = (w * w).sum()\n    loss.backward()\nprint(t)"),
]


def tour() -> nbformat.NotebookNode:
    nb = new_notebook()
    for kind, text in TOUR:
        nb.cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def main() -> None:
    seeds_path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "seeds" / "cells.py"
    spec = importlib.util.spec_from_file_location("seed_cells", seeds_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = ROOT / "notebooks"
    out.mkdir(exist_ok=True)
    for key, cells in mod.NOTEBOOKS.items():
        nbformat.write(seed_notebook(key, cells, mod.RAISES), out / f"seed_{key}.ipynb")
    nbformat.write(tour(), out / "tour.ipynb")


if __name__ == "__main__":
    main()
