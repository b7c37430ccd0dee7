"""The sandbox behind the toggles: variants never touch the user's state.

Each test runs real `%%autograd` cells in a fresh shell, then variants with
`run_variant`, and checks the namespace, tensors, grads and RNG states
against what the real run left, and the variants' values and errors
against plain PyTorch doing the same thing.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from autograd_magic.variants.interventions import Toggles
from autograd_magic.variants.sandbox import Sandbox, SandboxError, run_variant, take_snapshot


def autograd(shell, body: str, *, flags: str = ""):
    """Run `body` under %%autograd as a user would, with the snapshot the magic takes."""
    snap = take_snapshot(shell, body)
    shell.run_cell(f"%%autograd --quiet -o _t {flags}\n{body}")
    return shell.user_ns.pop("_t"), snap


def run(shell, body: str) -> None:
    result = shell.run_cell(body)
    assert result.success, result.error_in_exec or result.error_before_exec


def _tensor_state(t: torch.Tensor):
    grad = t.grad if t.is_leaf else None
    return (
        t.detach().clone(), t.requires_grad, t._version,
        None if grad is None else (id(grad), grad.detach().clone()),
    )


def user_state(shell) -> dict:
    """Every name -> object id, tensor/parameter values, grads, flags; RNG states."""
    state = {"ids": {}, "tensors": {}}
    for name, value in shell.user_ns.items():
        if name.startswith("_") or name in shell.user_ns_hidden:
            continue
        state["ids"][name] = id(value)
        if isinstance(value, torch.Tensor):
            state["tensors"][name] = _tensor_state(value)
        elif isinstance(value, torch.nn.Module):
            for path, p in value.named_parameters(prefix=name):
                state["tensors"][path] = (id(p),) + _tensor_state(p)
    state["rng"] = (torch.get_rng_state().clone(), np.random.get_state(), random.getstate())
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before["ids"] == after["ids"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, old in before["tensors"].items():
        new = after["tensors"][name]
        for a, b in zip(old, new):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
            elif isinstance(a, tuple):  # (id, grad)
                assert a[0] == b[0] and torch.equal(a[1], b[1]), name
            else:
                assert a == b, name
    t0, n0, r0 = before["rng"]
    t1, n1, r1 = after["rng"]
    assert torch.equal(t0, t1)
    assert n0[0] == n1[0] and np.array_equal(n0[1], n1[1]) and n0[2:] == n1[2:]
    assert r0 == r1


def by_label(trace, label):
    found = [r for r in trace.records if r.name == label or r.expr == label]
    assert found, f"no record {label!r} in {[r.label for r in trace.records]}"
    return found[-1]


# ---- guarantees ----
def test_any_sequence_of_variants_leaves_user_state_alone(shell):
    run(shell, "import torch, numpy as np, random\nx = torch.tensor([1., 2.], requires_grad=True)\n"
               "model = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\nkept = [x]")
    body = (
        "noise = torch.randn(2) + np.random.rand() + random.random()\n"
        "h = model(x * noise)\nloss = (h ** 2).sum()\nloss.backward()\nopt.step()\nkept.append(loss)"
    )
    original, snap = autograd(shell, body)
    before = user_state(shell)
    kept_len = len(shell.user_ns["kept"])
    first = original.records[0]
    variants = [
        Toggles(no_grad=True), Toggles(detach_names=("h",)), Toggles(detach_ids=tuple([r.id for r in original.records if r.expr == "x * noise"])),
        Toggles(flip_ids=tuple([first.id])), Toggles(),
    ]
    for options in variants:
        v = run_variant(shell, body, original, snap, options)
        assert v.variant_of is original
    assert_same_state(before, user_state(shell))
    assert len(shell.user_ns["kept"]) == kept_len


def test_variant_sees_the_same_random_numbers(shell):
    run(shell, "import torch\nx = torch.ones(3, requires_grad=True)")
    body = "noise = torch.randn(3)\ny = (x * noise).sum()\ny.backward()"
    original, snap = autograd(shell, body)
    real_noise = shell.user_ns["noise"].clone()
    for options in (Toggles(), Toggles(no_grad=True), Toggles(detach_names=("y",))):
        v = run_variant(shell, body, original, snap, options)
        np.testing.assert_array_equal(by_label(v, "noise").value, real_noise.numpy())
    assert torch.equal(shell.user_ns["noise"], real_noise)


def test_variant_starts_from_the_pre_run_namespace(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)\nw = torch.tensor(3., requires_grad=True)")
    run(shell, "(w * 2).backward()")  # w.grad is 2 before the traced cell
    body = "x = x + 1\nloss = (x * w).sum()\nloss.backward()"
    original, snap = autograd(shell, body)
    assert shell.user_ns["w"].grad.item() == 2 + 5  # plain torch: 2 accumulated + sum(x + 1)
    for _ in range(2):
        v = run_variant(shell, body, original, snap)
        assert v.error is None
        np.testing.assert_array_equal(by_label(v, "x").value, [2.0, 3.0])
        w_rec = next(r for r in v.records if r.name == "w")
        assert w_rec.attr_grad.values.item() == 7.0  # same as the real run, not accumulated again
    assert shell.user_ns["w"].grad.item() == 7.0
    np.testing.assert_array_equal(shell.user_ns["x"].detach().numpy(), [2.0, 3.0])


def test_functions_from_earlier_cells_read_the_sandbox(shell):
    run(shell, "import torch\nw = torch.tensor([1., 2.], requires_grad=True)\nlog = []\n"
               "def loss_fn():\n    log.append(1)\n    return (w * 3).sum()")
    body = "loss = loss_fn()\nloss.backward()"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    v = run_variant(shell, body, original, snap)
    assert v.error is None
    w_rec = next(r for r in v.records if r.name == "w")
    np.testing.assert_array_equal(w_rec.attr_grad.values, [3.0, 3.0])  # not 6: the pre-run w was copied
    assert_same_state(before, user_state(shell))
    assert shell.user_ns["log"] == [1]  # the variant appended to its own copy
    assert shell.user_ns["w"].grad.tolist() == [3.0, 3.0]


def test_uncopyable_object_read_by_the_cell_is_a_clear_error(shell, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1\n2\n3\n")
    run(shell, f"import torch\ngen = (float(i) for i in range(5))\nfh = open({str(path)!r})")
    body = "a = torch.tensor(next(gen), requires_grad=True)\nb = a * 2"
    original, snap = autograd(shell, body)
    v = run_variant(shell, body, original, snap)
    assert v.error is not None and v.error.type == "SandboxError"
    assert "`gen`" in v.error.message and v.error.line == 2
    assert next(shell.user_ns["gen"]) == 1.0  # the variant did not advance the real generator
    body = "n = len(fh.readline())\nt = torch.ones(n)"
    original, snap = autograd(shell, body)
    v = run_variant(shell, body, original, snap)
    assert v.error.type == "SandboxError" and "`fh`" in v.error.message
    assert shell.user_ns["fh"].readline() == "2\n"  # the real file position is untouched
    shell.user_ns["fh"].close()


def test_uncopyable_object_reached_only_through_a_function(shell):
    run(shell, "import torch\ngen = (float(i) for i in range(1, 4))\ndef draw():\n    return torch.tensor(next(gen))")
    body = "v = draw() * 2"
    original, snap = autograd(shell, body)
    v = run_variant(shell, body, original, snap)
    assert v.error is not None and v.error.type == "SandboxError" and "`gen`" in v.error.message
    assert next(shell.user_ns["gen"]) == 2.0


def test_copyable_iterator_is_copied(shell):
    run(shell, "import torch\nit = iter([1., 2., 3.])")
    body = "v = torch.tensor(next(it)) * 2"
    original, snap = autograd(shell, body)
    v = run_variant(shell, body, original, snap)
    assert v.error is None and by_label(v, "v").value.item() == 2.0  # the copy starts before the real run
    assert next(shell.user_ns["it"]) == 2.0


def test_non_leaf_from_an_earlier_cell_is_shared_and_leaf_grads_restored(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)\ny = (x ** 2).sum()")
    body = "y.backward(retain_graph=True)\ng = x.grad * 1"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    for _ in range(2):
        v = run_variant(shell, body, original, snap)
        assert v.error is None
        np.testing.assert_array_equal(by_label(v, "g").value, [2.0, 4.0])  # not accumulated twice
    assert_same_state(before, user_state(shell))
    assert shell.user_ns["x"].grad.tolist() == [2.0, 4.0]


def test_graph_freed_by_the_real_run_is_explained(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)\ny = (x ** 2).sum()")
    body = "y.backward()"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    v = run_variant(shell, body, original, snap)
    assert v.error is not None
    assert "earlier cell" in v.error.message and "same cell" in v.error.message
    assert "second time" in v.error.message  # torch's own words are kept
    assert_same_state(before, user_state(shell))


def test_modules_and_optimizer_steps_stay_in_the_sandbox(shell):
    run(shell, "import torch\ntorch.manual_seed(1)\nmodel = torch.nn.Linear(3, 1)\n"
               "opt = torch.optim.SGD(model.parameters(), lr=0.5)\ninp = torch.ones(2, 3)")
    body = "opt.zero_grad()\nloss = model(inp).pow(2).sum()\nloss.backward()\nopt.step()"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    v = run_variant(shell, body, original, snap)
    assert v.error is None
    # the variant computed the same loss as the real run: it started from the pre-run weights
    assert by_label(v, "loss").value.item() == by_label(original, "loss").value.item()
    assert_same_state(before, user_state(shell))


def test_large_tensors_are_not_copied_but_variants_start_from_the_pre_run_state(shell):
    # issue 14: over the budget, a tensor's pre-run state is its version counter, not a copy;
    # the real run left its value alone and it had no .grad before, so the variant is exact
    run(shell, "import torch\nbig = torch.zeros(1000, requires_grad=True)")
    body = "s = (big * 2).sum()\ns.backward()"
    snap = take_snapshot(shell, body, budget=100)
    assert snap.nbytes == 0 and "big" in snap.live
    shell.run_cell(f"%%autograd --quiet -o _t\n{body}")
    original = shell.user_ns.pop("_t")
    before = user_state(shell)
    v = run_variant(shell, body, original, snap)
    assert v.error is None and not any("too large" in n for n in v.notes)
    plain = torch.zeros(1000, requires_grad=True)
    (plain * 2).sum().backward()
    big = next(r for r in v.records if r.name == "big")
    np.testing.assert_array_equal(big.attr_grad.values, plain.grad.numpy()[: big.attr_grad.values.size])
    assert_same_state(before, user_state(shell))


def test_a_large_gradient_changed_in_place_turns_variants_off(shell):
    # the second backward accumulates into big.grad in place: its pre-run value is gone
    run(shell, "import torch\nbig = torch.zeros(1000, requires_grad=True)\n(big * 2).sum().backward()")
    body = "s = (big * 2).sum()\ns.backward()"
    snap = take_snapshot(shell, body, budget=100)
    shell.run_cell(f"%%autograd --quiet -o _t\n{body}")
    original = shell.user_ns.pop("_t")
    before = user_state(shell)
    v = run_variant(shell, body, original, snap)
    assert v.error is not None and v.error.type == "SandboxError"
    assert "`big`'s gradients" in v.error.message and "snapshot budget" in v.error.message
    assert not v.records
    assert_same_state(before, user_state(shell))


def test_sandbox_restores_rng_and_grad_mode(shell):
    run(shell, "import torch, random\nimport numpy as np")
    snap = take_snapshot(shell, "torch.randn(2)")
    torch.randn(5)
    before = user_state(shell)
    with Sandbox(shell, snap) as ns:
        a = torch.randn(2)
        torch.manual_seed(123)
        np.random.seed(1)
        random.seed(2)
        torch.set_grad_enabled(False)
        ns["extra"] = 1
    assert torch.is_grad_enabled()
    assert "extra" not in shell.user_ns
    assert_same_state(before, user_state(shell))
    torch.set_rng_state(snap.rng.torch)
    assert torch.equal(a, torch.randn(2))


def test_run_variant_never_raises(shell):
    run(shell, "import torch\nx = torch.ones(2, requires_grad=True)")
    original, snap = autograd(shell, "y = x * 2")
    v = run_variant(shell, "y = x *", original, snap)
    assert v.error is not None and v.variant_of is original
    v = run_variant(shell, "y = x * 2", original, None, Toggles(detach_ids=tuple([99]), flip_ids=tuple([42])))
    assert v.error is None and v.variant_of is original


def test_flip_requires_grad_of_a_leaf_made_in_the_cell(shell):
    run(shell, "import torch")
    body = "x = torch.tensor([1., 2.], requires_grad=True)\ny = (x * 3).sum()\ny.backward()"
    original, snap = autograd(shell, body)
    leaf = original.records[0]
    v = run_variant(shell, body, original, snap, Toggles(flip_ids=tuple([leaf.id])))
    plain_x = torch.tensor([1.0, 2.0], requires_grad=False)
    with pytest.raises(RuntimeError) as plain:
        (plain_x * 3).sum().backward()
    assert v.error is not None and v.error.message == str(plain.value)
    assert v.records[0].requires_grad is False
    assert shell.user_ns["x"].requires_grad and shell.user_ns["x"].grad.tolist() == [3.0, 3.0]


def test_flip_requires_grad_of_an_external_leaf(shell):
    run(shell, "import torch\na = torch.tensor([1., 2.], requires_grad=True)\nb = torch.tensor([4., 7.])")
    body = "s = (a * b).sum()\ns.backward()"
    original, snap = autograd(shell, body)
    b_rec = next(r for r in original.records if r.name == "b")
    before = user_state(shell)
    v = run_variant(shell, body, original, snap, Toggles(flip_ids=tuple([b_rec.id])))
    assert v.error is None
    pa, pb = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([4.0, 7.0], requires_grad=True)
    (pa * pb).sum().backward()
    vb = next(r for r in v.records if r.name == "b")
    np.testing.assert_array_equal(vb.attr_grad.values, pb.grad.numpy())
    assert_same_state(before, user_state(shell))
    assert shell.user_ns["b"].requires_grad is False


# ---- the cells from the seed notebooks, against plain torch ----
SEED_2X3 = (
    "x = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)\nprint(x)\nprint(x.grad)\n"
    "y = 3 * x + 2\ny.retain_grad()\nz = 2 * y**2\nout = z.mean()\nout.backward()\n"
    "print(x.grad)\nprint(1/6 * 4 * y * 3)\nprint(y.grad)"
)


def test_seed_001_detach_y_gives_torchs_own_error(shell, seeds):
    assert SEED_2X3 in seeds.NOTEBOOKS["001"]
    run(shell, "import torch")
    original, snap = autograd(shell, SEED_2X3)
    before = user_state(shell)
    v = run_variant(shell, SEED_2X3, original, snap, Toggles(detach_names=("y",)))
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    y = (3 * x + 2).detach()
    with pytest.raises(RuntimeError) as plain:
        y.retain_grad()
    assert v.error is not None and v.error.type == "RuntimeError"
    assert v.error.message == str(plain.value) and v.error.line == 6
    assert "y" in v.detached
    assert_same_state(before, user_state(shell))
    assert shell.user_ns["y"].grad is not None  # the real run's retained grad is still there


def test_detach_y_cuts_the_gradient_to_x(shell):
    run(shell, "import torch\nx = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)")
    body = "y = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()"
    original, snap = autograd(shell, body)
    v = run_variant(shell, body, original, snap, Toggles(detach_names=("y",)))
    px = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    py = (3 * px + 2).detach()
    with pytest.raises(RuntimeError) as plain:
        (2 * py**2).mean().backward()
    assert v.error is not None and v.error.message == str(plain.value)
    x_rec = next(r for r in v.records if r.name == "x")
    assert px.grad is None and x_rec.attr_grad is None
    orig_x = next(r for r in original.records if r.name == "x")
    np.testing.assert_array_equal(orig_x.attr_grad.values, [[10.0, 16.0, 22.0], [22.0, 16.0, 10.0]])
    assert shell.user_ns["x"].grad.tolist() == [[10.0, 16.0, 22.0], [22.0, 16.0, 10.0]]


def test_detach_by_record_id_matches_detach_by_name(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    body = "y = 3*x + 2\nz = (y * x).sum()\nz.backward()"
    original, snap = autograd(shell, body)
    y_rec = next(r for r in original.records if r.name == "y")
    by_id = run_variant(shell, body, original, snap, Toggles(detach_ids=tuple([y_rec.id])))
    by_name = run_variant(shell, body, original, snap, Toggles(detach_names=("y",)))
    px = torch.tensor([1.0, 2.0], requires_grad=True)
    ((3 * px + 2).detach() * px).sum().backward()
    for v in (by_id, by_name):
        x_rec = next(r for r in v.records if r.name == "x")
        np.testing.assert_array_equal(x_rec.attr_grad.values, px.grad.numpy())


def test_no_grad_variant_gives_torchs_backward_error(shell):
    run(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)")
    body = "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\n\nprint(y)\ny.backward()"
    original, snap = autograd(shell, body)
    v = run_variant(shell, body, original, snap, Toggles(no_grad=True))
    px = torch.tensor(2.0, requires_grad=True)
    with torch.no_grad():
        py = 2 * px**4 + px**3 + 3 * px**2 + 5 * px + 1
    with pytest.raises(RuntimeError) as plain:
        py.backward()
    assert v.grad_mode == "no_grad"
    assert v.error.type == "RuntimeError" and v.error.message == str(plain.value) and v.error.line == 5
    assert by_label(v, "y").value.item() == 63.0
    assert shell.user_ns["x"].grad.item() == 93.0


def test_the_magics_own_flags_use_the_sandbox(shell):
    run(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)")
    v, _ = autograd(shell, "y = x * 3\ny.backward()", flags="--no-grad")
    assert v.grad_mode == "no_grad" and v.variant_of is not None and v.error is not None
    assert shell.user_ns["x"].grad.item() == 3.0


def test_the_magics_own_flags_report_an_uncopyable_read_as_a_sandbox_error(shell):
    run(shell, "import torch\ngen = (float(i) for i in range(1, 4))\ndef draw():\n    return torch.tensor(next(gen))")
    v, _ = autograd(shell, "y = draw() * 3", flags="--no-grad")
    assert v.variant_of is not None and v.grad_mode == "no_grad"
    assert v.error is not None and v.error.type == "SandboxError" and "`gen`" in v.error.message
    assert next(shell.user_ns["gen"]) == 2.0  # the real run drew 1.0; the variant drew nothing


def test_the_sandbox_stands_in_for_an_uncopyable_object_with_one_that_raises(shell):
    run(shell, "import torch\ngen = (float(i) for i in range(1, 4))")
    snap = take_snapshot(shell, "v = next(gen)")
    assert "gen" in snap.broken
    with Sandbox(shell, snap) as ns:
        stand_in = ns["gen"]
        for use in (next, iter, len, bool, lambda g: g.send, lambda g: g[0], lambda g: g()):
            with pytest.raises(SandboxError, match="`gen` is a generator, which cannot be copied"):
                use(stand_in)
    assert next(shell.user_ns["gen"]) == 1.0


def test_function_default_tensors_are_restored(shell):
    run(shell, "import torch\nw = torch.tensor([1., 2.], requires_grad=True)\n"
               "def loss_fn(weight=w):\n    return (weight * 3).sum()")
    body = "loss = loss_fn()\nloss.backward()"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    v = run_variant(shell, body, original, snap)
    assert v.error is None
    w_rec = next(r for r in v.records if r.name == "w")
    np.testing.assert_array_equal(w_rec.attr_grad.values, [3.0, 3.0])  # pre-run grad (None) + 3
    assert_same_state(before, user_state(shell))


def test_in_place_change_to_a_shared_leaf_is_undone(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)\ny = (x * 2).sum()")
    body = "y.backward(retain_graph=True)\nstart = x * 1\nwith torch.no_grad():\n    x.add_(1)"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    np.testing.assert_array_equal(by_label(original, "start").value, [1.0, 2.0])
    v = run_variant(shell, body, original, snap)
    assert v.error is None
    np.testing.assert_array_equal(by_label(v, "start").value, [1.0, 2.0])  # the pre-run value
    assert_same_state(before, user_state(shell))  # values, grads and version counters
    shell.user_ns["y"].backward()  # the user's own graph still works
    assert shell.user_ns["x"].grad.tolist() == [4.0, 4.0]


@pytest.mark.parametrize("notebook", ["000", "001", "002", "003", "004"])
def test_seed_notebooks_rerun_identically_and_leave_state_alone(shell, seeds, notebook):
    """Every seed cell: a plain re-run reproduces the real run; toggles change nothing real."""
    from autograd_magic.data.identity import changed_fields, match_records

    for body in seeds.NOTEBOOKS[notebook]:
        original, snap = autograd(shell, body)
        before = user_state(shell)
        same = run_variant(shell, body, original, snap)
        if same.error is not None and original.error is None:
            # backward() alone in a cell: the real run freed the earlier cell's graph
            assert "computed in an earlier cell" in same.error.message, body
            assert_same_state(before, user_state(shell))
            continue
        assert (same.error is None) == (original.error is None), body
        matches = match_records(original, same)
        assert len(matches) == len(original.records), body
        for o, n in matches.items():
            assert not changed_fields(original.records[o], same.records[n]), (body, original.records[o].label)
        named = [r.name for r in original.records if r.name and not r.external]
        run_variant(shell, body, original, snap, Toggles(no_grad=True))
        if named:
            run_variant(shell, body, original, snap, Toggles(detach_names=(named[0],)))
        assert_same_state(before, user_state(shell))


def test_detaching_a_loop_record_detaches_every_run(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    body = "acc = x * 1\nfor i in range(3):\n    acc = acc + (x * i).sum()\nacc.sum().backward()"
    original, snap = autograd(shell, body)
    second = next(r for r in original.records if r.expr == "x * i" and r.occurrence == 1)
    v = run_variant(shell, body, original, snap, Toggles(detach_ids=tuple([second.id])))
    assert any("every run" in n for n in v.notes)
    px = torch.tensor([1.0, 2.0], requires_grad=True)
    acc = px * 1
    for i in range(3):
        acc = acc + (px * i).detach().sum()
    acc.sum().backward()
    x_rec = next(r for r in v.records if r.name == "x")
    np.testing.assert_array_equal(x_rec.attr_grad.values, px.grad.numpy())


def test_huge_python_containers_are_copied_from_the_post_run_state(shell):
    run(shell, "import torch\nbig = list(range(100000))\nx = torch.ones(2, requires_grad=True)")
    body = "y = x * len(big)\nbig.append(1)"
    original, snap = autograd(shell, body)
    assert "big" in snap.live and "big" not in snap.frozen
    v = run_variant(shell, body, original, snap)
    assert any("big is too large" in n for n in v.notes)
    assert len(shell.user_ns["big"]) == 100001  # only the real run appended


def test_globals_read_by_methods_of_notebook_classes_are_restored(shell):
    run(shell, "import torch\nscale = torch.tensor(2., requires_grad=True)\n"
               "class Scaled(torch.nn.Module):\n    def forward(self, x):\n        return x * scale\n"
               "net = torch.nn.Sequential(Scaled())\nx = torch.tensor([1., 3.], requires_grad=True)")
    body = "out = net(x).sum()\nout.backward()"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    assert shell.user_ns["scale"].grad.item() == 4.0
    for _ in range(2):
        v = run_variant(shell, body, original, snap)
        assert v.error is None
        s = next(r for r in v.records if r.name == "scale")
        assert s.attr_grad.values.item() == 4.0  # from the pre-run grad (None), not accumulated
    assert_same_state(before, user_state(shell))
    assert shell.user_ns["scale"].grad.item() == 4.0


def test_shared_non_leaf_with_retained_grad(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)\ny = x * 3\ny.retain_grad()")
    body = "(y ** 2).sum().backward(retain_graph=True)\ng = y.grad * 1"
    original, snap = autograd(shell, body)
    before = user_state(shell)
    retained = shell.user_ns["y"].grad
    v = run_variant(shell, body, original, snap)
    assert v.error is None
    np.testing.assert_array_equal(by_label(v, "g").value, [6.0, 12.0])  # 2y, not accumulated twice
    assert_same_state(before, user_state(shell))
    assert shell.user_ns["y"].grad is retained


def test_live_copied_module_starts_from_its_pre_run_grads(shell):
    run(shell, "import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Linear(3, 1)\ninp = torch.ones(2, 3)")
    body = "out = model(inp).sum()\nout.backward()"
    snap = take_snapshot(shell, body, budget=8)
    shell.run_cell(f"%%autograd --quiet -o _t\n{body}")
    original = shell.user_ns.pop("_t")
    assert "model" in snap.live and snap.nbytes == 0
    before = user_state(shell)
    v = run_variant(shell, body, original, snap)
    w = next(r for r in v.records if r.name == "model.weight")
    # no grad before the real run: the variant's backward gives this run's 2, as a plain run does
    np.testing.assert_array_equal(w.attr_grad.values, np.full((1, 3), 2.0))
    assert_same_state(before, user_state(shell))
