"""A graph that spans cells: a backward-only cell shows the intermediates earlier traced cells made.

Students run notebooks cell by cell (seed 000: `x = ...`, `y = ...`, `y.backward()`,
each its own cell). The backward cell's trace must hold the intermediates of
`y`, with the gradient each received in that backward — compared here with
what plain torch computes for the same expressions (retain_grad on a replica).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from autograd_magic.notebook.session import CellSession, earlier_cells
from browser_util import seed_cells

ROOT = Path(__file__).resolve().parent.parent


def _with_output(cell: str, name: str) -> str:
    first, _, rest = cell.partition("\n")
    assert first.startswith("%%autograd")
    return f"{first} -o {name} --quiet\n{rest}"


def _plain_polynomial_grads() -> dict[str, float]:
    """What each sub-expression of seed 000's polynomial receives in y.backward(), by plain torch."""
    x = torch.tensor(2.0, requires_grad=True)
    parts = {}

    def keep(expr: str, t: torch.Tensor) -> torch.Tensor:
        t.retain_grad()
        parts[expr] = t
        return t

    x4 = keep("x**4", x**4)
    a = keep("2*x**4", 2 * x4)
    x3 = keep("x**3", x**3)
    x2 = keep("x**2", x**2)
    b = keep("3*x**2", 3 * x2)
    c = keep("5*x", 5 * x)
    y = a + x3 + b + c + 1
    y.backward()
    grads = {expr: float(t.grad) for expr, t in parts.items()}
    grads["x"] = float(x.grad)
    return grads


def _reaches(t, start: int, target: int) -> bool:
    seen, stack = set(), [start]
    while stack:
        rid = stack.pop()
        if rid not in seen:
            seen.add(rid)
            stack.extend(t.records[rid].inputs)
    return target in seen


def test_seed_000_backward_cell_shows_the_polynomials_intermediates(shell):
    cells = seed_cells("seed_000")
    backward = next(i for i, c in enumerate(cells) if c.strip().endswith("y.backward()"))
    for i, cell in enumerate(cells[: backward + 1]):
        shell.run_cell(_with_output(cell, "t") if i == backward else cell, store_history=True).raise_error()
    t = shell.user_ns["t"]
    expected = _plain_polynomial_grads()
    by_expr = {r.expr: r for r in t.records if r.expr}
    for expr in ("x**4", "2*x**4", "x**3", "x**2", "3*x**2", "5*x"):
        r = by_expr[expr]
        assert r.cell is not None and r.cell_line is not None, expr  # made by the cell before
        assert float(r.grad) == pytest.approx(expected[expr]), expr
    assert float(t.last("x").grad) == pytest.approx(expected["x"]) == 93.0
    assert t.last("y").grad_fn == "AddBackward0" and t.last("y").cell is not None
    # the stepper names a tensor at every node (before: steps 2-10 named none)
    p = t.passes[0]
    assert all(s.records for s in p.steps), [s.node for s in p.steps if not s.records]
    # the graph connects them: y's inputs lead back to x
    ids = {r.id for r in t.records}
    assert all(i in ids for r in t.records for i in r.inputs)
    assert _reaches(t, t.last("y").id, t.last("x").id)


