"""Why-explanations, each triggered by a real %%autograd cell that produces the situation."""

from __future__ import annotations

import pytest

from autograd_magic.explain.errors import explain_error
from autograd_magic.explain.why import explain_all, explain_record


def run(shell, body: str, setup: str = "import torch", raises: bool = False):
    shell.run_cell(setup)
    shell.user_ns.pop("t", None)
    result = shell.run_cell("%%autograd --quiet -o t\n" + body)
    assert (result.error_in_exec is not None) == raises, result.error_in_exec
    return shell.user_ns["t"]


def about(t, name: str) -> str:
    rec = t.last(name)
    assert rec is not None, name
    return " ".join(explain_record(t, rec.id))


def test_non_leaf_without_retain_grad_shows_what_it_received(shell):
    # editor lines: 1 is %%autograd, so the body starts on line 2
    t = run(shell, "x = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)\ny = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()")
    text = about(t, "y")
    assert "`y` (line 3) is not a leaf" in text
    assert "y.retain_grad()" in text
    assert "backward call on line 6" in text
    assert "[[3.3333, 5.3333, 7.3333], [7.3333, 5.3333, 3.3333]]" in text  # the gradient it received
    assert "`x` is a leaf" in about(t, "x") and "[[10., 16., 22.], [22., 16., 10.]]" in about(t, "x")
    assert shell.user_ns["y"].grad is None  # what the explanation promises


def test_retain_grad_is_acknowledged(shell):
    t = run(shell, "x = torch.ones(2, requires_grad=True)\ny = x * 4\ny.retain_grad()\ny.sum().backward()")
    text = about(t, "y")
    assert "retain_grad() was called" in text and "[1., 1.]" in text


def test_requires_grad_never_set(shell):
    t = run(shell, "a = torch.tensor([3.0, 2.0], requires_grad=True)\nb = torch.tensor([4.0, 7.0])\nres = (a * b).sum()\nres.backward()")
    text = about(t, "b")
    assert "requires_grad was never set on `b` (line 3)" in text
    assert shell.user_ns["b"].grad is None


def test_created_under_no_grad(shell):
    t = run(shell, "w = torch.ones(3, requires_grad=True)\nwith torch.no_grad():\n    y = w * 2\nz = y.sum()")
    text = about(t, "y")
    assert "torch.no_grad() on line 4" in text and "`w`" in text
    assert "cut from the graph by torch.no_grad()" in about(t, "z") and "line 4" in about(t, "z")
    assert not shell.user_ns["y"].requires_grad


def test_cut_by_detach(shell):
    t = run(shell, "w = torch.ones(3, requires_grad=True)\nh = w * 2\nd = h.detach()\nl = (d * w).sum()\nl.backward()")
    assert "`.detach()` on line 4" in about(t, "d") and "from `h`" in about(t, "d")
    assert "its use on line 4 (`h.detach()`) goes through `.detach()`" in about(t, "h")
    assert shell.user_ns["w"].grad.tolist() == [2.0, 2.0, 2.0]


def test_backward_on_non_scalar(shell):
    t = run(shell, "x = torch.ones(3, requires_grad=True)\ny = x * 2\ny.backward()", raises=True)
    text = explain_error(t)
    assert "grad can be implicitly created only for scalar outputs" in text
    assert "line 4" in text and "`y` has shape (3,)" in text
    assert "raised an error before any gradient got here" in about(t, "x")


def test_backward_on_tensor_without_grad_seed_003(shell, seeds):
    cells = seeds.NOTEBOOKS["003"]
    for cell in cells[:9]:
        shell.run_cell(cell)
    t = run(shell, cells[9], setup="pass", raises=True)  # z.backward() where z came from torch.randn(4)
    text = explain_error(t)
    assert "element 0 of tensors does not require grad" in text
    assert "line 2" in text and "`z`" in text and "never had requires_grad=True" in text


def test_backward_on_tensor_without_grad_in_cell(shell):
    t = run(shell, "x = torch.randn(4)\ny = x + 2\nz = (y*y*2).mean()\nz.backward()", raises=True)
    text = explain_error(t)
    assert "line 5" in text and "`z`" in text
    assert "computed from `x`, which never had requires_grad=True" in text


