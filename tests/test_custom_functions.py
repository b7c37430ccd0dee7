"""A custom autograd.Function's output is recorded as made by its apply(), with its grad_fn.

`C.apply` never reaches a TorchFunctionMode: only the ops of `C.forward` do, under no_grad.
The record of the tensor forward returns would say "leaf, made under no_grad" of a tensor
that requires grad (plain torch: grad_fn is CBackward). Compared against plain torch.
"""

from __future__ import annotations

import pytest
import torch

from autograd_magic.explain.why import explain_all
from run_cells import plain, traced

FUNCTION = '''class C(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(-1, 1)
    @staticmethod
    def backward(ctx, g):
        return g * 2
w = torch.linspace(-2, 2, 9, requires_grad=True)
z = C.apply(w * 3)
(z ** 2).sum().backward()
'''
CHECKPOINT = '''import torch.utils.checkpoint as cp
torch.manual_seed(0)
blk = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
h = torch.randn(2, 4, requires_grad=True)
h2 = cp.checkpoint(blk, h, use_reentrant=True)
h2.sum().backward()
'''


@pytest.mark.parametrize("cell, name, node", [(FUNCTION, "z", "CBackward"), (CHECKPOINT, "h2", "CheckpointFunctionBackward")])
def test_a_custom_function_s_output_has_its_grad_fn_and_gradient(shell, cell, name, node):
    ns = plain(cell)
    assert ns[name].requires_grad and type(ns[name].grad_fn).__name__ == node
    t = traced(shell, cell)
    rec = t.last(name)
    assert rec.requires_grad and not rec.is_leaf and rec.grad_fn == node and rec.grad_enabled
    assert rec.line == cell.splitlines().index(next(l for l in cell.splitlines() if l.startswith(f"{name} ="))) + 2
    leaf = "w" if name == "z" else "h"
    assert torch.allclose(torch.as_tensor(t.last(leaf).attr_grad.values), ns[leaf].grad)
    assert torch.equal(shell.user_ns[leaf].grad, ns[leaf].grad)  # the run itself is the plain one
    # what reached the output in backward: d/dz of sum(z**2) is 2z, of sum(h2) ones
    expected = 2 * ns[name].detach() if name == "z" else torch.ones_like(ns[name])
    assert torch.allclose(torch.as_tensor(rec.grads[0].values), expected)
    assert "no_grad" not in " ".join(explain_all(t)[rec.id])


def test_apply_is_torch_s_own_again_after_the_cell(shell):
    original = torch.autograd.Function.__dict__["apply"]
    traced(shell, FUNCTION)
    assert torch.autograd.Function.__dict__["apply"] is original
