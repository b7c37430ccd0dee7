"""Every seed notebook, cell by cell, plain and under %%autograd: same everything.

The reference is plain PyTorch run by the same shell: after every cell the
namespace (tensor values, requires_grad, grad, grad_fn, is_leaf), printed
output and exceptions must be identical; the figures the notebooks print
(`EXPECTED`) must come out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from IPython.utils.capture import capture_output

NOTEBOOKS = ["000", "001", "002", "003", "004"]
ROOT_DIR = Path(__file__).resolve().parent.parent


def test_the_seed_cells_come_from_the_repositorys_own_notebooks(seeds):
    """The seeds are read from notebooks/seed_*.ipynb (missing ones fail the fixture, never skip)."""
    from conftest import ROOT, SEED_NOTEBOOKS

    assert sorted(seeds.NOTEBOOKS) == NOTEBOOKS
    assert all(p.is_file() and p.parent == ROOT / "notebooks" for p in SEED_NOTEBOOKS.values())
    assert {nb: len(cells) for nb, cells in seeds.NOTEBOOKS.items()} == {
        "000": 10, "001": 11, "002": 12, "003": 13, "004": 4,
    }
    first = [cells[0].splitlines()[0] for cells in seeds.NOTEBOOKS.values()]
    assert first == ["import torch"] * 5  # the %load_ext cell is dropped, the %%autograd line stripped
    assert not any(c.startswith("%") for cells in seeds.NOTEBOOKS.values() for c in cells)
    assert seeds.NOTEBOOKS["003"][9] == "z.backward()" and ("003", 9) in seeds.RAISES


def test_the_benchmarks_run_the_same_seed_cells(seeds):
    """`make bench` reads the seeds from the repository's notebooks too (a clean clone has
    nothing beside it), and gets exactly the cells the tests run."""
    from bench import cases

    assert cases.seed_notebooks() == seeds.NOTEBOOKS
    for path in sorted((ROOT_DIR / "bench").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"[\"']shared[\"'/]|\.\./shared|parent\.parent\.parent", text), f"{path.name} reads outside the repository"


def test_a_missing_seed_notebook_fails_rather_than_skips(monkeypatch, tmp_path):
    import conftest

    monkeypatch.setitem(conftest.SEED_NOTEBOOKS, "002", tmp_path / "seed_002.ipynb")
    with pytest.raises(FileNotFoundError, match="seed_002.ipynb"):
        conftest.load_seeds()


def _tensor_state(t: torch.Tensor):
    return (
        t.detach().numpy().tolist(),
        t.requires_grad,
        t.is_leaf,
        type(t.grad_fn).__name__ if t.grad_fn is not None else None,
        t.grad.numpy().tolist() if t.is_leaf and t.grad is not None else None,
    )


def _state(shell):
    hidden = set(shell.user_ns_hidden)
    state = {}
    for name, value in shell.user_ns.items():
        if name.startswith("_") or name in hidden:
            continue
        if isinstance(value, torch.Tensor):
            state[name] = _tensor_state(value)
        elif isinstance(value, (int, float, str, bool)):
            state[name] = value
        else:
            state[name] = type(value).__name__
    return state


def _comparable(stdout: str) -> str:
    # Object addresses (`<AddBackward0 object at 0x...>`) differ run to run, and a
    # traceback's header counts the %%autograd line; tracebacks are compared in
    # test_magic.py, the error's type and message here.
    stdout = re.sub(r"0x[0-9a-f]+", "0x?", stdout)
    stdout = re.sub(r"Out\[\d+\]", "Out[?]", stdout)
    cut = stdout.find("\x1b[31m-----")
    return stdout if cut < 0 else stdout[:cut]


def _run_notebook(shell, cells, traced: bool):
    shell.reset(new_session=False)
    torch.manual_seed(1234)
    after = []
    for cell in cells:
        code = ("%%autograd --quiet\n" + cell) if traced else cell
        with capture_output(display=True) as cap:
            result = shell.run_cell(code, store_history=True)
        err = result.error_in_exec or result.error_before_exec
        after.append(
            {
                "state": _state(shell),
                "stdout": _comparable(cap.stdout),
                "error": (type(err).__name__, str(err)) if err is not None else None,
            }
        )
    return after


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_traced_run_is_the_plain_run(shell, seeds, nb):
    cells = seeds.NOTEBOOKS[nb]
    plain = _run_notebook(shell, cells, traced=False)
    traced = _run_notebook(shell, cells, traced=True)
    for i, (p, t) in enumerate(zip(plain, traced)):
        assert t["error"] == p["error"], f"cell {i}: {cells[i]!r}"
        assert t["stdout"] == p["stdout"], f"cell {i}: {cells[i]!r}"
        assert t["state"] == p["state"], f"cell {i}: {cells[i]!r}"


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_expected_figures_and_errors(shell, seeds, nb):
    cells = seeds.NOTEBOOKS[nb]
    shell.reset(new_session=False)
    torch.manual_seed(1234)
    expected = [e for e in seeds.EXPECTED if e[0] == nb]
    for i, cell in enumerate(cells):
        with capture_output(display=True):
            result = shell.run_cell("%%autograd\n" + cell)
        raises = seeds.RAISES.get((nb, i))
        if raises:
            assert result.error_in_exec is not None and raises in str(result.error_in_exec)
        else:
            assert result.success, f"cell {i} failed: {result.error_in_exec!r}"
        for _, idx, expr, value in expected:
            if idx == i:
                got = eval(expr, shell.user_ns)
                if value is None:
                    assert got is None
                else:
                    np.testing.assert_allclose(got.detach().numpy(), np.array(value), rtol=1e-6)


def _subexpressions(src: str) -> list[str]:
    """Binary-op and call sub-expressions of `src` in evaluation (post-)order, from Python's own AST."""
    tree = ast.parse(src)
    out: list[str] = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            visit(child)
        if isinstance(node, (ast.BinOp, ast.Call)):
            out.append(ast.get_source_segment(src, node))

    visit(tree.body[0].value)
    return out


