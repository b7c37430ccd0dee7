"""Where a tensor lost its history: `.data`, `.detach()`, torch.no_grad(), a gradient, a late
`requires_grad_()` — also when that happened in an earlier cell than the one that fails.

Students split cells: `with torch.no_grad(): y = x * 5` in one, `y.backward()` in the next.
The backward cell's own trace only knows `y` as an input; the explanation must still name the
cell and line that cut it, and never claim that `x` "never had requires_grad=True" when plain
torch says it does. Each case checks the facts the sentence relies on against plain torch.
"""

from __future__ import annotations

import pytest
import torch
from IPython.utils.capture import capture_output

from autograd_magic.explain import wording
from autograd_magic.explain.errors import explain_error
from autograd_magic.explain.why import explain_all
from run_cells import backward_order


def _run(shell, cells: list[str]) -> list:
    """Each cell through `%%autograd -o _tN --quiet`, cell by cell with real execution counts;
    the traces, and the error of the last cell if it raised."""
    shell.run_cell("import torch", store_history=True)
    traces, counts = [], []
    for i, cell in enumerate(cells):
        counts.append(shell.execution_count)
        with capture_output(display=True):
            result = shell.run_cell(f"%%autograd -o _t{i} --quiet\n{cell}", store_history=True)
        traces.append(shell.user_ns[f"_t{i}"])
        if i < len(cells) - 1:
            result.raise_error()
    return traces, counts


def _plain(cells: list[str]) -> dict:
    ns: dict = {"torch": torch}
    for cell in cells:
        exec(cell, ns)
    return ns


def _why(t, label: str) -> str:
    rec = next(r for r in t.records if r.label == label)
    return " ".join(explain_all(t)[rec.id])


NO_GRAD = ["x = torch.tensor(2.0, requires_grad=True)", "with torch.no_grad():\n    y = x * 5", "y.backward()"]
DETACH = ["x = torch.tensor([1.0, 2.0], requires_grad=True)\ny = x * 3", "z = y.detach()", "z.sum().backward()"]
REBIND = ["x = torch.tensor(2.0, requires_grad=True)\n(x ** 2).backward()",
          "with torch.no_grad():\n    x = x - 0.1 * x.grad", "(x ** 2).backward()"]


@pytest.mark.parametrize("cells, name, how, source, fix", [
    (NO_GRAD, "y", "torch.no_grad()", "`x`", "outside the torch.no_grad() block"),
    (DETACH, "z", "`.detach()`", "`y`", "drop the `.detach()`"),
    (REBIND, "x", "torch.no_grad()", "the earlier `x`", "outside the torch.no_grad() block"),
    (NO_GRAD[:2] + ["z = y + 1", "z.sum().backward()"], "z", "torch.no_grad()", "`y`", "outside the torch.no_grad() block"),
])
def test_a_backward_cell_names_the_earlier_cell_that_cut_its_tensor(shell, cells, name, how, source, fix):
    ns = _plain(cells[:-1])
    assert not ns[name].requires_grad and ns[name].grad_fn is None  # plain torch: cut
    with pytest.raises(RuntimeError):
        _plain(cells)
    traces, counts = _run(shell, cells)
    t = traces[-1]
    why = explain_error(t)
    assert t.error is not None and why is not None
    cut_line = 3 if "no_grad" in cells[1] else 2  # as the editor counts: the %%autograd line is line 1
    where = f"in cell [{counts[1]}], on line {cut_line}"
    assert how in why and where in why and fix in why, why
    assert "never had requires_grad=True" not in why
    row = _why(t, name)
    assert where in row and source in row and "never had" not in row, row


