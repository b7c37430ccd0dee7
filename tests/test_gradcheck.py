"""The gradient check: agrees with autograd on the seeds, flags a wrong backward, touches nothing."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from fuzz_programs import programs
from hypothesis import HealthCheck, given, settings

from autograd_magic.variants.gradcheck import LeafCheck, _sample, gradcheck_cell

CUBE = '''
class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x  # wrong on purpose: d(x^3)/dx is 3*x**2
'''


def check(shell, body: str) -> list[LeafCheck]:
    shell.user_ns.pop("t", None)
    result = shell.run_cell("%%autograd --quiet --check -o t\n" + body)
    assert result.error_in_exec is None, result.error_in_exec
    return shell.user_ns["t"].gradcheck


def test_seed_001_exercise_agrees(shell):
    shell.run_cell("import torch")
    (c,) = check(shell, "x = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)\ny = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()")
    assert c.name == "x" and c.ok is True and c.elements_checked == 6
    assert c.max_rel_err < 1e-6
    assert [round(a, 6) for _, a, _ in c.samples] == [10, 16, 22, 22, 16, 10]


def test_all_seed_cells(shell, seeds):
    """Every seed cell with a backward checks out (or says why it was not checked); none is flagged."""
    checked = 0
    for nb, cells in seeds.NOTEBOOKS.items():
        shell.reset(new_session=False)
        for i, cell in enumerate(cells):
            shell.user_ns.pop("t", None)
            result = shell.run_cell("%%autograd --quiet --check -o t\n" + cell)
            assert (result.error_in_exec is None) == ((nb, i) not in seeds.RAISES), (nb, i)
            for c in shell.user_ns["t"].gradcheck or []:
                assert c.ok is not False, (nb, i, c)
                if c.ok:
                    checked += 1
                    assert c.max_rel_err < 1e-5, (nb, i, c)
                else:
                    assert c.note, (nb, i, c)
    assert checked >= 2  # most seed cells call backward() on a value an earlier cell computed


@pytest.mark.parametrize("nb", ["000", "001", "002", "004"])
def test_seed_notebooks_as_one_cell(shell, seeds, nb):
    """A whole notebook in one cell: its first backward pass is re-computed and checked."""
    cells = [c for i, c in enumerate(seeds.NOTEBOOKS[nb]) if (nb, i) not in seeds.RAISES]
    checks = check(shell, "\n".join(cells))
    assert checks and all(c.ok is True for c in checks), checks
    assert all(c.max_rel_err < 1e-5 for c in checks)


def test_flags_a_wrong_custom_function(shell):
    shell.run_cell("import torch\n" + CUBE)
    (c,) = check(shell, "x = torch.tensor([1., 2, 3], requires_grad=True)\ny = Cube.apply(x).sum()\ny.backward()")
    assert c.ok is False and "differs" in c.note
    ana = [a for _, a, _ in c.samples]
    num = [n for _, _, n in c.samples]
    np.testing.assert_allclose(ana, [2.0, 4.0, 6.0])  # what the wrong backward says
    np.testing.assert_allclose(num, [3.0, 12.0, 27.0], rtol=1e-6)  # 3*x**2
    assert c.max_abs_err == pytest.approx(21.0, rel=1e-6)


def test_external_leaves_and_module_parameters(shell):
    shell.run_cell(
        "import torch\ntorch.manual_seed(1)\nmodel = torch.nn.Linear(3, 2)\n"
        "a = torch.tensor([0.5, 1.5, -1.0], requires_grad=True)\nx_in = torch.randn(4, 3)"
    )
    checks = check(shell, "h = torch.tanh(model(x_in * a))\nloss = (h ** 2).mean()\nloss.backward()")
    names = {c.name for c in checks}
    assert {"a", "model.weight", "model.bias"} <= names, checks
    assert all(c.ok is True for c in checks), checks


def test_root_from_an_earlier_cell_is_not_checked(shell):
    shell.run_cell("import torch\nx = torch.ones(2, requires_grad=True)\ny = (x * 3).sum()")
    (c,) = check(shell, "y.backward()")
    assert c.ok is None and "before this cell" in c.note


def test_non_scalar_root_with_gradient(shell):
    """backward(v) on a vector y checks f = y·v, whose gradient is what backward(v) computes."""
    shell.run_cell("import torch")
    (c,) = check(shell, "x = torch.tensor([1., 2., 3.], requires_grad=True)\ny = x ** 2\ny.backward(torch.tensor([0.1, 1.0, 10.0]))")
    assert c.ok is True, c
    np.testing.assert_allclose([n for _, _, n in c.samples], [0.2, 4.0, 60.0], rtol=1e-5)


def test_scalar_root_with_a_gradient_argument(shell):
    shell.run_cell("import torch")
    (c,) = check(shell, "x = torch.tensor([1., 2.], requires_grad=True)\ny = (x ** 2).sum()\ny.backward(torch.tensor(3.0))")
    assert c.ok is True, c
    np.testing.assert_allclose([a for _, a, _ in c.samples], [6.0, 12.0])


def test_seed_003_backward_with_a_vector(shell, seeds):
    """Seed 003's last cells in one cell: z.backward(v) with a non-scalar z."""
    cells = seeds.NOTEBOOKS["003"]
    checks = check(shell, "import torch\ntorch.manual_seed(0)\n" + cells[11] + "\n" + cells[12])
    assert [c.ok for c in checks] == [True], checks