def test_polynomial_records_read_as_its_subexpressions(shell):
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)")
    src = "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1"
    shell.run_cell(f"%%autograd --quiet -o t\n{src}\ny.backward()")
    t = shell.user_ns["t"]
    made = [r for r in t.records if not r.external]
    assert [r.expr for r in made] == _subexpressions(src)
    assert all(r.line == 2 for r in made)  # line 2 of the cell: the %%autograd line is line 1
    assert made[-1].name == "y"
    assert float(made[-1].value) == 63.0
    x = t.last("x")
    assert x is not None and x.external and x.is_leaf
    assert float(x.grad) == 93.0  # dy/dx = 8x^3 + 3x^2 + 6x + 5 at 2


def test_exercise_cell_names_grads_and_retain_grad(shell, seeds):
    cell = seeds.NOTEBOOKS["001"][5]
    shell.run_cell("import torch")
    shell.run_cell("%%autograd --quiet -o t\n" + cell)
    t = shell.user_ns["t"]
    # reference: the same computation in plain torch
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    y = 3 * x + 2
    z = 2 * y**2
    out = z.mean()
    gy, gz, gout = torch.autograd.grad(out, [y, z, out], retain_graph=True)
    out.backward()
    names = {r.name: r for r in t.records if r.name}
    assert {"x", "y", "z", "out"} <= set(names)
    np.testing.assert_array_equal(names["x"].grad, x.grad.numpy())
    np.testing.assert_array_equal(names["y"].grads[0].values, gy.numpy())
    np.testing.assert_array_equal(names["z"].grads[0].values, gz.numpy())
    np.testing.assert_array_equal(names["out"].grads[0].values, gout.numpy())
    assert names["y"].retains_grad and names["y"].attr_grad is not None  # the cell called y.retain_grad()
    assert not names["z"].retains_grad and names["z"].attr_grad is None  # torch shows z.grad as None
    assert names["y"].grad_fn == type(y.grad_fn).__name__
    assert names["out"].grad_fn == type(out.grad_fn).__name__
    assert len(t.passes) == 1 and t.passes[0].error is None


def test_tensors_from_earlier_cells_are_named_external_leaves(shell):
    shell.run_cell("import torch\nw = torch.randn(5, 3, requires_grad=True)\nx = torch.ones(5)")
    shell.run_cell("%%autograd --quiet -o t\nz = torch.matmul(x, w)")
    t = shell.user_ns["t"]
    ext = {r.name: r for r in t.records if r.external}
    assert set(ext) == {"x", "w"}
    assert ext["w"].requires_grad and ext["w"].is_leaf
    z = t.last("z")
    assert z.inputs == [ext["x"].id, ext["w"].id]


def test_module_parameters_are_named_by_path(shell):
    shell.run_cell(
        "import torch\ntorch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))\n"
        "X = torch.randn(8, 3)"
    )
    shell.run_cell("%%autograd --quiet -o t\nloss = model(X).pow(2).mean()\nloss.backward()")
    t = shell.user_ns["t"]
    names = {r.name for r in t.records if r.external}
    assert {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias", "X"} <= names
    internal = [r for r in t.records if r.internal]
    assert internal and all(r.line == 2 for r in internal)  # attributed to the call site model(X)
    assert {r.module for r in internal} >= {"model.0", "model.2"}
    w = t.last("model.0.weight")
    np.testing.assert_array_equal(w.grad, shell.user_ns["model"][0].weight.grad.numpy())
