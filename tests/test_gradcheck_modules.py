"""The gradient check on a module built in an earlier cell (a small TransformerEncoder).

Its parameters are copied into the sandbox, cast to float64 there and
nudged: every one is checked, against plain PyTorch's gradients. When an
earlier cell's result ties the module to the real run, the check says so in
words (what, why, what to do) and touches nothing.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from autograd_magic.variants.snapshot import names_read

SETUP = (
    "import torch\n"
    "torch.manual_seed(0)\n"
    "layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)\n"
    "enc = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)\n"
    "X = torch.randn(2, 5, 16)"
)
BODY = "loss = enc(X).pow(2).mean()\nloss.backward()"


def check(shell, body=BODY):
    shell.user_ns.pop("t", None)
    result = shell.run_cell("%%autograd --quiet --check -o t\n" + body)
    assert result.error_in_exec is None, result.error_in_exec
    return shell.user_ns["t"].gradcheck


def params(shell) -> dict[str, torch.Tensor]:
    return {f"enc.{n}": p for n, p in shell.user_ns["enc"].named_parameters()}


def test_every_checked_parameter_agrees_with_plain_pytorch(shell):
    shell.run_cell(SETUP)
    plain = copy.deepcopy(shell.user_ns["enc"])  # the same weights, before the cell
    X = shell.user_ns["X"].clone()
    checks = check(shell)
    plain(X).pow(2).mean().backward()
    expected = {f"enc.{n}": p.grad for n, p in plain.named_parameters()}
    assert checks and all(c.ok is True for c in checks), [(c.name, c.note) for c in checks]
    for c in checks:
        g = expected[c.name].reshape(-1).numpy()
        for i, analytic, numeric in c.samples:
            assert np.isclose(analytic, g[i], rtol=1e-3, atol=1e-6), (c.name, i)
            assert np.isclose(numeric, g[i], rtol=1e-3, atol=1e-6), (c.name, i)
    for name, p in params(shell).items():  # the user's model: float32, the grads of one plain backward
        assert p.dtype == torch.float32
        assert torch.allclose(p.grad, expected[name], rtol=1e-5, atol=1e-7), name


def test_running_the_cell_again_still_checks(shell):
    shell.run_cell(SETUP)
    shell.run_cell("%%autograd --quiet\n" + BODY)  # leaves `loss` and its graph in the namespace
    checks = check(shell)
    assert checks and all(c.ok is True for c in checks), [(c.name, c.note) for c in checks]


def test_a_module_tied_to_an_earlier_result_says_why_in_words(shell):
    shell.run_cell(SETUP + "\nh = enc(X)")
    before = {n: p.detach().clone() for n, p in params(shell).items()}
    checks = check(shell, "loss = (enc(X) * h).mean()\nloss.backward(retain_graph=True)")
    assert checks
    for c in checks:
        assert c.ok is None
        assert f"`{c.name}` is a weight of `enc`" in c.note
        assert "this cell also uses `h`, computed from `enc` in an earlier cell" in c.note
        assert "compute `h` in this cell too" in c.note
        assert "RuntimeError" not in c.note and "dtype" not in c.note and "shared with the real run" not in c.note
    for n, p in params(shell).items():
        assert torch.equal(p.detach(), before[n]) and p.dtype == torch.float32


def test_a_name_the_cell_binds_first_is_not_read_from_before(shell):
    assert "loss" not in names_read(shell, "loss = f(x)\nloss.backward()")
    assert names_read(shell, "loss.backward()\nloss = 1")["loss"] == 1
    assert "loss" in names_read(shell, "if c:\n    loss = 1\nloss.backward()")  # maybe never bound
    assert "x" in names_read(shell, "x = x + 1\nprint(x)")
    assert "a" in names_read(shell, "a = 1\ndel a\nprint(a)")
    assert "b" not in names_read(shell, "a, (b, *c) = 1, (2, 3)\nprint(b)")