def test_data_is_a_cut_of_its_own(shell):
    """`x.data * 3` has no history although `x` requires grad: the row says `.data` cut it."""
    cell = "x = torch.tensor(2.0, requires_grad=True)\ny = x.data * 3\nz = y + x\nz.backward()"
    ns = _plain([cell])
    assert ns["x"].requires_grad and not ns["y"].requires_grad and ns["x"].grad.item() == 1.0
    (t,), _ = _run(shell, [cell])
    data = next(r for r in t.records if r.op == "data")
    assert data.inputs == [next(r.id for r in t.records if r.label == "x")] and not data.requires_grad
    assert "external" not in [r.label for r in t.records]
    assert "by `.data` on line 3" in _why(t, data.label)
    why_y = _why(t, "y")
    assert "cut from the graph by `.data`" in why_y and "never had" not in why_y, why_y
    assert t.last("x").attr_grad.values.item() == ns["x"].grad.item()


def test_a_gradient_read_in_a_later_cell_is_named_as_the_leaf_s_grad(shell):
    cells = ["x = torch.tensor(3.0, requires_grad=True)\n(x ** 2).backward()", "y = x.grad * 2"]
    ns = _plain(cells)
    assert ns["y"].item() == 2 * ns["x"].grad.item() and not ns["y"].requires_grad
    traces, _ = _run(shell, cells)
    t = traces[-1]
    labels = [r.label for r in t.records]
    assert "x.grad" in labels and "external" not in labels, labels
    assert "left in `x`" in _why(t, "x.grad")
    why_y = _why(t, "y")
    assert "`x.grad`, a gradient" in why_y and "never had" not in why_y, why_y


def test_requires_grad_switched_on_after_use_is_named(shell):
    cell = "x = torch.tensor(2.0)\ny = x * 3\nx.requires_grad_()\ny.backward()"
    with pytest.raises(RuntimeError):
        _plain([cell])
    ns = _plain(["x = torch.tensor(2.0)\ny = x * 3\nx.requires_grad_()"])
    assert ns["x"].requires_grad and not ns["y"].requires_grad
    (t,), _ = _run(shell, [cell])
    why = explain_error(t)
    assert "before requires_grad was switched on for it (by `x.requires_grad_()` on line 4)" in why, why
    assert "never had requires_grad=True" not in why


def test_a_nan_gradient_is_not_said_to_come_from_earlier_cells(shell):
    """NaN never equals NaN: the .grad torch left must still be recognised as this cell's own."""
    cell = "x = torch.tensor([0.0, 4.0], requires_grad=True)\ny = (torch.sqrt(x) * 0).sum()\ny.backward()"
    ns = _plain([cell])
    assert torch.isnan(ns["x"].grad[0]) and ns["x"].grad[1] == 0
    (t,), _ = _run(shell, [cell])
    assert "before this cell" not in _why(t, "x")


# ---- which passes a leaf's .grad adds up: a cell that resets it between them does not accumulate ----

RESET_EACH = "w = torch.tensor([1.0, 2.0], requires_grad=True)\nfor i in range(3):\n    w.grad = None\n    (w * w * i).sum().backward()"
ZERO_GRAD = ("torch.manual_seed(0)\nw = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(w.parameters(), lr=0.1)\n"
             "for i in range(3):\n    opt.zero_grad()\n    w(torch.ones(1, 2) * i).sum().backward()\n    opt.step()")
ZERO_INPLACE = ("w = torch.tensor([1.0, 2.0], requires_grad=True)\nfor i in range(3):\n    (w * w).sum().backward()\n"
                "    if i == 0:\n        w.grad.zero_()")


@pytest.mark.parametrize("cell, leaf, summed", [(RESET_EACH, "w", 1), (ZERO_GRAD, "w.weight", 1), (ZERO_INPLACE, "w", 2)])
def test_a_grad_reset_between_passes_is_not_called_a_sum_of_them_all(shell, cell, leaf, summed):
    ns = _plain([cell])
    plain_grad = (ns["w"].weight if leaf == "w.weight" else ns["w"]).grad
    (t,), _ = _run(shell, [cell])
    rec = next(r for r in t.records if r.label == leaf)
    assert len(rec.grads) == 3
    last = [torch.as_tensor(rec.grads[i].values) for i in sorted(rec.grads)[-summed:]]
    assert torch.allclose(sum(last), plain_grad)  # what torch's .grad holds: the passes since the reset
    why = _why(t, leaf)
    assert "before this cell" not in why and "is not in it" in why, why
    assert ("sum of 2 backward passes" in why) == (summed == 2) and "sum of 3" not in why, why