def test_backward_twice(shell):
    t = run(shell, "x = torch.ones(3, requires_grad=True)\ny = x.exp().sum()\ny.backward()\ny.backward()", raises=True)
    text = explain_error(t)
    assert "backward through the graph a second time on line 5" in text
    assert "retain_graph=True to the call on line 4" in text


def test_inplace_change_of_saved_tensor(shell):
    t = run(shell, "x = torch.ones(3, requires_grad=True)\ny = x.exp()\ny += 1\ny.sum().backward()", raises=True)
    text = explain_error(t)
    assert "modified by an inplace operation" in text
    assert "`y` (line 3)" in text and "`y += 1` on line 4" in text
    first_y = t.by_name("y")[0]
    assert "later modified in place by `y += 1` on line 4" in " ".join(explain_record(t, first_y.id))
    assert "`y += 1` on line 4 changed `y` in place" in about(t, "y")


def test_inplace_on_leaf_that_requires_grad(shell):
    t = run(shell, "x = torch.ones(3, requires_grad=True)\nx += 1", raises=True)
    text = explain_error(t)
    assert "leaf Variable that requires grad" in text
    assert "line 3" in text and "`x`" in text and "torch.no_grad()" in text


def test_accumulated_over_several_backward_calls(shell):
    t = run(shell, "w = torch.ones(3, requires_grad=True)\n(w*2).sum().backward()\n(w*3).sum().backward()")
    text = about(t, "w")
    assert "sum of 2 backward passes" in text
    assert "line 3" in text and "[2., 2., 2.]" in text and "line 4" in text and "[3., 3., 3.]" in text
    assert shell.user_ns["w"].grad.tolist() == [5.0, 5.0, 5.0]


def test_accumulated_across_cells(shell):
    shell.run_cell("import torch\nw = torch.ones(2, requires_grad=True)\n(w*2).sum().backward()")
    t = run(shell, "(w*3).sum().backward()", setup="pass")
    text = about(t, "w")
    assert "[3., 3.]" in text and "[5., 5.]" in text and "before this cell" in text


def test_no_error_no_explanation_and_all_records_covered(shell):
    t = run(shell, "x = torch.ones(2, requires_grad=True)\ny = (x * x).sum()\ny.backward()")
    assert explain_error(t) is None
    everything = explain_all(t)
    assert set(everything) == {r.id for r in t.records}
    assert all(everything.values())


@pytest.mark.parametrize("body", ["x = torch.ones(2)\nprint(x.shape[5])"])
def test_unrelated_error_has_no_explanation(shell, body):
    t = run(shell, body, raises=True)
    assert explain_error(t) is None


def test_requires_grad_switched_on_later(shell, seeds):
    t = run(shell, seeds.NOTEBOOKS["004"][2])
    first_x = t.by_name("x")[0]
    text = " ".join(explain_record(t, first_x.id))
    assert "switched on later, by `x.requires_grad_()` on line 9" in text
    flip = next(r for r in t.records if r.op == "requires_grad_" and r.name == "x")
    assert "switched on requires_grad for `x`" in " ".join(explain_record(t, flip.id))
    no_grad = [r for r in t.records if r.expr == "x + 10" and not r.grad_enabled]
    assert no_grad and "torch.no_grad() on line 24" in " ".join(explain_record(t, no_grad[0].id))


def test_autograd_grad_does_not_fill_dot_grad(shell):
    t = run(shell, "x = torch.tensor([1.,2.], requires_grad=True)\ny = (x**3).sum()\n(g,) = torch.autograd.grad(y, x, create_graph=True)\ng.sum().backward()")
    text = about(t, "x")
    assert "torch.autograd.grad call on line 4" in text and "returned [ 3., 12.]" in text
    assert "does not change `x.grad`" in text
    assert "backward call on line 5" in text and "put [ 6., 12.] into `x.grad`" in text
    assert "sum of" not in text  # autograd.grad does not accumulate
    assert shell.user_ns["x"].grad.tolist() == [6.0, 12.0]


def test_computed_after_the_last_backward(shell, seeds):
    t = run(shell, seeds.NOTEBOOKS["001"][5])
    late = [r for r in t.records if r.line == 11]
    assert late, [(r.line, r.expr) for r in t.records]
    for r in late:
        assert "computed on line 11, after the last backward call (line 9)" in " ".join(explain_record(t, r.id))


