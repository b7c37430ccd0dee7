"""Issue 14, memory: snapshots for re-runs within one notebook budget, released, never on a device unasked.

Deterministic facts only (bytes a snapshot holds, which sessions hold one, what a re-run
computes against plain PyTorch); RSS figures are in bench/bench_memory_magic.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from IPython.utils.capture import capture_output

from autograd_magic.notebook.session import CellSession, snapshot_budget
from autograd_magic.variants.interventions import Toggles


@pytest.fixture
def nb(shell):
    """The shell with a fresh notebook budget (64 MB), set back afterwards."""
    budget = snapshot_budget(shell)
    for s in budget.sessions():
        s.close()
    shell.run_cell("%config AutogradMagics.snapshot_mb = 64")
    yield shell
    for s in budget.sessions():
        s.close()
    shell.run_cell("%config AutogradMagics.snapshot_mb = 64")


def traced(shell, body, options="", cell_id=None):
    """Run a `%%autograd` cell in widget mode (as a notebook does); the session the magic made."""
    made = []
    original = CellSession.run.__func__

    def spy(cls, *args, **kwargs):
        session, run = original(cls, *args, **kwargs)
        made.append(session)
        return session, run

    CellSession.run = classmethod(spy)
    try:
        with capture_output(display=True):
            result = shell.run_cell(f"%%autograd {options}\n{body}", store_history=True, cell_id=cell_id)
    finally:
        CellSession.run = classmethod(original)
    assert result.success, result.error_in_exec
    return made[-1]


def test_a_small_cell_keeps_exact_copies_counted_in_the_budget(nb):
    nb.run_cell("import torch\nx = torch.randn(1000, requires_grad=True)")
    s = traced(nb, "y = (x * 3).sum()\ny.backward()")
    assert s.can_rerun
    assert s.snapshot_nbytes == 1000 * 4  # x's value (it had no grad yet)
    assert snapshot_budget(nb).used == s.snapshot_nbytes


def test_a_cell_run_again_releases_its_previous_snapshot(nb):
    nb.run_cell("import torch\nx = torch.randn(1000, requires_grad=True)")
    first = traced(nb, "y = (x * 3).sum()", cell_id="cell-a")
    assert first.snapshot_nbytes > 0
    second = traced(nb, "y = (x * 3).sum()", cell_id="cell-a")
    assert second is not first
    assert first.snapshot_nbytes == 0 and not first.can_rerun  # replaced: released
    assert snapshot_budget(nb).used == second.snapshot_nbytes
    other = traced(nb, "z = (x * 2).sum()", cell_id="cell-b")  # another cell keeps its own
    assert second.snapshot_nbytes > 0 and other.snapshot_nbytes > 0


def test_without_cell_ids_the_oldest_snapshots_go_first_within_one_budget(nb):
    nb.run_cell("%config AutogradMagics.snapshot_mb = 1")
    nb.run_cell("import torch\n" + "\n".join(f"t{i} = torch.randn(100_000)" for i in range(4)))  # 400 KB each
    sessions = [traced(nb, f"y{i} = t{i} * 2") for i in range(4)]
    budget = snapshot_budget(nb)
    assert budget.used <= 2**20
    assert [s.snapshot_nbytes > 0 for s in sessions] == [False, False, True, True]
    assert "released to make room" in sessions[0].rerun_blocked
    assert sessions[-1].can_rerun
    for _ in range(5):  # the same cell again and again: the budget never grows
        traced(nb, "y3 = t3 * 2")
        assert budget.used <= 2**20


def test_over_the_budget_an_untouched_model_still_re_runs_exactly(nb):
    nb.run_cell("%config AutogradMagics.snapshot_mb = 0")
    nb.run_cell("import torch\ntorch.manual_seed(0)\nm = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))\n"
                "inp = torch.randn(4, 8)")
    body = "loss = m(inp).pow(2).mean()\nloss.backward()"
    state = {k: v.clone() for k, v in nb.user_ns["m"].state_dict().items()}
    s = traced(nb, body)
    assert s.snapshot_nbytes == 0 and s.can_rerun  # no grads before, weights unchanged: nothing to copy
    variant = s.rerun(Toggles(detach_names=("inp",)))  # a variant that still runs backward
    assert variant.error is None
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    plain.load_state_dict(state)
    plain(nb.user_ns["inp"]).pow(2).mean().backward()
    w = next(r for r in variant.records if r.name == "m.0.weight")
    np.testing.assert_allclose(w.attr_grad.values, plain[0].weight.grad.numpy(), rtol=1e-6)  # this run's grad only
    torch.testing.assert_close(nb.user_ns["m"][0].weight.grad, plain[0].weight.grad)  # the real run's, untouched


def test_a_gradient_accumulated_in_place_over_the_budget_turns_the_toggles_off(nb):
    nb.run_cell("%config AutogradMagics.snapshot_mb = 0")
    nb.run_cell("import torch\nm = torch.nn.Linear(256, 256)\ninp = torch.randn(4, 256)\nm(inp).sum().backward()")
    grad_before = nb.user_ns["m"].weight.grad.clone()
    s = traced(nb, "loss = m(inp).sum()\nloss.backward()")
    line = s.rerun_blocked
    assert "`m`'s gradients" in line and "snapshot budget" in line and "snapshot_mb" in line
    assert line in s.trace.notes and not s.can_rerun
    with pytest.raises(RuntimeError):
        s.rerun(Toggles(no_grad=True))
    # the real run is untouched by all this: grads accumulated as in a plain run
    inp = nb.user_ns["inp"]
    torch.testing.assert_close(nb.user_ns["m"].weight.grad, grad_before + inp.sum(0).expand(256, 256))


def test_shared_leaves_behind_an_earlier_graph_are_not_copied_over_the_budget(nb):
    nb.run_cell("%config AutogradMagics.snapshot_mb = 0")
    nb.run_cell("import torch\nm = torch.nn.Linear(64, 64)\ninp = torch.randn(4, 64)\nm(inp).sum().backward()\n"
                "loss2 = m(inp).pow(2).mean()")
    s = traced(nb, "loss2.backward()")
    assert s.snapshot_nbytes == 0
    assert "gradients" in s.rerun_blocked  # the backward accumulated into m's existing grads


def test_device_tensors_are_never_copied_without_opt_in(nb):
    nb.run_cell("import torch\nw = torch.randn(1000, device='meta', requires_grad=True)")
    s = traced(nb, "y = (w * 2).sum()\ny.backward()")
    assert s.snapshot_nbytes == 0 and not s.can_rerun
    assert "--copy-device" in s.rerun_blocked and "meta" in s.rerun_blocked
    assert s.rerun_blocked in s.trace.notes
    nb.run_cell("w.grad = None")
    allowed = traced(nb, "y = (w * 2).sum()\ny.backward()", options="--copy-device")
    assert allowed.can_rerun and allowed.snapshot_nbytes == 1000 * 4


def test_quiet_text_and_static_cells_take_no_snapshot(nb):
    nb.run_cell("import torch\nx = torch.randn(1000, requires_grad=True)")
    for option in ("--quiet", "--text", "--static"):
        with capture_output(display=True):
            nb.run_cell(f"%%autograd {option}\ny = (x * 3).sum()")
        assert snapshot_budget(nb).used == 0, option


def test_over_the_budget_a_snapshot_never_keeps_a_tensor_alive(nb):
    import gc
    import weakref

    nb.run_cell("%config AutogradMagics.snapshot_mb = 0")
    nb.run_cell("import torch\nw0 = torch.randn(1000, requires_grad=True)\nh = w0 * 2")
    ref = weakref.ref(nb.user_ns["h"])
    s = traced(nb, "y = (h * 3).sum()")
    assert s.can_rerun and id(ref()) in s._snapshot.shared and s.snapshot_nbytes == 0  # shared, not copied
    nb.run_cell("del h, y")
    gc.collect()
    assert ref() is None  # the session (still open, as a widget's is) did not keep it


def test_within_the_budget_a_rebound_input_is_kept_for_the_variant(nb):
    nb.run_cell("import torch\nw0 = torch.tensor([1., 2.], requires_grad=True)\nz = w0 * 2")
    s = traced(nb, "z = z * 3")  # rebinds the name it reads: the old z lives on in the snapshot only
    assert s.snapshot_nbytes == 2 * 4 + 2 * 4  # z kept alive, and a copy of w0, the leaf its graph reaches
    v = s.rerun(Toggles(no_grad=True))
    assert v.error is None
    out = next(r for r in v.records if r.name == "z" and not r.external)
    np.testing.assert_array_equal(out.value, (torch.tensor([1., 2.]) * 2 * 3).numpy())


def test_the_widget_shows_the_line_and_turns_its_toggles_off(nb):
    from autograd_magic.notebook.widget import make_view

    nb.run_cell("%config AutogradMagics.snapshot_mb = 0")
    nb.run_cell("import torch\nm = torch.nn.Linear(64, 64)\ninp = torch.randn(4, 64)\nm(inp).sum().backward()")
    s = traced(nb, "loss = m(inp).sum()\nloss.backward()")
    view = make_view(s, graph=False)
    assert view.payload["can_rerun"] is False
    assert s.rerun_blocked in view.payload["notes"]
    view.no_grad = True  # a click anyway: one line in the status, nothing re-run
    assert "snapshot budget" in view.status and view.variant is None
    view.close()


def test_a_cell_run_again_closes_its_previous_view(nb):
    """The old widget model goes (its comm closed), with its Trace; another cell's view stays."""
    from autograd_magic.notebook.widget import AutogradView

    views = []
    original = AutogradView.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        views.append(self)

    AutogradView.__init__ = spy
    try:
        nb.run_cell("import torch\nx = torch.randn(10, requires_grad=True)")
        traced(nb, "y = (x * 3).sum()\ny.backward()", cell_id="cell-v")
        traced(nb, "z = (x * 2).sum()", cell_id="cell-w")
        first, other = views
        traced(nb, "y = (x * 3).sum()\ny.backward()", cell_id="cell-v")
    finally:
        AutogradView.__init__ = original
    assert first.comm is None  # closed: the front end drops its model
    assert other.comm is not None and views[-1].comm is not None
    assert not first.session.can_rerun