def test_a_grad_kept_from_an_earlier_cell_is_still_said_to_add_up(shell):
    cells = ["w = torch.tensor([1.0, 2.0], requires_grad=True)\n(w * w).sum().backward()", "(w * 3).sum().backward()"]
    ns = _plain(cells)
    assert torch.equal(ns["w"].grad, torch.tensor([2.0, 4.0]) + 3)
    traces, _ = _run(shell, cells)
    why = _why(traces[-1], "w")
    assert "accumulated by backward calls before this cell" in why and "is not in it" not in why, why


# ---- a tensor meant as the leaf that is not one; integers ----

@pytest.mark.parametrize("make", ["torch.randn(3, requires_grad=True).double()", "torch.randn(3, requires_grad=True) * 2",
                                  "torch.ones(4, requires_grad=True).view(2, 2)"])
def test_a_converted_leaf_gets_advice_that_works_in_plain_torch(shell, make):
    """`w = torch.randn(3, requires_grad=True).double()`: `w.grad` is None (not a leaf). The advice is
    code; run in plain torch, it makes `w` a leaf whose .grad the same backward fills."""
    cell = f"torch.manual_seed(0)\nw = {make}\n(w ** 2).sum().backward()"
    ns = _plain([cell])
    assert not ns["w"].is_leaf and ns["w"].retains_grad is False  # so torch keeps no .grad for it
    (t,), _ = _run(shell, [cell])
    why = _why(t, "w")
    assert "retain_grad" not in why.split("it received")[0], why
    code = why.split("in its final form: `", 1)[1].split("`", 1)[0]
    fixed = _plain([f"torch.manual_seed(0)\n{code}\n(w ** 2).sum().backward()"])
    assert fixed["w"].is_leaf and torch.allclose(fixed["w"].grad, 2 * fixed["w"].detach())
    assert torch.equal(fixed["w"].detach(), ns["w"].detach())  # the same values as the student's
    leaf = next(r for r in t.records if r.is_leaf and r.requires_grad)
    assert f"`{leaf.label}.grad`" not in _why(t, leaf.label)  # no attribute anyone could read


def test_integer_results_and_requires_grad_on_integers_are_explained_as_such(shell):
    cell = "x = torch.tensor([[1., 5.], [3., 2.]], requires_grad=True)\ni = torch.argmax(x, dim=1)\nk = x.long()\n(x * 2).sum().backward()"
    ns = _plain([cell])
    assert ns["x"].requires_grad and not ns["i"].requires_grad and ns["i"].dtype == torch.int64
    (t,), _ = _run(shell, [cell])
    for name in ("i", "k"):
        why = _why(t, name)
        assert "int64" in why and "never had" not in why, why
    with pytest.raises(RuntimeError, match="floating point"):
        _plain(["n = torch.arange(3)\nn.requires_grad_()"])
    (t,), _ = _run(shell, ["n = torch.arange(3)\nn.requires_grad_()"])
    why = explain_error(t)
    assert why is not None and "integers" in why and ".float()" in why, why
    assert "requires_grad_() before using it" not in _why(t, "n")


def test_complex_gradients_are_summed_with_their_imaginary_parts_and_warn_nothing(shell, recwarn):
    cell = ("zc = torch.tensor([1 + 2j, 3 - 1j], requires_grad=True)\n(zc * zc.conj()).real.sum().backward()\n"
            "(zc * 1j).real.sum().backward()")
    ns = _plain([cell])
    assert ns["zc"].grad.imag.abs().sum() > 0  # what the check must not drop
    (t,), _ = _run(shell, [cell])
    why = _why(t, "zc")
    assert "sum of 2 backward passes" in why and "before this cell" not in why, why
    assert not [w for w in recwarn if "ComplexWarning" in type(w.message).__name__], [str(w.message) for w in recwarn]