def test_tensor_from_an_earlier_cell_without_grad(shell):
    shell.run_cell("import torch\nq = torch.randn(3)")
    t = run(shell, "loss = (q * 2).sum()\nloss.backward()", setup="pass", raises=True)
    assert "comes from before this cell with requires_grad=False" in about(t, "q")
    assert "computed from `q`, which never had requires_grad=True" in explain_error(t)


VARIANT_CELL = "x = torch.tensor([1., 2.], requires_grad=True)\ny = x * 3\nz = (y * x).sum()\nz.backward()"


def test_detach_variant(shell):
    t = run(shell, VARIANT_CELL, setup="import torch")
    shell.user_ns.pop("t", None)
    shell.run_cell("%%autograd --quiet -o t --detach y\n" + VARIANT_CELL)
    v = shell.user_ns["t"]
    assert v.variant_of is not None
    text = about(v, "y")
    assert "`y` (line 3) was detached in this variant" in text and "retain_grad" not in text
    assert "put [3., 6.] into `x.grad`" in about(v, "x")  # only the direct path: y*x with y cut gives y = 3x
    assert "put [ 6., 12.] into `x.grad`" in about(t, "x")  # the real run: d(3x·x)/dx = 6x


def test_no_grad_variant(shell):
    shell.run_cell("import torch")
    shell.user_ns.pop("t", None)
    shell.run_cell("%%autograd --quiet -o t --no-grad\n" + VARIANT_CELL)
    v = shell.user_ns["t"]
    text = explain_error(v)
    assert "line 5" in text and "`z` (line 4) does not require grad because the whole cell ran under torch.no_grad()" in text
    assert "whole cell ran under torch.no_grad() in this variant" in text and "Set requires_grad=True" not in text
    assert "whole cell ran under torch.no_grad() in this variant" in about(v, "y")


def test_numpy_of_a_tensor_that_requires_grad(shell):
    t = run(shell, "w = torch.ones(3, requires_grad=True)\nh = w * 2\nprint(h.numpy())", raises=True)
    text = explain_error(t)
    assert "`print(h.numpy())` on line 4" in text and "`h`" in text and "h.detach().numpy()" in text


def test_integer_tensor_cannot_require_grad(shell):
    t = run(shell, "x = torch.tensor([1, 2, 3], requires_grad=True)", raises=True)
    text = explain_error(t)
    assert "line 2" in text and "integers" in text and "`1.` instead of `1`" in text


def test_autograd_grad_unused_input(shell):
    t = run(shell, "x = torch.ones(2, requires_grad=True)\nu = torch.ones(2, requires_grad=True)\ng = torch.autograd.grad((x * 2).sum(), [x, u])", raises=True)
    text = explain_error(t)
    assert "line 4" in text and "`u` was not used" in text and "allow_unused=True" in text


def test_retain_grad_on_tensor_without_grad(shell):
    t = run(shell, "a = torch.ones(2)\nb = a * 3\nb.retain_grad()", raises=True)
    text = explain_error(t)
    assert "`b.retain_grad()` on line 4" in text and "`b` does not require grad" in text
    assert "computed from `a`, which never had requires_grad=True" in text


def test_inplace_on_a_view_of_a_leaf(shell):
    t = run(shell, "x = torch.ones(2, requires_grad=True)\nx[0] = 5", raises=True)
    text = explain_error(t)
    assert "`x[0] = 5` on line 3 changes a view of a leaf Variable" in text and "`x` is a leaf" in text


def test_nan_and_inf_gradients_traced_to_their_node(shell):
    t = run(shell, "x = torch.tensor([0., 4.], requires_grad=True)\nr = torch.sqrt(x)\nloss = (r * 2).sum()\nloss.backward()")
    text = about(t, "x")
    assert "contains nan or inf" in text and "SqrtBackward0 for `r` (line 3)" in text
    assert shell.user_ns["x"].grad[0].item() == float("inf")


