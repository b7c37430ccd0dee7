"""A failure in our own bookkeeping during backward() never becomes the user's error."""

from __future__ import annotations

import pytest
import torch

from autograd_magic.capture.backward import BackwardRecorder

CELL = "y = (x * x * 3).sum()\ny.backward()\ng = x.grad.clone()"


def _plain_grad() -> torch.Tensor:
    x = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    (x * x * 3).sum().backward()
    return x.grad


def _boom(*args, **kwargs):
    raise ValueError("bookkeeping broke")


@pytest.mark.parametrize("where", ["_hook_nodes", "_store", "_flush_held", "_note_new_grad", "_post"])
def test_backward_still_runs_when_our_recording_fails(shell, monkeypatch, where):
    shell.run_cell("import torch\nx = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)")
    if where == "_post":  # the hook factory itself works; the hook it makes fails inside torch's engine
        real = BackwardRecorder._post

        def failing_post(self, *a):
            hook = real(self, *a)
            hook.get = _boom  # its previews of what the node sends raise
            return hook

        monkeypatch.setattr(BackwardRecorder, "_post", failing_post)
    else:
        monkeypatch.setattr(BackwardRecorder, where, _boom)
    result = shell.run_cell(f"%%autograd -o t --quiet\n{CELL}")
    assert result.error_in_exec is None, result.error_in_exec
    assert torch.equal(shell.user_ns["g"], _plain_grad())
    t = shell.user_ns["t"]
    if where in ("_hook_nodes", "_store", "_post"):
        assert any("not recorded" in n and "bookkeeping broke" in n for n in t.notes), t.notes


def test_autograd_grad_results_failing_to_record_do_not_fail_the_call(shell, monkeypatch):
    from autograd_magic.capture import preview

    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    monkeypatch.setattr(preview.PreviewCache, "many", _boom)
    result = shell.run_cell("%%autograd -o t --quiet\n(gx,) = torch.autograd.grad((x ** 2).sum(), x)")
    assert result.error_in_exec is None
    assert torch.equal(shell.user_ns["gx"], torch.tensor([2.0, 4.0]))