def test_the_text_view_marks_what_torch_keeps_in_no_grad(shell):
    """A non-leaf's row shows what reached it; torch's `.grad` stays None: the text view says so."""
    from autograd_magic.render.text import render_text
    from autograd_magic.explain.wording import grad_phrase

    cell = "x = torch.tensor(2., requires_grad=True)\ny = x * 3\nz = y * y\nz.backward()"
    ns = _plain([cell])
    assert ns["y"].retains_grad is False and not ns["y"].is_leaf  # .grad None in plain torch
    (t,), _ = _run(shell, [cell])
    row = next(line for line in render_text(t).splitlines() if "y = x * 3" in line)
    assert f"{2 * ns['y'].item():g}." in row and "(received; .grad None)" in row, row
    x_row = next(line for line in render_text(t).splitlines() if "x = torch.tensor" in line)
    assert "received" not in x_row  # a leaf's value is its .grad
    cell = "x = torch.tensor(3.0, requires_grad=True)\ny = x ** 3\n(g,) = torch.autograd.grad(y, x)"
    assert _plain([cell])["x"].grad is None
    (t,), _ = _run(shell, [cell])
    assert "autograd.grad returned it" in grad_phrase(t.last("x"), t)


def test_a_module_s_parameter_is_changed_by_the_optimizer_step_not_by_its_own_initialisation(shell):
    cell = ("torch.manual_seed(0)\nlin = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(lin.parameters(), lr=0.1)\n"
            "for i in range(2):\n    opt.zero_grad()\n    lin(torch.ones(1, 2)).sum().backward()\n    opt.step()")
    ns = _plain([cell])
    torch.manual_seed(0)
    fresh = torch.nn.Linear(2, 1)
    assert not torch.equal(ns["lin"].weight, fresh.weight)  # the steps changed it in place
    (t,), _ = _run(shell, [cell])
    why = _why(t, "lin.weight")
    assert "modified in place by `opt.step()` on line 8" in why and "by `torch.nn.Linear(2, 1)`" not in why, why
    assert why.count("modified in place") == 1, why  # one sentence for the step line, not one per run


def _first_zeroing_node(cell: str, root_expr: str) -> str:
    """Plain torch: the first node (in the order the engine ran them) that received a nonzero
    gradient and sent only zeros."""
    ns = _plain([cell])
    for node, sent, received in backward_order(eval(root_expr, ns)):
        if any(g is not None and g.any() for g in received) and all(g is None or not g.any() for g in sent):
            return type(node).__name__
    raise AssertionError("no node zeroed the gradient")


@pytest.mark.parametrize("setup, root", [
    ("x = torch.tensor(0., requires_grad=True)", "x.abs()"),
    ("x = torch.tensor(0., requires_grad=True)", "x ** 2"),
    ("x = torch.tensor([-1., -2.], requires_grad=True)", "torch.relu(x * 3).sum()"),
    ("x = torch.tensor([1.4, 2.6], requires_grad=True)", "torch.round(x).sum()"),
])
def test_a_zero_gradient_names_the_node_where_it_became_zero(shell, setup, root):
    node = _first_zeroing_node(setup, root)
    (t,), _ = _run(shell, [f"{setup}\n({root}).backward()"])
    assert not t.last("x").attr_grad.values.any()
    why = _why(t, "x")
    assert f"zero everywhere: {node}" in why, (node, why)
    assert "relu or clamp" not in why or node.startswith("Relu")