def test_zero_gradient_everywhere(shell):
    t = run(shell, "x = torch.tensor([-1., -2.], requires_grad=True)\nloss = torch.relu(x).sum()\nloss.backward()")
    assert "zero everywhere" in about(t, "x")
    t = run(shell, "x = torch.tensor([1., 2.], requires_grad=True)\nloss = torch.relu(x).sum()\nloss.backward()")
    assert "zero everywhere" not in about(t, "x")


def test_a_leafs_grad_read_after_backward_is_said_to_be_made_by_that_call(shell):
    # the classic manual update: `w.grad` is what the cell's own loss.backward() put there
    body = "w = torch.ones(2, requires_grad=True)\nloss = (w * 2).sum()\nloss.backward()\nw.data -= 0.1 * w.grad\nw2 = w * 1"
    t = run(shell, body)
    text = about(t, "w.grad")
    assert "made by the backward call on line 4 (`loss.backward()`)" in text, text
    assert "before this cell" not in text
    assert not shell.user_ns["w"].grad.requires_grad and shell.user_ns["w"].grad.grad_fn is None  # as it says


def test_what_autograd_grad_returned_is_said_to_be_made_by_that_call(shell):
    import torch

    t = run(shell, "x = torch.tensor(3.0, requires_grad=True)\ny = x ** 2\n(g,) = torch.autograd.grad(y, x)\nz = g * 2")
    text = about(t, "g")
    assert "made by the torch.autograd.grad call on line 4" in text and "before this cell" not in text, text
    rec = t.last("g")
    assert rec.line == 4 and not rec.requires_grad
    x = torch.tensor(3.0, requires_grad=True)
    (g,) = torch.autograd.grad(x ** 2, x)
    assert float(rec.preview.values) == float(g) and not g.requires_grad  # plain torch's


def test_a_value_torch_prints_with_a_trailing_point_ends_the_sentence_once(shell):
    t = run(shell, "x = torch.tensor(3.0, requires_grad=True)\ny = x ** 2\n(g,) = torch.autograd.grad(y, x)")
    text = about(t, "y")
    assert "it received 1." in text and ".." not in text, text


@pytest.mark.parametrize("body, name, reason", [
    ("x = torch.ones(3, requires_grad=True)\ny = x * 2\nx.grad.zero_()", "x", "no backward() ran in this cell"),
    ("x = torch.ones(3, requires_grad=True)\nh = x * 2\nh.sum().backward()\nprint(h.grad.sum())", "h",
     "Call h.retain_grad() before backward()"),
    ("w = torch.ones(3, requires_grad=True)\nb = torch.ones(3, requires_grad=True)\nloss = (w * 2).sum()\n"
     "loss.backward()\nwith torch.no_grad():\n    b -= 0.1 * b.grad", "b", "no backward pass in this cell reached it"),
    ("m = torch.nn.Linear(2, 1)\nout = m(torch.ones(1, 2))\nprint(m.weight.grad.norm())", "m.weight",
     "no backward() ran in this cell"),
])
def test_a_grad_that_is_none_where_the_line_uses_it_is_explained(shell, body, name, reason):
    import torch

    ns: dict = {"torch": torch}
    with pytest.raises((AttributeError, TypeError)) as plain:  # plain torch fails the same way
        exec(body, ns)
    t = run(shell, body, raises=True)
    assert t.error.type == type(plain.value).__name__
    text = explain_error(t)
    assert text is not None and f"uses `{name}.grad`, which is None there." in text and reason in text, text


def test_a_none_that_is_not_a_grad_gets_no_autograd_explanation(shell):
    t = run(shell, "x = None\nx.foo", raises=True)
    assert explain_error(t) is None


def test_the_text_view_gives_the_errors_explanation_under_it(shell):
    from autograd_magic.render.text import render_text

    t = run(shell, "x = torch.ones(3)\ny = (x * 2).sum()\ny.backward()", raises=True)
    lines = render_text(t).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("error at line 4: RuntimeError"))
    assert lines[at + 1] == "why: " + explain_error(t)


def test_backward_of_a_complex_scalar_is_explained_as_not_real(shell):
    import torch

    body = "z = torch.tensor(1 + 2j, requires_grad=True)\nw = z * z\nw.backward()"
    with pytest.raises(RuntimeError, match="only for real scalar outputs"):  # plain torch
        exec(body, {"torch": torch})
    t = run(shell, body, raises=True)
    text = explain_error(t)
    assert "not real: `w` is torch.complex64" in text and "more than one element" not in text, text