def test_user_state_untouched(shell):
    """Namespace objects, values, dtypes, grads, RNG and the default dtype are as a plain run leaves them."""
    setup = (
        "import torch, random\nimport numpy as np\ntorch.manual_seed(3)\nnp.random.seed(3)\nrandom.seed(3)\n"
        "w = torch.randn(3, requires_grad=True)\nw.grad = torch.full((3,), 7.0)\ndrop = torch.nn.Dropout(0.5)"
    )
    body = "noise = torch.randn(3)\nr = np.random.rand()\nq = random.random()\nloss = (drop(w * noise) ** 2).sum() * r * q\nloss.backward()"
    results = []
    for flags in ("--quiet", "--quiet --check"):
        shell.reset(new_session=False)
        shell.run_cell(setup)
        w = shell.user_ns["w"]
        res = shell.run_cell(f"%%autograd {flags} -o t\n" + body)
        assert res.error_in_exec is None
        ns = shell.user_ns
        assert ns["w"] is w and w.dtype == torch.float32 and w.grad.dtype == torch.float32
        results.append(
            (
                w.detach().clone(), w.grad.clone(), ns["noise"].clone(), ns["r"], ns["q"], float(ns["loss"]),
                torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate(),
                torch.get_default_dtype(), next(ns["drop"].parameters(), None),
            )
        )
        if "--check" in flags:
            (c,) = ns["t"].gradcheck
            assert c.name == "w" and c.ok is True, c
    plain, checked = results
    for a, b in zip(plain, checked):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b)
        else:
            assert a == b
    assert checked[9] == torch.float32


def test_sample_is_bounded_and_spread():
    assert _sample(1, 8) == [0]
    assert _sample(6, 8) == [0, 1, 2, 3, 4, 5]
    s = _sample(1000, 8)
    assert len(s) == 8 and s[0] == 0 and s[-1] == 999


def test_max_leaves_bound(shell):
    shell.run_cell("import torch")
    body = "\n".join(f"p{i} = torch.tensor([{i}.0 + 1], requires_grad=True)" for i in range(12))
    body += "\ntotal = (" + " + ".join(f"p{i}**2" for i in range(12)) + ").sum()\ntotal.backward()"
    shell.user_ns.pop("t", None)
    shell.run_cell("%%autograd --quiet -o t\n" + body)
    t = shell.user_ns["t"]
    checks = gradcheck_cell(shell, body, t, None, max_leaves=3)
    assert [c.name for c in checks] == ["p0", "p1", "p2"]
    assert all(c.ok for c in checks)


def test_module_built_in_the_cell(shell):
    """Parameters made inside nn.Linear in the cell are nudged where the cell initialises them."""
    shell.run_cell("import torch")
    checks = check(
        shell,
        "torch.manual_seed(0)\nnet = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))\n"
        "x = torch.randn(5, 3)\nloss = net(x).pow(2).mean()\nloss.backward()",
    )
    ok = [c for c in checks if c.ok]
    assert len(ok) >= 2 and all(c.ok is not False for c in checks), checks
    assert all(c.note for c in checks if c.ok is None)
    assert next(shell.user_ns["net"].parameters()).dtype == torch.float32