def test_an_input_an_earlier_cell_made_says_which_cell_and_line(shell):
    from autograd_magic.explain.wording import flags
    from autograd_magic.render.html import render_html
    from autograd_magic.render.payload import build_payload

    cells = ["a = 1\nx = torch.tensor(2.0, requires_grad=True)", "y = x ** 2", "y.backward()"]
    ns = _plain(cells)
    assert ns["x"].grad.item() == 4.0
    traces, counts = _run(shell, cells)
    t = traces[-1]
    x = t.last("x")
    assert x.external and x.attr_grad.values.item() == 4.0
    where = f"from cell [{counts[0]}], line 3"  # the editor's count: %%autograd is line 1
    assert where in flags(x) and "from outside the cell" not in flags(x)
    assert where in render_html(t)
    rows = [row for line in build_payload(t)["lines"] for row in line.get("rows", [])]
    assert any(row.get("made_in") == where for row in rows), build_payload(t)["lines"]
    plain_input = traces[1].last("x")  # the second cell: x from the first
    assert where in flags(plain_input)


# ---- what .grad became after the last recorded pass ----

TRAILING_RESET = ("w = torch.tensor([1.0, 2.0], requires_grad=True)\nopt = torch.optim.SGD([w], lr=0.1)\n"
                  "for mb in range(2):\n    (w * w).sum().backward()\nopt.step()\nopt.zero_grad()")
KEEP_ZEROED = ("w = torch.tensor([1.0, 2.0], requires_grad=True)\nopt = torch.optim.SGD([w], lr=0.1)\n"
               "for i in range(3):\n    opt.zero_grad(set_to_none=False)\n    (w * w).sum().backward()\n    opt.step()")
LONG_LOOP = ("torch.manual_seed(0)\nm = torch.nn.Linear(3, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
             "x = torch.randn(8, 3)\nfor i in range(10):\n    opt.zero_grad()\n    m(x).pow(2).mean().backward()\n"
             "    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)\n    opt.step()")


def test_a_grad_reset_after_the_last_pass_is_said_to_be_none(shell):
    assert _plain([TRAILING_RESET])["w"].grad is None
    (t,), _ = _run(shell, [TRAILING_RESET])
    why = _why(t, "w")
    assert "reset to None after" in why and "it is None after the cell" in why and "is the sum of" not in why, why


def test_zero_grad_that_keeps_zeros_does_not_switch_requires_grad_on(shell):
    ns = _plain([KEEP_ZEROED])
    (t,), _ = _run(shell, [KEEP_ZEROED])
    rec = next(r for r in t.records if r.label == "w")  # its first record: the one the passes reached
    assert torch.allclose(torch.as_tensor(rec.grads[max(rec.grads)].values), ns["w"].grad)
    whys = " ".join(" ".join(v) for v in explain_all(t).values())
    assert "switched on" not in whys and "sum of 3" not in whys, whys


def test_a_long_loop_that_resets_says_its_grad_is_what_the_last_unrecorded_pass_left(shell):
    ns = _plain([LONG_LOOP])
    (t,), _ = _run(shell, [LONG_LOOP])
    rec = next(r for r in t.records if r.label == "m.weight")
    assert len(rec.grads) == 3 and torch.allclose(torch.as_tensor(rec.attr_grad.values), ns["m"].weight.grad)
    why = _why(t, "m.weight")
    assert "were not recorded in detail; what the last of them left" in why, why


def test_what_a_custom_function_s_forward_returned_points_at_apply_s_row(shell):
    cell = ("class Split(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n        return x * 2, x * 3\n"
            "    @staticmethod\n    def backward(ctx, ga, gb):\n        return ga * 2 + gb * 3\n"
            "x = torch.tensor([1.0, 2.0], requires_grad=True)\na, b = Split.apply(x)\n(a.sum() + b.sum()).backward()")
    ns = _plain([cell])
    assert ns["a"].requires_grad and type(ns["a"].grad_fn).__name__ == "SplitBackward"
    (t,), _ = _run(shell, [cell])
    inner = next(r for r in t.records if r.expr == "x * 2")
    why = _why(t, inner.label)
    assert "is what `Split.forward` returned" in why and "`a` (line 10)" in why and "no gradient flows" not in why, why


