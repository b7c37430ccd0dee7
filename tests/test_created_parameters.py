"""A module built in the traced cell: its parameters are listed as created there, every one of them."""

from __future__ import annotations

import pytest

from autograd_magic.explain.wording import FLAG_WORDS, flags

CASES = {
    "sequential": ("model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())", "model", "torch.randn(2, 4)",
                   "out = model(inp).sum()"),
    "lstm_cell": ("model = torch.nn.LSTMCell(3, 2)", "model", "torch.randn(1, 3)", "out = model(inp)[0].sum()"),
    "encoder": ("model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)",
                "model", "torch.randn(2, 3, 8)", "out = model(inp).pow(2).mean()"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_parameter_is_shown_as_created_by_the_cell(shell, case):
    build, name, inp, loss = CASES[case]
    shell.run_cell("import torch\ntorch.manual_seed(0)\ninp = " + inp)
    shell.run_cell(f"%%autograd -o t --quiet\n{build}\n{loss}\nout.backward()").raise_error()
    t, model = shell.user_ns["t"], shell.user_ns[name]
    expected = {f"{name}.{n}": p for n, p in model.named_parameters()}
    shown: dict = {}
    for r in t.records:  # the first record of each: where it was created
        if r.name in expected:
            shown.setdefault(r.name, r)
    assert set(shown) == set(expected)  # LSTMCell.bias_hh was missing
    for pname, r in shown.items():
        assert FLAG_WORDS["external"] not in flags(r), pname
        assert r.created_by and r.line == 2, pname  # the line that built the module
        grad = expected[pname].grad
        if grad is not None:  # the gradient shown is what torch left in .grad
            assert r.attr_grad is not None and r.attr_grad.norm == pytest.approx(float(grad.norm()), rel=1e-5), pname


def test_a_parameter_from_an_earlier_cell_is_still_from_outside(shell):
    shell.run_cell("import torch\nlin = torch.nn.Linear(2, 1)")
    shell.run_cell("%%autograd -o t --quiet\nout = lin(torch.ones(1, 2)).sum()\nout.backward()").raise_error()
    weight = shell.user_ns["t"].last("lin.weight")
    assert weight.created_by is None and FLAG_WORDS["external"] in flags(weight)
