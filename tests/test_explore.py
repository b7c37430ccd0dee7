"""The explorer's engine against plain PyTorch: curves, tangents, secants, Jacobians; the user's state untouched.

Each test runs real `%%autograd` cells in widget mode (as a notebook does) and asks
the cell's session for its exploration, then recomputes every figure with torch
itself (a plain evaluation, `torch.autograd.grad`, `torch.autograd.functional.jacobian`).
"""

from __future__ import annotations

import time

import pytest
import torch
from IPython.utils.capture import capture_output
from test_sandbox import assert_same_state, user_state
from test_snapshot_budget import traced  # a %%autograd cell in widget mode; the session the magic made

from autograd_magic.notebook.session import cell_session
from autograd_magic.variants import explore as explorer
from autograd_magic.variants.interventions import Toggles

POLY = "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1"


def poly(x):
    return 2 * x**4 + x**3 + 3 * x**2 + 5 * x + 1


def plain(shell, body):
    result = shell.run_cell(body, store_history=True)
    assert result.success, result.error_in_exec


def torch_slope(x0: float, f=poly) -> float:
    x = torch.tensor(x0, requires_grad=True)
    (g,) = torch.autograd.grad(f(x), x)
    return float(g)


def explored(shell, session, call):
    """`call()` on the session; the user's state must be exactly as before."""
    before = user_state(shell)
    with capture_output() as out:
        result = call()
    assert_same_state(before, user_state(shell))
    assert out.stdout == "" and not out.outputs  # the re-runs' prints never reach the user
    return result


def check_poly_curve(c, x0):
    assert c.xs[20] == pytest.approx(x0) and len(c.xs) == 41
    for x, y, s in zip(c.xs, c.ys, c.slopes):
        assert y == pytest.approx(poly(x), rel=1e-5, abs=1e-4)
        assert s == pytest.approx(torch_slope(x), rel=1e-5, abs=1e-4)
    assert c.x0 == pytest.approx(x0)
    assert c.y0 == pytest.approx(float(poly(torch.tensor(x0))), rel=1e-6)
    assert c.slope == pytest.approx(torch_slope(x0), rel=1e-6)
    h = c.h
    assert c.secant == pytest.approx((poly(x0 + h) - poly(x0 - h)) / (2 * h), rel=1e-4)


@pytest.mark.parametrize("where", ["earlier cell", "same cell"])
def test_polynomial_curve_tangent_and_secant(shell, where):
    plain(shell, "import torch")
    if where == "earlier cell":
        plain(shell, "x = torch.tensor(2.0, requires_grad=True)")
        s = traced(shell, POLY + "\ny.backward()\nprint(x.grad)")
    else:
        s = traced(shell, "x = torch.tensor(2.0, requires_grad=True)\n" + POLY + "\nprint(y)")
    (inp,) = s.inputs()
    assert (inp.label, inp.value, inp.lo, inp.hi, inp.step) == ("x", 2.0, 0.0, 4.0, pytest.approx(0.1))
    assert inp.external == (where == "earlier cell")
    ex = explored(shell, s, s.exploration)
    assert s.trace.exploration is ex and ex.output_label == "y" and not ex.note
    (c,) = ex.curves
    assert c.batched and c.input == inp.record
    check_poly_curve(c, 2.0)
    assert c.slope == pytest.approx(93.0)  # the notebook's own figure, as torch gives it
    # the slider moved: the re-run at x = 1, then back at 2
    for x0 in (1.0, 2.0, 0.5):
        v = explored(shell, s, lambda: s.rerun(Toggles(values=((inp.record, x0),))))
        assert v.error is None
        (c,) = v.exploration.curves
        assert c.x0 == x0 and v.exploration.inputs[0].value == x0
        assert c.y0 == pytest.approx(float(poly(torch.tensor(x0))), rel=1e-6)
        assert c.slope == pytest.approx(torch_slope(x0), rel=1e-6)
        assert c.secant == pytest.approx((poly(x0 + c.h) - poly(x0 - c.h)) / (2 * c.h), rel=1e-4)
        if where == "earlier cell":  # the backward pass of the re-run gave x the gradient at x0
            assert v.records[0].attr_grad.values == pytest.approx(torch_slope(x0))
    assert torch_slope(1.0) == pytest.approx(22.0)