def test_an_input_from_an_untraced_cell_names_every_way_it_can_have_lost_its_history(shell):
    """Nothing recorded how an untraced cell made it: the row must not claim one cause it cannot know."""
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)\nwith torch.no_grad():\n    y = x * 2",
                   store_history=True).raise_error()
    assert not shell.user_ns["y"].requires_grad and shell.user_ns["x"].requires_grad
    (t,), _ = _run(shell, ["z = y * 3"])
    why = _why(t, "y")
    assert "torch.no_grad()" in why and "Trace that cell too" in why, why


@pytest.mark.parametrize("switch", ["x2.requires_grad_()", "x2.requires_grad = True"])
def test_requires_grad_switched_on_by_the_first_use_in_the_cell_shows_the_flag_before_it(shell, switch):
    """`x2` from an earlier cell, first used by `x2.requires_grad_()` (or the attribute set): its row
    shows x2 as the cell found it, the flag off as plain torch has it before the line; the switch's
    row shows it on, and the sentence says the row is from before the switch."""
    cells = ["x2 = torch.ones(3)", f"{switch}\ny = (x2 * 3).sum()\ny.backward()"]
    (_, t), _ = _run(shell, cells)
    ns = _plain(cells[:1])
    row = next(r for r in t.records if r.external and r.name == "x2")
    assert row.requires_grad is ns["x2"].requires_grad is False  # before the line, plain torch: off
    on = next(r for r in t.records if r.inplace and r.mutates == row.id)
    assert on.op == "requires_grad_" and on.requires_grad is ns["x2"].requires_grad_().requires_grad is True
    why = " ".join(explain_all(t)[row.id])
    assert "this row shows `x2` before that" in why and "(.grad is None)" not in why, why
    assert shell.user_ns["x2"].grad.tolist() == [3.0, 3.0, 3.0]


def test_requires_grad_switched_off_by_the_attribute_is_a_row_and_the_reason(shell):
    """`w.requires_grad = False`: recorded as the switch it is; `w` got no gradient because of it."""
    cells = ["w = torch.tensor([1., 2.], requires_grad=True)\nb = torch.tensor([3., 4.], requires_grad=True)",
             "w.requires_grad = False\ny = (w * b).sum()\ny.backward()"]
    (_, t), _ = _run(shell, cells)
    ns = _plain(cells)
    assert ns["w"].grad is None and ns["b"].grad is not None
    row = next(r for r in t.records if r.external and r.name == "w")
    off = next(r for r in t.records if r.inplace and r.mutates == row.id)
    assert row.requires_grad is True and off.requires_grad is ns["w"].requires_grad is False
    assert wording.statement_of(off) == "w.requires_grad = False"
    why = " ".join(explain_all(t)[row.id])
    assert "`w.requires_grad = False` on line 2 switched its requires_grad off" in why, why
    assert "does not depend on it" not in why, why
    assert "never had requires_grad=True" not in " ".join(explain_all(t)[off.id])


@pytest.mark.parametrize("change", ["with torch.no_grad():\n    w -= 0.1 * w.grad", "w.data.mul_(3)",
                                    "with torch.no_grad():\n    w.add_(1)", "w.data = w.data * 0.5"])
