"""Why-explanations of a variant read its toggle as the cut it is.

Each test runs a real `%%autograd` cell, then a real sandboxed variant
(`run_variant`), and checks the explanation names the toggle's cut (detach by
name or by record id, the whole cell under no_grad, a requires_grad flip on a
leaf made in the cell or before it), never "never had requires_grad=True"
for a tensor the user did create with it. Plain PyTorch doing the same cut
confirms what the explanation claims.
"""

from __future__ import annotations

import pytest
import torch

from autograd_magic.explain.errors import explain_error
from autograd_magic.explain.why import explain_record
from autograd_magic.variants.interventions import Toggles
from autograd_magic.variants.sandbox import run_variant, take_snapshot

TOUR = (  # the tour's `%%autograd --detach y` cell
    "x = torch.tensor([[1., 2, 3], [3, 2, 1]], requires_grad=True)\n"
    "y = 3*x + 2\n"
    "z = 2*y**2\n"
    "out = z.mean()\n"
    "out.backward()\n"
)


def real(shell, body: str, setup: str = "import torch"):
    shell.run_cell(setup)
    snap = take_snapshot(shell, body)
    shell.run_cell(f"%%autograd --quiet -o _t\n{body}")
    return shell.user_ns.pop("_t"), snap


def about(t, name: str) -> str:
    rec = t.last(name)
    assert rec is not None, name
    return " ".join(explain_record(t, rec.id))


def plain_tour(detach=False, no_grad=False, flip=False):
    """The tour cell in plain PyTorch with the variant's change made by hand."""
    x = torch.tensor([[1., 2, 3], [3, 2, 1]], requires_grad=not flip)
    with torch.set_grad_enabled(not no_grad):
        y = 3 * x + 2
        if detach:
            y = y.detach()
        out = (2 * y ** 2).mean()
    return x, out


def assert_no_false_claim(*texts):
    for text in texts:
        assert "never had requires_grad=True" not in text
        assert "Set requires_grad=True" not in text


def _check_detached_y(v):
    x, out = plain_tour(detach=True)
    assert x.requires_grad and not out.requires_grad  # what the explanation says, in torch
    err = explain_error(v)
    assert "`out` (line 5) does not require grad because `y` was detached in this variant" in err
    assert "the toggle cut it from the graph" in err and "so no gradient reaches `x`" in err
    assert "the real run, without it, is unaffected" in err
    assert "`y` was detached in this variant" in about(v, "z")
    assert "`y` (line 3) was detached in this variant" in about(v, "y") and "none reaches `x`" in about(v, "y")
    assert "requires grad, but no backward pass" in about(v, "x") and "`y` was detached" in about(v, "x")
    assert_no_false_claim(err, about(v, "z"), about(v, "out"), about(v, "x"))


def test_detach_by_name(shell):
    t, snap = real(shell, TOUR)
    v = run_variant(shell, TOUR, t, snap, Toggles(detach_names=("y",)))
    assert v.error is not None and "does not require grad" in v.error.message
    _check_detached_y(v)


def test_detach_by_record_id(shell):
    t, snap = real(shell, TOUR)
    v = run_variant(shell, TOUR, t, snap, Toggles(detach_ids=(t.last("y").id,)))  # the widget's row toggle
    assert v.error is not None
    _check_detached_y(v)


def test_detach_magic_option_like_the_tour(shell):
    shell.run_cell("import torch")
    shell.run_cell("%%autograd --quiet -o _t --detach y\n" + TOUR)
    v = shell.user_ns.pop("_t")
    _check_detached_y(v)


def test_no_grad(shell):
    t, snap = real(shell, TOUR)
    v = run_variant(shell, TOUR, t, snap, Toggles(no_grad=True))
    x, out = plain_tour(no_grad=True)
    assert x.requires_grad and not out.requires_grad
    err = explain_error(v)
    assert "`out` (line 5) does not require grad because the whole cell ran under torch.no_grad() in this variant" in err
    assert "so no gradient reaches `x`" in err and "unaffected" in err
    assert "whole cell ran under torch.no_grad() in this variant" in about(v, "y")
    assert "whole cell ran under torch.no_grad() in this variant" in about(v, "x")
    assert_no_false_claim(err, about(v, "y"), about(v, "x"))


def test_flip_off_a_leaf_made_in_the_cell(shell):
    t, snap = real(shell, TOUR)
    v = run_variant(shell, TOUR, t, snap, Toggles(flip_ids=(t.last("x").id,)))
    x, out = plain_tour(flip=True)
    assert not x.requires_grad and not out.requires_grad
    assert v.flipped == ["x"]
    err = explain_error(v)
    assert "`out` (line 5) does not require grad because requires_grad of `x` was flipped off in this variant" in err
    assert "unaffected" in err
    text = about(v, "x")
    assert "`x` (line 2) requires grad in the real run, but here requires_grad of `x` was flipped off" in text
    assert "requires_grad was never set" not in text
    assert "flipped off in this variant" in about(v, "y")
    assert_no_false_claim(err, text, about(v, "y"))