def test_what_a_tensor_received_in_a_backward_call_that_raised_says_the_call_raised(shell):
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)\ny = x ** 2\nz = 3 * y\nz.backward()")
    t = run(shell, "z.backward()", raises=True)  # the graph's saved values were freed by the first call
    text = about(t, "z")
    assert "In the backward call on line 2 (`z.backward()`), which then raised an error, it received 1." in text, text


def test_an_updated_leafs_grad_is_said_to_come_from_this_cells_backward(shell):
    # the manual SGD step: the updated `w`'s .grad is what loss.backward() on line 4 put there
    import torch

    body = "w = torch.ones(3, requires_grad=True)\nloss = (w * 2).sum()\nloss.backward()\nwith torch.no_grad():\n    w -= 0.1 * w.grad"
    ns: dict = {"torch": torch}
    exec(body, ns)
    t = run(shell, body)
    updated = t.last("w")
    assert updated.line == 6 and updated.mutates is not None
    text = " ".join(explain_record(t, updated.id))
    assert "was put there by the backward call on line 4 (`loss.backward()`), which reached `w` before line 6" in text, text
    assert "before this cell" not in text
    assert ns["w"].grad.tolist() == [2.0, 2.0, 2.0] and "[2., 2., 2.]" in text  # plain torch's .grad


def test_assigning_data_is_a_row_whose_values_later_lines_read(shell):
    """`w.data = w.data - lr * w.grad` (a manual SGD step) replaces w's values behind autograd's back:
    the view shows it as a change of `w` in place, with the values plain torch has after the line,
    and the next line's op reads that row, not the old one."""
    import torch

    body = ("w = torch.ones(3, requires_grad=True)\nloss = (w * 2).sum()\nloss.backward()\n"
            "w.data = w.data - 0.1 * w.grad\nz = (w * 3).sum()")
    ns: dict = {"torch": torch}
    exec(body, ns)
    t = run(shell, body)
    first, change = t.by_name("w")[0], next(r for r in t.records if r.op == "data_")
    assert change.inplace and change.mutates == first.id and change.name == "w"
    assert change.preview.values.tolist() == ns["w"].tolist()  # the values after the line, as torch has them
    assert first.preview.values.tolist() == [1.0, 1.0, 1.0] and first.version_changed
    use = next(r for r in t.records if r.expr == "w * 3")
    assert use.inputs == [change.id] and use.preview.values.tolist() == (ns["w"] * 3).tolist()
    assert "replaced the values of `w` behind autograd's back" in " ".join(explain_record(t, change.id))
    line = body.splitlines().index("w.data = w.data - 0.1 * w.grad") + 2  # +1: 1-based, +1: the magic's line
    assert f"modified in place by `w.data = …` on line {line}" in " ".join(explain_record(t, first.id))
    assert ns["w"].grad.tolist() == shell.user_ns["w"].grad.tolist()  # the cell ran as plain


@pytest.mark.parametrize("body, cut, dtype", [("i = x.argmax()\nf = i.float() * 2", "i", "int64"),
                                              ("m = x > 1\nf = m.float() + 1", "m", "bool")])
def test_a_result_of_an_integer_op_is_said_to_be_cut_there_not_to_come_from_a_tensor_without_grad(shell, body, cut, dtype):
    """`x.argmax().float()`: x requires grad, the integer result carries none. The downstream row says
    it was computed from the integer one, never that `x` "never had requires_grad=True"."""
    import torch

    ns = {"torch": torch, "x": torch.tensor([1., 3., 2.], requires_grad=True)}
    exec(body, ns)
    assert ns["x"].requires_grad and not ns["f"].requires_grad and str(ns[cut].dtype) == f"torch.{dtype}"
    t = run(shell, body, setup="import torch\nx = torch.tensor([1., 3., 2.], requires_grad=True)")
    text = about(t, "f")
    assert f"computed from `{cut}` (line 2), which holds {dtype} values" in text and "although `x` requires grad" in text, text
    assert "never had requires_grad=True" not in text, text
    t = run(shell, body + "\nf.sum().backward()", setup="import torch\nx = torch.tensor([1., 3., 2.], requires_grad=True)", raises=True)
    err = explain_error(t)
    assert f"which holds {dtype} values" in err and "Compute it from floating point values" in err, err
    assert "Set requires_grad=True on the input" not in err, err