def test_autograd_grad_pass_is_checked(shell):
    shell.run_cell("import torch")
    (c,) = check(shell, "x = torch.tensor([1., 2.], requires_grad=True)\n(g,) = torch.autograd.grad((x**3).sum(), x)")
    assert c.ok is True
    np.testing.assert_allclose([n for _, _, n in c.samples], [3.0, 12.0], rtol=1e-6)


def test_time_budget_bounds_the_work(shell):
    """With no time left, leaves are reported as not checked (never as wrong), and nothing raises."""
    shell.run_cell("import torch")
    body = "x = torch.tensor([1., 2., 3.], requires_grad=True)\ny = (x ** 2).sum()\ny.backward()"
    shell.user_ns.pop("t", None)
    shell.run_cell("%%autograd --quiet -o t\n" + body)
    t = shell.user_ns["t"]
    (c,) = gradcheck_cell(shell, body, t, None, time_budget=0.0)
    assert c.ok is None and "time budget" in c.note and c.elements_checked == 0
    (c,) = gradcheck_cell(shell, body, t, None, max_elements=2)
    assert c.ok is True and c.elements_checked == 2


def test_a_failing_rerun_is_a_note_not_an_error(shell):
    shell.run_cell("import torch\ncalls = []")
    body = "x = torch.tensor([1., 2.], requires_grad=True)\nif len(calls) > 0:\n    raise ValueError('second run')\ncalls.append(1)\n(x * 3).sum().backward()"
    shell.user_ns.pop("t", None)
    shell.run_cell("%%autograd --quiet -o t\n" + body)
    t = shell.user_ns["t"]
    shell.user_ns["calls"].append(1)  # the re-run now takes the failing branch
    (c,) = gradcheck_cell(shell, body, t, None)
    assert c.ok is None and "ValueError: second run" in c.note


def test_kinks_are_explained_not_flagged(shell):
    """relu and abs at exactly 0: the central difference is 0.5 and 0, autograd says 0 — both legitimate."""
    shell.run_cell("import torch")
    (c,) = check(shell, "w = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)\nloss = torch.relu(w).sum() + w.abs().sum()\nloss.backward()")
    assert c.ok is True and c.kinks == [0] and "kink" in c.note
    ana = {i: a for i, a, _ in c.samples}
    assert ana == {0: 0.0, 1: 2.0, 2: -1.0}


def test_large_loss_small_gradient(shell):
    """A loss of ~1e8 with a gradient of ~1e-3: rounding in f(x±h) is allowed for, the check agrees."""
    shell.run_cell("import torch")
    (c,) = check(shell, "a = torch.tensor([1e-3, 2.0], requires_grad=True)\nloss = 1e8 + (a ** 2).sum() * 0.5\nloss.backward()")
    assert c.ok is True, c


def test_path_through_detach_is_excused_not_flagged(shell):
    """y = x.detach() * x: autograd gives x, finite differences 2x; that is detach doing its job."""
    shell.run_cell("import torch")
    (c,) = check(shell, "x = torch.tensor([1., 2.], requires_grad=True)\ny = x.detach() * x\ny.sum().backward()")
    assert c.ok is None and "`.detach()` on line 3" in c.note and "by design" in c.note
    np.testing.assert_allclose([a for _, a, _ in c.samples], [1.0, 2.0])
    np.testing.assert_allclose([n for _, _, n in c.samples], [2.0, 4.0], rtol=1e-6)


def test_no_grad_path_in_a_loop_beyond_the_detail_limit(shell):
    shell.run_cell("import torch")
    body = (
        "t1 = torch.arange(3, dtype=torch.float32, requires_grad=True)\nwith torch.no_grad():\n    t3 = t1 * 2\n"
        "for i in range(5):\n    t3 = t3 * 0.5 + t1\nt3.sum().backward()"
    )
    (c,) = check(shell, body)
    assert c.ok is None and "torch.no_grad() on line 4" in c.note


FUZZ_EXAMPLES = int(os.environ.get("AUTOGRAD_MAGIC_GRADCHECK_FUZZ", 20))