def test_the_backward_cells_variants_say_why_they_are_off(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    shell.run_cell("%%autograd --quiet\ny = (x * 3).sum()")
    session, run = CellSession.run(shell, "y.backward()")
    assert run.error is None and not session.can_rerun
    reason = session.rerun_blocked
    assert "earlier cells" in reason and "\n" not in reason
    assert reason in run.trace.notes
    from autograd_magic.variants.interventions import Toggles

    with pytest.raises(RuntimeError, match="earlier cells"):
        session.rerun(Toggles(no_grad=True))
    checks = session.check()
    assert [c.name for c in checks] == ["x"] and checks[0].ok is None and checks[0].note == reason
    from autograd_magic.render.payload import build_payload

    assert build_payload(run.trace, can_rerun=session.can_rerun)["can_rerun"] is False


def test_seed_000_matrix_part_each_cell_its_own(shell):
    """x, y, z, out each made by its own traced cell; `out.backward()` shows all four, linked."""
    cells = seed_cells("seed_000")
    start = next(i for i, c in enumerate(cells) if "[[1.,2,3],[3,2,1]]" in c)
    end = next(i for i, c in enumerate(cells) if "out.backward()" in c)
    shell.run_cell("import torch")
    for i in range(start, end + 1):
        shell.run_cell(_with_output(cells[i], "t") if i == end else cells[i], store_history=True).raise_error()
    t = shell.user_ns["t"]
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    y = 3 * x + 2
    z = 2 * y**2
    out = z.mean()
    for v in (y, z):
        v.retain_grad()
    out.backward()
    for name, plain in (("y", y), ("z", z), ("x", x)):
        r = t.last(name)
        assert r is not None, name
        assert torch.allclose(torch.as_tensor(r.grad, dtype=torch.float32), plain.grad), name
    assert t.last("z").cell is not None and t.last("y").cell is not None
    assert _reaches(t, t.last("out").id, t.last("y").id)  # linked across cells, not loose boxes
    assert _reaches(t, t.last("y").id, t.last("x").id)
    assert len({r.id for r in t.records if r.label == "y"}) == 1  # one record per tensor


def test_a_plain_forward_cell_is_not_brought_in(shell):
    """Only traced cells leave records: a plain forward shows x and y as before, no error."""
    shell.run_cell("import torch\nx = torch.tensor(3.0, requires_grad=True)\ny = x * x")
    shell.run_cell("%%autograd -o t --quiet\ny.backward()").raise_error()
    t = shell.user_ns["t"]
    assert all(r.cell is None for r in t.records)
    assert float(t.last("x").grad) == 6.0


def test_earlier_records_go_when_their_tensors_do(shell):
    shell.run_cell("import torch\nx = torch.tensor(3.0, requires_grad=True)")
    shell.run_cell("%%autograd --quiet\ny = x * x + 1")
    store = earlier_cells(shell)
    assert any(c.alive() for c in store)
    cell = list(store)[-1]
    del shell.user_ns["y"]
    gc.collect()
    assert not cell.alive()
    store.prune()
    assert cell not in list(store)


def test_the_store_keeps_within_its_budget(shell):
    from autograd_magic.capture.earlier import EarlierCells
    from autograd_magic.run.execute import execute

    store = EarlierCells(budget=50)
    shell.run_cell("import torch\nx = torch.ones(2, requires_grad=True)")
    for i in range(8):
        execute(shell, "\n".join(f"v{i}_{k} = x * {k + 1}" for k in range(10)), earlier=store)
    assert sum(len(c.trace.records) for c in store) <= 50
    assert len(store) >= 1


def test_autograd_on_traces_every_cell_and_off_stops(shell, capsys):
    try:
        shell.run_cell("%autograd on --quiet -o last")
        shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)", store_history=True)
        shell.run_cell("y = x ** 3", store_history=True)
        shell.run_cell("y.backward()", store_history=True)
        t = shell.user_ns["last"]
        cube = next(r for r in t.records if r.expr == "x ** 3")
        assert cube.cell is not None and float(cube.grad) == 1.0
        assert float(t.last("x").grad) == 12.0  # 3 * x**2, as plain torch computes
        assert float(shell.user_ns["x"].grad) == 12.0
        # errors fail the cell as they would in a plain cell, with its own line numbers
        result = shell.run_cell("z = x * 2\n1 / 0", store_history=True)
        assert isinstance(result.error_in_exec, ZeroDivisionError)
        assert shell.user_ns["last"].error.line == 2
        shell.run_cell("%autograd")
        assert "on" in capsys.readouterr().out
    finally:
        shell.run_cell("%autograd off")
    before = shell.user_ns["last"]
    shell.run_cell("w = x * 5", store_history=True)
    assert shell.user_ns["last"] is before  # plain again: nothing was traced
    assert float(shell.user_ns["w"].detach()) == 10.0


def test_autograd_on_with_a_bad_option_is_a_usage_error(shell):
    result = shell.run_cell("%autograd on --limit zero")
    assert result.error_in_exec is not None and "usage" in str(result.error_in_exec).lower()
    result = shell.run_cell("%autograd sideways")
    assert "usage" in str(result.error_in_exec).lower()
    from autograd_magic.notebook import auto_trace

    assert not auto_trace.is_on(shell)


