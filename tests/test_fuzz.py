"""Differential fuzzing: a random cell run plain and under `%%autograd` must be indistinguishable.

Both runs share one IPython shell; the namespace is reset and the RNGs seeded
identically before each. Compared: every namespace value (exact bits, grads,
requires_grad, is_leaf, grad_fn, version counters, hooks, aliasing), printed
output, warnings and the exception (type and message). After the traced run
no mode, module hook or binding helper may be left behind.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_programs import fresh_shell, programs, run

EXAMPLES = int(os.environ.get("AUTOGRAD_MAGIC_FUZZ_EXAMPLES", 500))


@pytest.fixture(scope="module")
def ipy():
    return fresh_shell()


def _global_hooks() -> tuple:
    from torch.nn.modules import module as nn_module

    return (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks),
            len(nn_module._global_backward_hooks))


def assert_same(ipy, cell: str, magic: str = "%%autograd --quiet -o fuzz_trace") -> None:
    stack = torch._C._len_torch_function_stack()
    hooks = _global_hooks()
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True, magic=magic)
    trace = traced.namespace.pop("fuzz_trace", None) and ipy.user_ns["fuzz_trace"]
    assert "__autograd_magic_bind__" not in ipy.user_ns
    assert torch._C._len_torch_function_stack() == stack
    assert _global_hooks() == hooks
    assert torch.is_grad_enabled()
    assert traced.error == plain.error, cell
    assert traced.shown == plain.shown, cell
    assert traced.warnings == plain.warnings, cell
    assert traced.namespace.keys() == plain.namespace.keys(), cell
    for key in plain.namespace:
        assert traced.namespace[key] == plain.namespace[key], f"{key} differs in\n{cell}\n{_diff(plain.namespace[key], traced.namespace[key])}"
    if trace is not None:  # every view renders whatever the cell did
        assert isinstance(str(trace), str) and isinstance(trace.to_html(), str) and trace.to_dot().strip()
        assert not [n for n in trace.notes if "tracer skipped" in n], trace.notes


def _diff(a, b, path="") -> str:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return "; ".join(_diff(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"{path}: plain {a!r} traced {b!r}"


# Shapes that found bugs or cover a corner on purpose, kept as fixed examples.
REGRESSIONS = [
    # grad_fn / is_leaf of a no_grad view whose base changed in place raise in torch itself
    "t1 = torch.randn((), requires_grad=True)\nwith torch.no_grad():\n    t2 = t1.reshape(-1)\n"
    "t2.requires_grad_()\nwith torch.no_grad():\n    t2.add_(1.5)",
    "t1 = torch.randn((2, 3), requires_grad=True)\nt2 = t1.T\nt2.sum().backward()\nprint(t1.grad)",
    "t1 = torch.ones(3, requires_grad=True)\nt2 = t1 * 2\nt2.register_hook(lambda g: g * 2)\n"
    "t2.sum().backward()\nprint(t1.grad)",
    "t1 = torch.ones(3, requires_grad=True)\nt2 = t1 * 2\nt2.sum().backward()\nt2.sum().backward()",
    "t1 = torch.ones(3, requires_grad=True)\nt1.add_(1)",
    "t1 = torch.ones(3, requires_grad=True)\nfor i in range(5):\n    t1 = t1 * 0.5 + i\nt1",
    "t1 = torch.randn(3)\nt1.requires_grad_()\nt2 = t1[t1 > 0]\nt2.sum().backward()\nt1.grad",
    "lin0 = torch.nn.Linear(3, 2)\nt1 = torch.randn(3)\nt2 = lin0(t1)\nt2.sum().backward()\nprint(lin0.weight.grad)",
    "t1 = torch.ones(3, requires_grad=True)\nt2, = torch.autograd.grad((t1**3).sum(), [t1], create_graph=True)\n"
    "t2.sum().backward()\nprint(t1.grad)",
    "t1 = torch.ones(2, 3, requires_grad=True)\nt2 = t1 * 3\nt3 = t2[0]\nt3.mul_(2)\nt2.sum().backward()\nt1.grad",
    "t1 = torch.ones(3, requires_grad=True)\nt2 = t1.exp()\nt2.detach_()\nt2",
    "t1 = torch.ones(3, requires_grad=True)\nwith torch.no_grad():\n    t2 = t1 * 2\nprint(t2.requires_grad)\nt2",
    "t1 = torch.ones(3)\nt1 + 'a'",
    "t1 = torch.ones(3, requires_grad=True)\nt2 = t1.sum()\nt2.backward()\nt2.backward()",
    # The traceback of an error inside backward called from a function in the cell.
    "t1 = torch.ones(3, requires_grad=True)\ndef f(a):\n    return a.sum().backward()\nt2 = t1 * 2\nf(t2)\nf(t2)",
    "t1 = torch.ones(3)\nt2 = torch.nn.functional.relu(t1, 'x')",
    # inf and nan values: previews must not warn from numpy.
    "t1 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -0.0]], requires_grad=True)\nt1 = t1**-1\nt2 = t1 * 0",
    # A property that raises (a no_grad view of a base changed in place), and an error inside a module.
    "t1 = torch.randn((2, 3), requires_grad=True)\nwith torch.no_grad():\n    t2 = t1[0]\nwith torch.no_grad():\n"
    "    t1.add_(1.5)\nlin0 = torch.nn.Linear(3, 1)\nt1 = lin0(t2)",
    # A namespace tensor whose grad_fn raises when read must not break a backward.
    "t1 = torch.randn((), requires_grad=True)\nt2 = t1.exp()\nwith torch.no_grad():\n    t3 = t2.reshape(-1)\n"
    "t2.add_(1.5)\nt1.backward()\nprint(t3.grad)",
    # Inference tensors have no version counter: still recorded.
    "t1 = torch.randn((), requires_grad=True)\nwith torch.inference_mode():\n    t2 = torch.randn(3) * 2\nt3 = t2 + t1",
]


@pytest.mark.parametrize("cell", REGRESSIONS)
def test_regressions(ipy, cell):
    assert_same(ipy, cell)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),  # CI: the same 500 cells every run; elsewhere: new ones
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(cell=programs())
def test_traced_run_equals_plain_run(ipy, cell):
    assert_same(ipy, cell)


VARIANT_REGRESSIONS = [
    # The real run fails; the detached re-run gets further and warns: the warning is the variant's, not shown.
    ("t1 = torch.randn((), requires_grad=True)\nt2 = torch.randn((), requires_grad=True)\nt2 += t1\n"
     "t1.backward(retain_graph=True)\nprint(t2.grad)", "--detach t2"),
]


@pytest.mark.parametrize("cell, variant", VARIANT_REGRESSIONS)
def test_variant_regressions(ipy, cell, variant):
    assert_same(ipy, cell, magic=f"%%autograd --quiet {variant}")


@settings(
    max_examples=max(1, EXAMPLES // 10),
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(cell=programs(), variant=st.sampled_from(["--no-grad", "--detach t1", "--detach t2"]))
def test_variant_runs_leave_the_real_run_alone(ipy, cell, variant):
    """With --no-grad / --detach the view shows a sandboxed re-run; the real run is still the plain one."""
    assert_same(ipy, cell, magic=f"%%autograd --quiet {variant}")