def test_values_compose_with_no_grad(shell):
    plain(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)")
    s = traced(shell, POLY + "\nprint(y)")
    (inp,) = s.inputs()
    v = explored(shell, s, lambda: s.rerun(Toggles(no_grad=True, values=((inp.record, 1.0),))))
    assert v.grad_mode == "no_grad"
    y = [r for r in v.records if r.name == "y"][-1]
    assert float(y.preview.values) == pytest.approx(12.0)


def test_a_cell_without_inputs_costs_nothing(shell, monkeypatch):
    plain(shell, "import torch")
    s = traced(shell, "a = torch.ones(3)\nb = a * 2")
    runs = []
    monkeypatch.setattr(explorer, "run_variant", lambda *a, **k: runs.append(a) or pytest.fail("re-ran the cell"))
    start = time.perf_counter()
    ex = s.exploration()
    took = time.perf_counter() - start
    assert ex.empty and not ex.curves
    assert not runs and took < 0.5  # a scan of the records, no re-run (the bound only catches a hang)


def test_batched_and_point_by_point_agree(shell, monkeypatch):
    plain(shell, "import torch")
    s = traced(shell, "w = torch.tensor(1.5, requires_grad=True)\nq = torch.sin(w) * w + torch.exp(-w)\nq.backward()")
    ex = explored(shell, s, s.exploration)
    (batched,) = ex.curves
    assert batched.batched
    monkeypatch.setattr(explorer, "_batched", lambda *a, **k: None)
    s._exploration, s._curves = None, {}
    (pointwise,) = explored(shell, s, s.exploration).curves
    assert not pointwise.batched
    assert pointwise.ys == pytest.approx(batched.ys, rel=1e-6)
    assert pointwise.slopes == pytest.approx(batched.slopes, rel=1e-5)
    f = lambda w: torch.sin(w) * w + torch.exp(-w)  # noqa: E731
    for x, y, slope in zip(pointwise.xs, pointwise.ys, pointwise.slopes):
        assert y == pytest.approx(float(f(torch.tensor(x))), rel=1e-5, abs=1e-6)
        assert slope == pytest.approx(torch_slope(x, f), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("body,f", [
    ("x = torch.tensor(0.5, requires_grad=True)\ny = (x.expand(3) * torch.tensor([1., 2., 3.])).sum()",
     lambda x: (x.expand(3) * torch.tensor([1.0, 2.0, 3.0])).sum()),
    ("x = torch.tensor(0.5, requires_grad=True)\ny = torch.softmax(torch.stack([x, 2 * x]), 0)[0]",
     lambda x: torch.softmax(torch.stack([x, 2 * x]), 0)[0]),
])
def test_a_cell_that_is_not_elementwise_falls_back_to_point_by_point(shell, body, f):
    plain(shell, "import torch")
    s = traced(shell, body)
    (c,) = explored(shell, s, s.exploration).curves
    assert not c.batched
    for x, y, slope in zip(c.xs, c.ys, c.slopes):
        assert y == pytest.approx(float(f(torch.tensor(x))), rel=1e-5, abs=1e-6)
        assert slope == pytest.approx(torch_slope(x, f), rel=1e-4, abs=1e-6)


def test_a_cell_that_raises_at_some_x_gives_none_there(shell):
    plain(shell, "import torch")
    s = traced(shell, "x = torch.tensor(2.0, requires_grad=True)\nif x.item() < 1:\n    raise ValueError('too small')\ny = x ** 2")
    (c,) = explored(shell, s, s.exploration).curves
    assert not c.batched
    for x, y in zip(c.xs, c.ys):
        assert (y is None) == (x < 1 - 1e-9)
        if y is not None:
            assert y == pytest.approx(x * x, rel=1e-5)
    assert "too small" in c.note and "failed at 10 of 41 points" in c.note


def jac(f, x):
    return torch.autograd.functional.jacobian(f, x)


def check_jacobian(j, f, x, v=None, grad=None):
    expected = jac(f, x).reshape(j.rows and len(j.rows) or 1, -1)
    assert torch.allclose(torch.tensor(j.rows, dtype=torch.float64), expected.double(), rtol=1e-5, atol=1e-6)
    if v is not None:
        assert j.v == pytest.approx(v.tolist(), rel=1e-6)
        assert j.vj == pytest.approx((v.double() @ expected.double()).tolist(), rel=1e-5)
        assert j.grad == pytest.approx(grad.tolist(), rel=1e-6) and j.agrees is True


def test_jacobian_of_backward_v_in_the_cell(shell):
    plain(shell, "import torch")
    s = traced(shell, "a = torch.tensor([1., 2., 3.], requires_grad=True)\nb = a * a * 2 + a.sum()\n"
                      "b.backward(torch.tensor([1., 0.5, 0.25]))")
    j = explored(shell, s, s.exploration).jacobian
    a = shell.user_ns["a"]
    check_jacobian(j, lambda t: t * t * 2 + t.sum(), a.detach(), torch.tensor([1.0, 0.5, 0.25]), a.grad)
    assert (j.output_label, j.input_label, j.out_shape, j.in_shape) == ("b", "a", (3,), (3,))


def test_jacobian_of_a_small_vector_leaf(shell):
    """A non-scalar output of a vector leaf, no backward at all: its Jacobian, as torch computes it."""
    plain(shell, "import torch\ntorch.manual_seed(0)")
    s = traced(shell, "w = torch.randn(3, requires_grad=True)\nh = w * w.sum() + w[0]")
    j = explored(shell, s, s.exploration).jacobian
    w = shell.user_ns["w"]
    check_jacobian(j, lambda t: t * t.sum() + t[0], w.detach())
    assert j.out_shape == (3,) and j.in_shape == (3,) and j.v is None


def test_a_scalar_output_has_no_jacobian_beyond_its_gradient(shell):
    """d loss / d w of a scalar loss is the gradient row the table shows as w.grad: no Jacobian block."""
    plain(shell, "import torch\ntorch.manual_seed(0)")
    s = traced(shell, "w = torch.randn(3, requires_grad=True)\nloss = (w ** 2).sum() * w[0]\nloss.backward()")
    assert explored(shell, s, s.exploration).jacobian is None


def test_seed_003_backward_v_in_a_later_cell(shell, seeds):
    cells = seeds.NOTEBOOKS["003"]
    for cell in cells[:11]:
        with capture_output():
            shell.run_cell(cell if "backward" in cell and "(v)" not in cell else "%%autograd --quiet\n" + cell,
                           store_history=True)
    build = traced(shell, cells[11])
    s = traced(shell, cells[12])
    assert s.rerun_blocked and cell_session(shell, build.trace.records[0].cell or -1) in (None, build)
    ex = explored(shell, s, s.exploration)
    assert ex.note == s.rerun_blocked  # its own re-runs are off, and it says why
    j = ex.jacobian
    x, v = shell.user_ns["x"], shell.user_ns["v"]
    check_jacobian(j, lambda t: (t + 2) * (t + 2) * 2, x.detach(), v, x.grad)
    assert j.output_label == "z" and j.input_label == "x" and not j.note


def test_a_jacobian_too_big_says_so(shell):
    plain(shell, "import torch")
    s = traced(shell, "x = torch.randn(300, requires_grad=True)\ny = x * 2\ny.backward(torch.ones(300))")
    j = explored(shell, s, s.exploration).jacobian
    assert j.rows == [] and j.note == "too big: 300 × 300 = 90000 entries > 1024"


def test_nice_steps():
    assert explorer.nice_step(2.0) == pytest.approx(0.1)
    assert explorer.nice_step(0.3) == pytest.approx(0.05)
    assert explorer.nice_step(-30.0) == pytest.approx(2.0)
    for x0 in (2.0, 0.3, -30.0, 7.0, 1e-3):
        step = explorer.nice_step(x0)
        assert 2 * max(1, abs(x0)) / 40 <= step * (1 + 1e-9) <= 2.5 * 2 * max(1, abs(x0)) / 40


# ---- what a saved notebook keeps: the published snapshot, through the magic as users run it ----
def _published_snapshot(shell, body) -> str:
    with capture_output(display=True) as cap:
        result = shell.run_cell(f"%%autograd\n{body}", store_history=True)
    assert result.success, result.error_in_exec
    found = [o.data["text/html"] for o in cap.outputs if "agm-snapshot" in o.data.get("text/html", "")]
    assert len(found) == 1
    return found[0]


def test_the_saved_snapshot_keeps_the_curve_at_the_cells_value(shell, seeds):
    """Seed 000 cell by cell: the polynomial's snapshot has the drawing (an SVG image, no script) and
    says the slope torch computes at x = 2, with the secant beside it."""
    cells = seeds.NOTEBOOKS["000"]
    x_cell = next(c for c in cells if "requires_grad" in c and "2." in c)
    poly_cell = next(c for c in cells if "2*x**4" in c)
    plain(shell, "import torch")
    _published_snapshot(shell, x_cell)
    snap = _published_snapshot(shell, poly_cell)
    assert f"slope {torch_slope(2.0):g} at x = 2" in snap
    secant = (poly(2.1) - poly(1.9)) / 0.2
    assert f"secant (h = 0.1): {secant:.4g}" in snap
    assert "data:image/svg+xml," in snap and "<script" not in snap.lower()


def test_the_saved_snapshot_keeps_seed_003s_jacobian(shell, seeds):
    """Seed 003 cell by cell: `z.backward(v)`'s snapshot shows J = dz/dx and v·J = x.grad, which
    plain PyTorch computes from the same x."""
    cells = seeds.NOTEBOOKS["003"]
    plain(shell, "import torch")
    for cell in cells[:-1]:  # as a student runs them; some fail on purpose (backward() without requires_grad)
        if "torch.randn(4, requires_grad" in cell:
            _published_snapshot(shell, cell)
        else:
            with capture_output(display=True):
                shell.run_cell("%%autograd --quiet\n" + cell, store_history=True)
    snap = _published_snapshot(shell, cells[-1])
    x = shell.user_ns["x"].detach()
    J = torch.autograd.functional.jacobian(lambda t: (t + 2) * (t + 2) * 2, x)
    v = torch.tensor([0.1, 1.0, 0.01, 1.01])
    assert torch.allclose(v @ J, shell.user_ns["x"].grad)
    assert "v·J equals x.grad ✓" in snap
    for value in torch.diagonal(J).tolist():  # the matrix shows its diagonal as torch computes it
        assert f"{value:.4g}" in snap


def test_a_slow_cell_gets_a_coarser_curve_over_the_whole_range_in_time(shell, monkeypatch):
    """The curve is computed as the cell ends: a cell too slow to re-run 41 times within the budget
    gets the ends and the middle first, then finer, and says how many points it left out."""
    from autograd_magic import limits

    monkeypatch.setattr(limits, "EXPLORE_CURVE_SECONDS", 0.3)
    monkeypatch.setattr(explorer.limits, "EXPLORE_CURVE_SECONDS", 0.3)
    plain(shell, "import torch, time")
    body = "x = torch.tensor(0.5, requires_grad=True)\ntime.sleep(0.03)\ny = torch.softmax(torch.stack([x, 2 * x]), 0)[0]"
    s = traced(shell, body)
    started = time.perf_counter()
    (c,) = s.exploration().curves
    took = time.perf_counter() - started
    assert took < 0.3 + 0.5  # the budget, a run in flight when it ran out, and the point's own runs
    f = lambda x: torch.softmax(torch.stack([x, 2 * x]), 0)[0]
    got = [i for i, y in enumerate(c.ys) if y is not None]
    assert 0 in got and len(c.xs) - 1 in got and len(c.xs) // 2 in got  # the whole range, coarsely
    assert len(got) < len(c.xs) and "points left out" in c.note
    for i in got:
        assert c.ys[i] == pytest.approx(float(f(torch.tensor(c.xs[i]))), rel=1e-5)


def test_a_models_forward_gets_no_jacobian_section_in_its_snapshot(shell):
    """`out = m(inp)`: a non-scalar output of leaves far too big for a Jacobian (the weights). The
    view may say so; the saved snapshot does not spend bytes on it."""
    plain(shell, "import torch\ntorch.manual_seed(0)\nm = torch.nn.Linear(64, 64)\ninp = torch.randn(8, 64)")
    s = traced(shell, "out = m(inp)")
    j = s.exploration().jacobian
    assert j is None or (j.rows == [] and j.note.startswith("too big:"))
    snap = _published_snapshot(shell, "out = m(inp)")
    assert "Jacobian" not in snap and "too big" not in snap