@pytest.mark.parametrize("call", ["(a * b).sum().backward(inputs=[a])", "torch.autograd.backward((a * b).sum(), inputs=[a])"])
def test_backward_with_inputs_says_the_tensors_it_left_out_get_no_gradient(shell, call):
    """`backward(inputs=[a])` accumulates into `a` alone: `b` gets none though the loss depends on it."""
    import torch

    body = f"a = torch.tensor([1., 2.], requires_grad=True)\nb = torch.tensor([3., 4.], requires_grad=True)\n{call}"
    ns = {"torch": torch}
    exec(body, ns)
    assert ns["b"].grad is None and ns["a"].grad.tolist() == [3.0, 4.0]
    t = run(shell, body)
    (p,) = t.passes
    assert [t.records[i].name for i in p.inputs] == ["a"]
    assert t.last("a").attr_grad.values.tolist() == ns["a"].grad.tolist() and not t.last("b").grads
    text = about(t, "b")
    assert "was given inputs=`a`, which leaves `b` out" in text and "does not depend on it" not in text, text


@pytest.mark.parametrize("block", ["torch.no_grad()", "torch.inference_mode()", "torch.set_grad_enabled(False)"])
def test_a_tensor_made_with_gradients_off_names_the_block_that_switched_them_off(shell, block):
    import torch

    body = f"with {block}:\n    y = x * 2"
    ns = {"torch": torch, "x": torch.tensor([1., 2.], requires_grad=True)}
    exec(body, ns)
    assert not ns["y"].requires_grad
    t = run(shell, body, setup="import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    text = about(t, "y")
    assert f"`y` was made under {block} on line 3" in text, text


def test_gradients_left_off_by_an_earlier_cell_are_said_to_be_off_from_the_start(shell):
    import torch

    try:
        t = run(shell, "y = x * 2", setup="import torch\nx = torch.tensor([1., 2.], requires_grad=True)\ntorch.set_grad_enabled(False)")
        assert not torch.is_grad_enabled() and not shell.user_ns["y"].requires_grad  # the cell ran as plain: still off
    finally:
        torch.set_grad_enabled(True)
    text = about(t, "y")
    assert "they were already off when this cell started" in text and "torch.no_grad()" not in text, text


def test_detach_in_place_is_named_as_the_in_place_cut_it_is(shell):
    import torch

    body = "y = x * 2\ny.detach_()\nz = y * 3"
    ns = {"torch": torch, "x": torch.tensor([1., 2.], requires_grad=True)}
    exec(body, ns)
    assert not ns["y"].requires_grad and ns["y"].grad_fn is None and not ns["z"].requires_grad
    t = run(shell, body, setup="import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    cut = next(r for r in t.records if r.op == "detach_")
    text = " ".join(explain_record(t, cut.id))
    assert "`y.detach_()` on line 3 cut `y` off the graph in place" in text and "was cut from `y`" not in text, text
    assert "cut from the graph by `.detach_()`" in about(t, "z")


def test_a_grad_assigned_in_the_cell_is_what_the_pass_added_to(shell):
    """`b.grad = ...` then backward(): .grad is the assignment plus the pass, not 'gradients of
    backward calls before this cell' (what the earlier cell's pass left was overwritten)."""
    import torch

    setup = "import torch\nb = torch.tensor([1., 2.], requires_grad=True)\n(b * 1).sum().backward()"
    body = "b.grad = torch.tensor([10., 10.])\n(b * 2).sum().backward()"
    ns = {"torch": torch}
    exec(setup.replace("import torch\n", "") + "\n" + body, ns)
    assert ns["b"].grad.tolist() == [12.0, 12.0]
    t = run(shell, body, setup=setup)
    text = about(t, "b")
    assert "the pass added to what was assigned on line 2 (`b.grad = torch.tensor([10., 10.])`)" in text, text
    assert "before this cell" not in text, text


def test_a_grad_made_with_create_graph_is_said_to_come_from_that_backward_call(shell):
    import torch

    body = "y = (x**3).sum()\ny.backward(create_graph=True)\ng = x.grad"
    ns = {"torch": torch, "x": torch.tensor([1., 2.], requires_grad=True)}
    exec(body, ns)
    assert ns["g"].grad_fn is not None and ns["g"].tolist() == [3.0, 12.0]  # a gradient with a history
    t = run(shell, body, setup="import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    text = about(t, "g")
    assert "reads the gradient the backward call on line 3" in text and "put into `x.grad`" in text, text
    assert "after the last backward call" not in text, text


# ---- an update written as a rebinding: `w = w - lr * w.grad` ----
REBOUND_LOOP = """w = torch.tensor([1.0, 2.0], requires_grad=True)
for i in range(3):
    loss = (w ** 2).sum()
    loss.backward()
    w = w - 0.1 * w.grad"""


def _shown(t) -> str:
    from autograd_magic.capture.preview import preview
    from autograd_magic.explain.format import format_short

    return format_short(preview(t))


def test_an_update_written_as_a_rebinding_is_explained_with_the_in_place_fix_that_works(shell):
    import re

    import torch

    t = run(shell, REBOUND_LOOP, raises=True)
    text = explain_error(t)
    assert "`w = w - 0.1 * w.grad` on line 6 uses `w.grad`, which is None there" in text
    assert "`w = w - 0.1 * w.grad` on line 6 rebound the name to a new tensor computed from the `w` before it" in text
    assert "retain_grad" not in text  # keeping a non-leaf's gradient is not the fix: the graph would grow each step
    fix = re.search(r"`with torch\.no_grad\(\):` then `([^`]+)`", text).group(1)
    assert fix == "w -= 0.1 * w.grad"
    # plain torch: the first w got both passes' gradients, and the view names it
    first = torch.tensor([1.0, 2.0], requires_grad=True)
    w = first
    for _ in range(2):
        (w ** 2).sum().backward()
        w = w - 0.1 * (w.grad if w.grad is not None else torch.zeros(2))
    assert w.grad is None and not w.is_leaf
    about_w = about(t, "w")
    assert f"the first `w`: its .grad is {_shown(first.grad)}" in about_w
    # the advice, run as plain torch: w stays the leaf and gets a gradient every step
    ns = {"torch": torch}
    exec("w = torch.tensor([1.0, 2.0], requires_grad=True)\ngrads = []\nfor i in range(3):\n"
         "    loss = (w ** 2).sum()\n    loss.backward()\n    grads.append(w.grad.clone())\n"
         f"    with torch.no_grad():\n        {fix}\n    w.grad = None", ns)
    assert ns["w"].is_leaf and len(ns["grads"]) == 3


def test_a_rebinding_from_an_earlier_cell_names_the_leaf_no_name_holds(shell):
    import torch

    run(shell, "w = torch.tensor([1.0, 2.0], requires_grad=True)\nloss = (w ** 2).sum()\nloss.backward()\nw = w - 0.1 * w.grad")
    t = run(shell, "loss = (w ** 2).sum()\nloss.backward()\nw = w - 0.1 * w.grad", setup="", raises=True)
    text = explain_error(t)
    assert "`w = w - 0.1 * w.grad` (cell [" in text and "rebound the name" in text and "w -= 0.1 * w.grad" in text
    first = torch.tensor([1.0, 2.0], requires_grad=True)
    (first ** 2).sum().backward()
    second = first - 0.1 * first.grad
    (second ** 2).sum().backward()
    assert f"the earlier `w`, which no name holds now: its .grad is {_shown(first.grad)}" in about(t, "w")


def test_the_leaf_a_rebinding_left_behind_is_called_by_its_earlier_name_in_later_cells(shell):
    """Cell by cell, as students run it: the first `w` (no name holds it after the rebinding) and
    its `.grad` get their rows as "earlier w" and "earlier w.grad", with plain torch's values."""
    import torch

    from autograd_magic.capture.preview import preview

    run(shell, "w = torch.tensor([1.0, 2.0], requires_grad=True)\nloss = (w * 3).sum()\nloss.backward()")
    run(shell, "w = w - 0.1 * w.grad", setup="")
    t = run(shell, "loss = (w * 3).sum()\nloss.backward()", setup="")
    first = torch.tensor([1.0, 2.0], requires_grad=True)
    (first * 3).sum().backward()
    after_one = first.grad.clone()
    second = first - 0.1 * first.grad
    (second * 3).sum().backward()
    labels = {r.label: r for r in t.records}
    assert "unnamed tensor" not in labels, sorted(labels)
    leaf = labels["earlier w"]
    assert leaf.name is None and leaf.is_leaf and leaf.requires_grad
    assert leaf.attr_grad is not None and (leaf.attr_grad.values == preview(first.grad).values).all()
    grad = labels["earlier w.grad"]  # the same tensor, read as the update used it, accumulated into since
    assert (grad.value == preview(after_one).values).all() and grad.version_changed
    assert labels["w"].grad_fn == "SubBackward0"  # the name still holds the new tensor: no "earlier" there
    # the explanations call the leaf as the row does, in prose: no "`earlier w`" as if it were code
    assert "the earlier `w`, which no name holds now" in about(t, "w")
    text = " ".join(explain_record(t, leaf.id))
    assert text.startswith("The earlier `w` is a leaf") and "`earlier w" not in text, text
    assert f"The earlier `w`'s .grad is {_shown(first.grad)}" in text  # accumulated over both cells' passes
    assert "computed from the earlier `w.grad`" in " ".join(explain_record(t, labels["0.1 * w.grad"].id))
    # a tensor no cell ever named is still an unnamed one
    t = run(shell, "loss = (torch.tensor([1.0], requires_grad=True) * w[:1]).sum()\nloss.backward()", setup="")
    assert not any(r.label.startswith("earlier") and r.former not in ("w", "w.grad") for r in t.records)


def test_a_model_rebuilt_before_the_backward_cell_shows_the_earlier_parameters_that_got_the_gradient(shell):
    """`model = Linear(...)` run again between the forward cell and the backward cell: the gradient
    goes to the parameters of the model the loss was computed with, "earlier model.weight", and the
    new model's .grad stays None (plain torch, the same seeds)."""
    import torch

    run(shell, "torch.manual_seed(0)\nmodel = torch.nn.Linear(3, 1)\nx = torch.randn(4, 3)\nloss = model(x).pow(2).mean()")
    shell.run_cell("model = torch.nn.Linear(3, 1)")
    t = run(shell, "loss.backward()", setup="")
    torch.manual_seed(0)
    old = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    old(x).pow(2).mean().backward()
    labels = {r.label: r for r in t.records}
    for name in ("weight", "bias"):
        r = labels[f"earlier model.{name}"]
        assert (r.attr_grad.values == getattr(old, name).grad.numpy()).all(), name
        assert f"model.{name}" not in labels  # the model the name holds now is not in this graph
    assert shell.user_ns["model"].weight.grad is None


def test_a_rebinding_that_is_no_update_keeps_the_leaf_by_a_new_name(shell):
    t = run(shell, "x = torch.tensor([1.0, 2.0], requires_grad=True)\nx = x * 2\nx.sum().backward()")
    text = about(t, "x")
    assert "`x = x * 2` on line 3 rebound the name" in text
    assert "bind the result to a new name (`x2 = x * 2`)" in text and "x.retain_grad()" in text
    assert shell.user_ns["x"].grad is None and not shell.user_ns["x"].is_leaf
    # a result under another name is no rebinding: the usual advice
    t = run(shell, "x = torch.tensor([1.0, 2.0], requires_grad=True)\ny = x * 2\ny.sum().backward()")
    assert "rebound" not in about(t, "y") and "y.retain_grad()" in about(t, "y")


def test_a_recurrence_that_rebinds_a_result_is_no_rebound_leaf(shell):
    t = run(shell, "W = torch.eye(2, requires_grad=True)\nh = torch.zeros(2)\nfor x in [torch.ones(2), torch.ones(2)]:\n"
                   "    h = torch.tanh(W @ h + x)\nh.sum().backward()")
    text = about(t, "h")
    assert "rebound" not in text and "h.retain_grad()" in text