def test_flip_off_a_leaf_from_an_earlier_cell(shell):
    body = "loss = (w * 3).sum()\nloss.backward()\n"
    t, snap = real(shell, body, setup="import torch\nw = torch.tensor([1., 2.], requires_grad=True)")
    v = run_variant(shell, body, t, snap, Toggles(flip_ids=(t.last("w").id,)))
    assert shell.user_ns["w"].requires_grad  # the real tensor is untouched
    err = explain_error(v)
    assert "`loss` (line 2) does not require grad because requires_grad of `w` was flipped off in this variant" in err
    text = about(v, "w")
    assert "`w` requires grad in the real run, but here requires_grad of `w` was flipped off" in text
    assert "comes from before this cell with requires_grad=False" not in text
    assert_no_false_claim(err, text)


def test_flip_on_a_leaf_made_in_the_cell(shell):
    body = "a = torch.tensor([3.0, 2.0], requires_grad=True)\nb = torch.tensor([4.0, 7.0])\nres = (a * b).sum()\nres.backward()\n"
    t, snap = real(shell, body)
    v = run_variant(shell, body, t, snap, Toggles(flip_ids=(t.last("b").id,)))
    a = torch.tensor([3.0, 2.0], requires_grad=True)
    b = torch.tensor([4.0, 7.0], requires_grad=True)
    (a * b).sum().backward()
    text = about(v, "b")
    assert "requires_grad of `b` was flipped on in this variant" in text
    assert "put [3., 2.] into `b.grad`" in text and b.grad.tolist() == [3.0, 2.0]
    assert "requires_grad was never set" not in about(t, "a")


def test_flip_on_then_inplace_names_the_toggle(shell):
    body = "p = torch.ones(2)\np += 1\n"
    t, snap = real(shell, body)
    v = run_variant(shell, body, t, snap, Toggles(flip_ids=(t.records[0].id,)))
    p = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        p += 1
    assert v.error is not None and "a leaf Variable that requires grad" in v.error.message
    err = explain_error(v)
    assert "requires_grad of `p` was flipped on in this variant" in err and "unaffected" in err


def test_real_run_explanations_unchanged(shell):
    t, _ = real(shell, "q = torch.randn(3)\nloss = (q * 2).sum()\nloss.backward()", setup="import torch")
    assert "computed from `q`, which never had requires_grad=True" in explain_error(t)
    assert "variant" not in explain_error(t)


def test_a_detached_tensor_with_a_path_around_it_does_not_cut_off_its_leaf(shell):
    """`z = y * x` with `y` detached: x still gets dz/dx = y through the direct path (torch: 6)."""
    body = "x = torch.tensor(2., requires_grad=True)\ny = x * 3\nz = y * x\nz.backward()\n"
    x = torch.tensor(2., requires_grad=True)
    (x * 3).detach().mul(x).backward()
    t, snap = real(shell, body)
    v = run_variant(shell, body, t, snap, Toggles(detach_names=("y",)))
    assert v.error is None
    assert v.last("x").attr_grad.values.item() == x.grad.item() == 6.0
    why = about(v, "y")
    assert "none reaches `x`" not in why and "`x` still gets one along another path" in why, why


@pytest.mark.parametrize("written", ['"3*x + 2"', "'3*x + 2'", "3*x+2"])
def test_detach_an_expression_written_in_quotes_on_the_magic_line(shell, written):
    """The README's `--detach "3*x + 2"`: IPython keeps the quotes in the word; the expression is meant."""
    shell.run_cell("import torch")
    shell.run_cell(f"%%autograd --quiet -o _t --detach {written}\n" + TOUR)
    v = shell.user_ns.pop("_t")
    x, out = plain_tour(detach=True)
    assert x.requires_grad and not out.requires_grad  # torch, with `3*x + 2` detached by hand
    assert v.last("y").detached and not v.last("out").requires_grad
    assert not any("nothing in the cell is named" in n for n in v.notes)


def test_detaching_what_the_cell_does_not_have_says_so_in_one_line(shell):
    shell.run_cell("import torch")
    shell.run_cell("%%autograd --quiet -o _t --detach nosuch\n" + TOUR)
    v = shell.user_ns.pop("_t")
    x, out = plain_tour()
    out.backward()
    assert [n for n in v.notes if n.startswith("--detach nosuch:")] == [
        "--detach nosuch: nothing in the cell is named or written `nosuch`, so nothing was detached for it"]
    assert v.last("x").attr_grad.values.tolist() == x.grad.tolist()  # the real gradients: nothing was cut