def test_cells_that_share_an_execution_count_keep_their_own_records(shell):
    # run_cell(store_history=False) (nbclient's silent runs, code that calls run_cell) leaves the
    # execution count as it is: two traced cells then share it, and their records must not mix
    cells = ["x = torch.ones(2, 2, requires_grad=True)", "y = x + 2", "z = y * y * 3\nout = z.mean()", "out.backward()"]
    shell.run_cell("import torch", store_history=False)
    for i, cell in enumerate(cells):
        magic = "%%autograd --quiet -o t\n" if i == len(cells) - 1 else "%%autograd --quiet\n"
        shell.run_cell(magic + cell, store_history=False).raise_error()
    t = shell.user_ns["t"]
    x = torch.ones(2, 2, requires_grad=True)  # plain torch, with the intermediates' gradients kept
    y = x + 2
    yy = y * y
    for v in (y, yy):
        v.retain_grad()
    (yy * 3).mean().backward()
    by_expr = {r.expr: r for r in t.records}
    assert by_expr["x + 2"].name == "y" and by_expr["y * y"].name is None
    assert by_expr["x + 2"].grads[0].values.tolist() == y.grad.tolist()
    assert by_expr["y * y"].grads[0].values.tolist() == yy.grad.tolist()


def test_a_name_rebound_by_a_later_cell_keeps_the_first_cells_records(shell):
    # seed 003: `z = y*y*2`, then `z = z.mean()` in the next cell, then `z.backward()`. The first
    # z's tensor is gone (MeanBackward0 keeps no input), but its nodes are in the graph the
    # backward cell runs: that cell's records are brought in, each with torch's own gradient
    cells = ["x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)", "y = x + 2", "z = y*y*2", "z = z.mean()",
             "z.backward()"]
    shell.run_cell("import torch", store_history=True)
    for i, cell in enumerate(cells):
        magic = "%%autograd --quiet -o t\n" if i == len(cells) - 1 else "%%autograd --quiet\n"
        shell.run_cell(magic + cell, store_history=True).raise_error()
    gc.collect()
    t = shell.user_ns["t"]
    x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    parts = {"x + 2": x + 2}
    parts["y*y"] = parts["x + 2"] * parts["x + 2"]
    parts["y*y*2"] = parts["y*y"] * 2
    for v in parts.values():
        v.retain_grad()
    parts["y*y*2"].mean().backward()
    by_expr = {r.expr: r for r in t.records if r.expr}
    for expr, v in parts.items():
        assert expr in by_expr, (expr, [(r.op, r.expr) for r in t.records])
        assert by_expr[expr].grads[0].values.tolist() == pytest.approx(v.grad.tolist()), expr
    assert by_expr["y*y*2"].name == "z" and not any(r.external and r.name == "z" for r in t.records)
    assert t.last("x").attr_grad.values.tolist() == pytest.approx(x.grad.tolist())


@pytest.mark.parametrize("middle, expr, plain_step", [
    ("y = y + 1", "y + 1", lambda y: y + 1),
    ("y = y * 3", "y * 3", lambda y: y * 3),
])
def test_a_backward_through_an_op_on_an_earlier_cells_tensor_shows_that_cells_history(shell, middle, expr, plain_step):
    # `y.sum().backward()`: y, the input of this cell's sum, is the tensor the cell before made;
    # it is shown as that cell's record, computed from the one before, each with torch's gradient
    cells = ["x = torch.tensor([1.0, -2.0], requires_grad=True)", "y = x * 2", middle, "y.sum().backward()"]
    shell.run_cell("import torch", store_history=True)
    for i, cell in enumerate(cells):
        magic = "%%autograd --quiet -o t\n" if i == len(cells) - 1 else "%%autograd --quiet\n"
        shell.run_cell(magic + cell, store_history=True).raise_error()
    t = shell.user_ns["t"]
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    first = x * 2
    second = plain_step(first)
    for v in (first, second):
        v.retain_grad()
    second.sum().backward()
    by_expr = {r.expr: r for r in t.records if r.expr}
    made, before, total = by_expr[expr], by_expr["x * 2"], by_expr["y.sum()"]
    assert not made.external and made.cell is not None and made.name == "y"
    assert total.inputs == [made.id] and made.inputs == [before.id]  # the chain, cell to cell
    assert made.grads[0].values.tolist() == second.grad.tolist()
    assert before.grads[0].values.tolist() == first.grad.tolist()
    assert t.last("x").attr_grad.values.tolist() == x.grad.tolist()