@pytest.fixture(scope="module")
def fuzz_shell():
    from fuzz_programs import fresh_shell

    return fresh_shell()


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=bool(os.environ.get("CI")),  # CI: a fixed set; elsewhere: new cells each run
)
@given(cell=programs())
def test_fuzz_check_never_flags_torch_and_changes_nothing(fuzz_shell, cell):
    """Random cells: autograd's own gradients are never flagged, and --check leaves the same state behind."""
    from fuzz_programs import run as run_cell

    traced = run_cell(fuzz_shell, cell, traced=True)
    checked = run_cell(fuzz_shell, cell, traced=True, magic="%%autograd --quiet --check -o _gc_trace")
    t = fuzz_shell.user_ns.get("_gc_trace")
    assert {k: v for k, v in checked.namespace.items() if k != "_gc_trace"} == traced.namespace
    assert (checked.error, checked.stdout) == (traced.error, traced.stdout)
    for c in (t.gradcheck or []) if t is not None else []:
        assert c.ok is not False, (cell, c)


def test_leaf_behind_a_tensor_from_an_earlier_cell(shell):
    """h's graph (built in an earlier cell) is still whole: a is skipped (a nudge cannot change h), w is checked."""
    shell.run_cell("import torch\na = torch.tensor([1., 2.], requires_grad=True)\nh = a.exp()")
    checks = check(shell, "w = torch.tensor([3., 4.], requires_grad=True)\nloss = (h * a * w).sum()\nloss.backward(retain_graph=True)")
    by_name = {c.name: c for c in checks}
    assert by_name["a"].ok is None and "`h`, computed before this cell" in by_name["a"].note
    assert by_name["w"].ok is True  # made in this cell: nudging it is faithful


def test_graph_freed_by_the_real_run(shell):
    shell.run_cell("import torch\na = torch.tensor([1., 2.], requires_grad=True)\nh = a.exp()")
    checks = check(shell, "w = torch.tensor([3., 4.], requires_grad=True)\nloss = (h * w).sum()\nloss.backward()")
    assert checks and all(c.ok is None and "already freed" in c.note and "`h`" in c.note for c in checks)


def test_a_hook_that_changes_the_gradient_is_named_not_flagged(shell):
    """Found by the fuzzer: a hook doubling a leaf's gradient makes autograd's number differ from the
    function's slope. That is the user's hook at work, not a wrong backward: the check says so."""
    shell.run_cell("import torch")
    body = ("t1 = torch.randn((), requires_grad=True)\nt2 = t1.register_hook(lambda g: g * 2)\n"
            "with torch.no_grad():\n    t1.add_(1.5)\nt3 = t1.reshape(-1)\nt3.sum().backward()")
    ns: dict = {"torch": torch}
    exec(body, ns)
    assert ns["t1"].grad.item() == 2.0  # plain torch: the hook doubled d(sum)/dt1 = 1
    (c,) = check(shell, body)
    assert c.name == "t1" and c.ok is None
    assert "gradient hook on line 3" in c.note and "t1.register_hook" in c.note


def test_a_nan_output_is_not_checked_and_says_why(shell):
    # sqrt of a negative element: the loss is NaN, and so is every finite difference of it (fuzz-found)
    shell.run_cell("import torch")
    (c,) = check(shell, "x = torch.tensor([0.25, -1.0, 4.0], requires_grad=True)\ny = x**0.5\ny.sum().backward()")
    assert torch.isnan(shell.user_ns["y"].sum())  # the premise, in plain torch
    assert c.ok is None and "nan" in c.note and "finite differences" in c.note


def test_elements_a_nudge_takes_out_of_the_domain_are_skipped(shell):
    # sqrt at 0: the output is finite, but sqrt(0 - h) is NaN; the element at 4 checks out (d sqrt/dx = 1/4)
    shell.run_cell("import torch")
    (c,) = check(shell, "x = torch.tensor([0.0, 4.0], requires_grad=True)\ny = torch.sqrt(x).sum()\ny.backward()")
    assert c.ok is True and [i for i, _, _ in c.samples] == [1]
    assert c.samples[0][1] == pytest.approx(shell.user_ns["x"].grad[1].item())
    assert "element(s) 0 not checked" in c.note