def test_a_tensor_from_an_earlier_cell_changed_in_place_shows_its_values_before_and_after(shell, change):
    """The cell after the backward cell updates `w` in place (a manual SGD step): `w`'s row has the
    values plain torch had before the line, the in-place row those after it."""
    cells = ["w = torch.ones(3, requires_grad=True)\n(w * torch.arange(3.0)).sum().backward()", change]
    (_, t), _ = _run(shell, cells)
    before = _plain(cells[:1])["w"].detach().clone()
    after = _plain(cells)["w"].detach()
    assert not torch.equal(before, after)  # the line does change it
    row = next(r for r in t.records if r.name == "w" and r.external)
    change_row = [r for r in t.records if r.inplace][-1]  # of `w`, or of `w.data` (the same memory)
    assert row.preview.values.tolist() == before.tolist()
    assert change_row.preview.values.tolist() == after.tolist()
    assert shell.user_ns["w"].tolist() == after.tolist()  # the cell ran as plain


@pytest.mark.parametrize("call", ["torch.mul(a, b, out=c)", "torch.add(c, b, alpha=2, out=c)", "torch.clamp(b, max=15.0, out=c)"])
def test_a_call_writing_into_out_changes_that_tensor_in_place(shell, call):
    """`torch.mul(a, b, out=c)` changes `c` in place though no `_` names it: `c`'s row from the
    earlier cell has the values plain torch had before the line, the call's row those after it,
    marked in-place and shown as its own statement (no `c = ` the line does not have)."""
    cells = ["a = torch.tensor([1., 2., 3.])\nb = torch.tensor([10., 20., 30.])\nc = a * 2", f"{call}\nd = c + 1"]
    (_, t), _ = _run(shell, cells)
    before = _plain(cells[:1])["c"].clone()
    ns = _plain(cells)
    assert not torch.equal(before, ns["c"])  # the line does change it
    row = next(r for r in t.records if r.name == "c" and r.external)
    change = next(r for r in t.records if r.inplace)
    assert row.preview.values.tolist() == before.tolist()
    assert change.inplace and change.mutates == row.id
    assert change.preview.values.tolist() == ns["c"].tolist()
    assert next(r for r in t.records if r.name == "d").preview.values.tolist() == ns["d"].tolist()
    assert wording.statement_of(change) == call
    assert shell.user_ns["c"].tolist() == ns["c"].tolist()  # the cell ran as plain


def test_a_tensor_of_the_cell_written_through_out_is_marked_changed_later(shell):
    cells = ["a = torch.tensor([1., 2.])\nc = torch.zeros(2)\ntorch.add(a, 1, out=c)"]
    (t,), _ = _run(shell, cells)
    ns = _plain(cells)
    zeros = next(r for r in t.records if r.name == "c" and not r.inplace)
    assert zeros.preview.values.tolist() == [0.0, 0.0] and zeros.version_changed
    assert [r for r in t.records if r.inplace][-1].preview.values.tolist() == ns["c"].tolist()


@pytest.mark.parametrize("make", ["w = torch.nn.Parameter(torch.tensor([1., 2.]))\nopt = torch.optim.SGD([w], lr=0.5)",
                                  "torch.manual_seed(0)\nm = torch.nn.Linear(2, 1)\nw = m.weight\nopt = torch.optim.SGD(m.parameters(), lr=0.5)"])
def test_a_parameter_an_optimizer_step_updates_shows_its_values_from_before_the_cell(shell, make):
    """A parameter first seen in the cell by `opt.step()`'s in-place update is the earlier cell's,
    not one a module's __init__ fills: its row has the values before the step (not the step's
    result) and is not said to be created by the step."""
    cells = [make + "\n(w * w).sum().backward()" if "Linear" not in make else make + "\nm(torch.ones(1, 2)).sum().backward()",
             "opt.step()"]
    (_, t), _ = _run(shell, cells)
    before = _plain(cells[:1])["w"].detach().clone()
    after = _plain(cells)["w"].detach()
    assert not torch.equal(before, after)
    row = next(r for r in t.records if r.external and r.name in ("w", "m.weight"))
    assert row.preview.values.tolist() == before.tolist()
    assert row.created_by is None and row.line is None  # from outside the cell
    update = next(r for r in t.records if r.inplace and r.mutates == row.id)
    assert update.preview.values.tolist() == after.tolist() and update.in_step
