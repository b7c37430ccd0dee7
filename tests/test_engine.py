"""The engine itself (`am.trace()` and the magic's records) against plain PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import autograd_magic as am


def test_trace_context_manager_matches_plain_torch():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    with am.trace() as t:
        h = w * 2
        loss = (h ** 2).sum()
        loss.backward()
    # plain reference
    w2 = w.detach().clone().requires_grad_()
    h2 = w2 * 2
    loss2 = (h2 ** 2).sum()
    gh, = torch.autograd.grad(loss2, [h2], retain_graph=True)
    loss2.backward()
    assert torch.equal(w.grad, w2.grad)
    rec_h = t.last("h")
    np.testing.assert_array_equal(rec_h.value, h2.detach().numpy())
    np.testing.assert_array_equal(rec_h.grads[0].values, gh.numpy())
    assert rec_h.expr == "w * 2" and rec_h.grad_fn == type(h2.grad_fn).__name__
    assert t.last("loss").grad_fn == type(loss2.grad_fn).__name__
    np.testing.assert_array_equal(t.last("w").grad, w2.grad.numpy())


def test_trace_in_a_function_leaves_its_locals_dict_alone():
    """A function's `locals()` dict is the one the tracer reads names from: it must keep every name."""

    def work():
        x = torch.ones(3)
        env = locals()
        with am.trace() as t:
            y = x * 2
        return eval("x + y", globals(), env), t

    total, t = work()
    assert torch.equal(total, torch.ones(3) * 3)
    assert t.last("y").expr == "x * 2"


def test_several_backward_passes_are_kept_apart(shell):
    shell.run_cell("import torch\nx = torch.tensor([1.0, 2.0], requires_grad=True)")
    shell.run_cell("%%autograd --quiet -o t\n(x * 3).sum().backward()\n(x * x).sum().backward()")
    t = shell.user_ns["t"]
    assert len(t.passes) == 2
    x = t.last("x")
    np.testing.assert_array_equal(x.grads[0].values, [3.0, 3.0])
    np.testing.assert_array_equal(x.grads[1].values, [2.0, 4.0])
    np.testing.assert_array_equal(x.grad, shell.user_ns["x"].grad.numpy())  # the accumulated sum
    np.testing.assert_array_equal(x.grad, [5.0, 7.0])


def test_autograd_grad_is_a_pass_with_results(shell):
    shell.run_cell("import torch\nx = torch.tensor(3.0, requires_grad=True)")
    shell.run_cell("%%autograd --quiet -o t\ny = x ** 3\n(g,) = torch.autograd.grad(y, x)")
    t = shell.user_ns["t"]
    (p,) = t.passes
    assert p.kind == "grad" and p.line == 3
    assert float(p.results[0].values) == float(shell.user_ns["g"]) == 27.0
    assert shell.user_ns["x"].grad is None  # autograd.grad does not accumulate


def test_no_grad_in_place_and_detach_are_recorded(shell):
    shell.run_cell("import torch\nx = torch.ones(2, requires_grad=True)")
    cell = "y = x * 2\nwith torch.no_grad():\n    z = x + 1\nw = y.detach()\nw.add_(1)\nu = x.clone()\nu[0] = 5"
    shell.run_cell("%%autograd --quiet -o t\n" + cell)
    t = shell.user_ns["t"]
    z = t.last("z")
    assert z.grad_enabled is False and z.requires_grad is False and z.line == 4
    w = t.last("w")
    assert w.inplace and w.op == "add_" and w.mutates is not None
    assert [r for r in t.records if r.op == "detach"][0].requires_grad is False
    setitem = [r for r in t.records if r.op == "setitem"]
    assert setitem and setitem[0].inplace and setitem[0].name == "u"
    assert torch.equal(shell.user_ns["u"], torch.tensor([5.0, 1.0]))


def test_tensors_the_mode_cannot_see_are_named_external_leaves(shell):
    shell.run_cell("import torch, numpy as np")
    shell.run_cell(
        "%%autograd --quiet -o t\na = torch.Tensor([1, 2])\nb = torch.from_numpy(np.array([3.0, 4.0]))\n"
        "p = torch.nn.Parameter(torch.zeros(2))\nc = a * 2 + p"
    )
    t = shell.user_ns["t"]
    for name in ("a", "b", "p"):
        rec = t.last(name)
        assert rec is not None and rec.is_leaf, name
    assert t.last("p").requires_grad
    c = t.last("c")
    assert c is not None and np.array_equal(c.value, [2.0, 4.0])


def _hooks_left(node):
    """How many hooks and prehooks other code left on a grad_fn node. A C++ node lists neither,
    so register a probe of each kind and count the node's hook dict through the probe's handle."""
    probe = lambda *a: None  # noqa: E731
    counts = []
    for register in (node.register_hook, node.register_prehook):
        handle = register(probe)
        counts.append(len(handle.hooks_dict_ref()) - 1)
        handle.remove()
    return tuple(counts)


def _graph_nodes(root):
    seen, todo = [], [root]
    while todo:
        node = todo.pop()
        if node is None or any(node is s for s in seen):
            continue
        seen.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return seen


def test_hook_probe_sees_a_left_hook():
    x = torch.ones(3, requires_grad=True)
    z = (x * 2).sum()
    assert _hooks_left(z.grad_fn) == (0, 0)
    h = z.grad_fn.register_prehook(lambda *a: None)
    assert _hooks_left(z.grad_fn) == (0, 1)
    h.remove()
    assert _hooks_left(z.grad_fn) == (0, 0)


def test_no_hooks_or_modes_left_behind(shell):
    shell.run_cell("import torch\nx = torch.ones(3, requires_grad=True)\ny = x * 2")
    before = torch._C._len_torch_function_stack()
    shell.run_cell("%%autograd --quiet\nz = (y * x).sum()\nz.backward(retain_graph=True)")
    assert torch._C._len_torch_function_stack() == before
    z = shell.user_ns["z"]
    nodes = _graph_nodes(z.grad_fn)
    assert len(nodes) >= 3  # SumBackward0, MulBackward0, and the AccumulateGrad of x at least
    assert [(type(n).__name__, _hooks_left(n)) for n in nodes] == [(type(n).__name__, (0, 0)) for n in nodes]
    assert not shell.user_ns["y"]._backward_hooks
    calls = []
    shell.user_ns["x"].register_hook(lambda g: calls.append(1))
    z.backward()
    assert calls == [1]  # the user's hook runs; ours are gone (nothing else recorded)


def test_large_tensors_get_bounded_previews(shell):
    shell.run_cell("import torch\nbig = torch.arange(1_000_000, dtype=torch.float32).reshape(1000, 1000)")
    shell.run_cell("%%autograd --quiet -o t\nm = big * 2")
    rec = shell.user_ns["t"].last("m")
    assert rec.preview.values.size <= 512 and rec.preview.summarized
    assert rec.preview.max == float((shell.user_ns["big"] * 2).max())
    assert rec.shape == (1000, 1000)


@pytest.mark.parametrize(
    "make",
    [
        "torch.randn(4, 4).t()",
        "torch.randn(3, dtype=torch.complex64)",
        "torch.arange(6)",
        "torch.tensor([True, False])",
        "torch.eye(3).to_sparse()",
        "torch.empty(3, 3, device='meta')",
        "torch.randn(2, 2, dtype=torch.bfloat16)",
    ],
)
def test_unusual_tensors_do_not_break_the_views(shell, make):
    shell.run_cell("import torch")
    result = shell.run_cell(f"%%autograd --quiet -o t\nv = {make}\nu = v * 2 if not v.is_sparse else v")
    assert result.success, result.error_in_exec
    t = shell.user_ns["t"]
    assert str(t) and t.to_html()


def test_a_no_grad_view_changed_in_place_is_recorded_without_tracer_errors(shell):
    # torch raises when grad_fn / is_leaf of such a view is read; the tracer must not
    cell = (
        "t1 = torch.randn((), requires_grad=True)\nwith torch.no_grad():\n    t2 = t1.reshape(-1)\n"
        "t2.requires_grad_()\nwith torch.no_grad():\n    t2.add_(1.5)"
    )
    shell.run_cell("import torch\ntorch.manual_seed(0)")
    plain = shell.run_cell(cell)
    plain_value = shell.user_ns["t2"].detach().clone()
    shell.run_cell("torch.manual_seed(0)")
    traced = shell.run_cell("%%autograd --quiet -o t\n" + cell)
    assert plain.success and traced.success
    assert torch.equal(shell.user_ns["t2"].detach(), plain_value)
    assert not [n for n in shell.user_ns["t"].notes if "skipped" in n]


# ---- review regressions: each compared with what plain torch holds ----


def test_functorch_transforms_run_and_record():
    w = torch.randn(100, requires_grad=True)
    r = torch.randn(100)
    with am.trace() as t:
        j = torch.func.jacrev(torch.sin)(w)
        g = torch.func.grad(lambda a: (a * 3).sin().sum())(r)
        v = torch.func.vmap(lambda a: a * 2 + 1)(torch.ones(4, 100))
    assert torch.equal(j, torch.diag(torch.cos(w.detach())))
    assert torch.allclose(g, 3 * torch.cos(3 * r))
    assert torch.equal(v, torch.full((4, 100), 3.0))
    assert not any("skipped" in n for n in t.notes)


def test_inference_mode_in_place_chain_shows_each_value():
    with am.trace() as t:
        with torch.inference_mode():
            a = torch.zeros(3)
            a.add_(5)
            a.mul_(2)
    assert [r.value.tolist() for r in t.records] == [[0.0] * 3, [5.0] * 3, [10.0] * 3]


def test_memory_changed_behind_version_counters_is_read_afresh():
    with am.trace() as t:
        w = torch.randn(100, 100)
        w.data = torch.zeros(100, 100)  # swaps w's memory without a version bump
        z = torch.ones(100, 100)  # may land where w's first block was
        x = torch.ones(3, requires_grad=True)
        (x * 2).sum().backward()
        x.grad.data.zero_()  # invisible to x.grad's version counter
    assert (t.last("z").preview.max, t.last("z").preview.norm) == (float(z.max()), float(torch.linalg.vector_norm(z)))
    np.testing.assert_array_equal(t.last("x").attr_grad.values, x.grad.numpy())


def test_modules_made_in_a_loop_count_as_a_loop(shell):
    shell.run_cell("import torch\nimport torch.nn as nn")
    cell = "keep = []\nh = torch.randn(2, 4)\nfor i in range(20):\n    m = nn.Linear(4, 4)\n    keep.append(m)\n    h = m(h)"
    shell.run_cell("%%autograd --quiet -o t\n" + cell)
    t = shell.user_ns["t"]
    kept = [r for r in t.records if r.op == "linear"]
    assert len(kept) == 3 and t.repeats.get(kept[0].id) == 17


def test_module_attribution_reaches_helpers_of_modules_defined_in_the_cell(shell):
    shell.run_cell("import torch\nimport torch.nn as nn")
    cell = (
        "class Block(nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.l = nn.Linear(4, 4)\n"
        "    def helper(self, h):\n        return h.tanh()\n    def forward(self, x):\n        return self.helper(self.l(x)).relu()\n"
        "model = nn.Sequential(*[Block() for _ in range(5)])\ny = model(torch.randn(2, 4))"
    )
    shell.run_cell("%%autograd --quiet -o t\n" + cell)
    t = shell.user_ns["t"]
    expected = [f"model.{i}" for i in range(5)]
    assert [r.module for r in t.records if r.op == "tanh"] == expected
    assert [r.module for r in t.records if r.op == "relu"] == expected  # five blocks, not a loop of one


def test_modules_appended_without_a_name_get_their_path(shell):
    shell.run_cell("import torch\nimport torch.nn as nn")
    cell = "x = torch.randn(2, 4)\nnet = nn.Sequential()\nfor i in range(5):\n    net.append(nn.Linear(4, 4))\n    out = net(x)"
    shell.run_cell("%%autograd --quiet --limit 100 -o t\n" + cell)
    t = shell.user_ns["t"]
    assert {r.module for r in t.records if r.op == "linear"} == {f"net.{i}" for i in range(5)}


def _grads_wrt(loss_fn, leaves, names):
    """Plain torch: d loss / d each named intermediate, by autograd.grad on a fresh run."""
    loss, inter = loss_fn(*[l.detach().clone().requires_grad_() for l in leaves])
    grads = torch.autograd.grad(loss, [inter[n] for n in names])
    return dict(zip(names, grads))


def test_each_record_gets_the_gradient_its_node_received():
    """Gradients come from node pre-hooks matched to records: fan-in, an op changed in place,
    a transposed weight gradient and an MLP's intermediates against torch.autograd.grad."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 5)

    def f(x):
        h = lin(x)
        a = h.relu()
        sq = a * a  # two edges into one slot: gradients add up there
        return sq.sum(), {"h": h, "a": a, "sq": sq}

    with am.trace() as t:
        h = lin(x)
        a = h.relu()
        sq = a * a
        loss = sq.sum()
        loss.backward()
    want = _grads_wrt(f, [x], ["h", "a", "sq"])
    for name in want:
        np.testing.assert_allclose(t.last(name).grads[0].values, want[name].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(t.last("x").grad, x.grad.numpy())
    weight = [r for r in t.records if r.name == "lin.weight"][-1]
    np.testing.assert_array_equal(weight.grad, lin.weight.grad.numpy())
    assert weight.attr_grad.mean == pytest.approx(float(lin.weight.grad.double().mean()))
    # what each node sent: filled for every edge into a node that ran, the chain rule's values
    p = t.passes[0]
    ran = {s.node_id for s in p.steps}
    for s in p.steps:
        for i, target in enumerate(s.next_ids):
            if target in ran:
                assert s.grad_out[i] is not None, (s.node, i)
    relu = next(s for s in p.steps if s.node.startswith("ReluBackward"))
    np.testing.assert_allclose(relu.grad_out[0].values, want["h"].numpy(), rtol=1e-6)
    mul = next(s for s in p.steps if s.node.startswith("MulBackward"))
    np.testing.assert_allclose(mul.grad_out[0].values + mul.grad_out[1].values, want["a"].numpy(), rtol=1e-6)


def test_a_first_layer_whose_input_needs_no_gradient_still_shows_what_it_sent():
    """The first Linear's input needs no gradient: its node has an edge to nothing, and what it
    sends along the others (its weight's and bias's gradients) comes from their receivers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(6, 5)
    with am.trace() as t:
        model(x).pow(2).mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).pow(2).mean().backward()  # plain torch
    steps = {s.node_id: s for s in t.passes[0].steps}
    received = {}  # AccumulateGrad node -> what its sender sent it
    first = None
    for s in steps.values():
        for i, (g, target) in enumerate(zip(s.grad_out, s.next_ids)):
            if target is None:
                assert g is None, (s.node, i)  # the input's edge: nothing flows along it
                first = s
            elif steps.get(target) is not None and steps[target].node == "AccumulateGrad":
                received[target] = g
    assert first is not None and first.node.startswith("AddmmBackward")
    leaves = {rid: r.name for rid, r in enumerate(t.records) if r.is_leaf and r.requires_grad}
    assert len(received) == 4
    for target, g in received.items():
        name = next(leaves[rid] for rid in steps[target].records if rid in leaves)
        want = dict(model.named_parameters())[name.split(".", 1)[1]].grad
        assert g is not None and g.shape == tuple(want.shape), name
        assert not g.summarized  # small enough to show every value
        np.testing.assert_allclose(g.values, want.numpy(), rtol=1e-6)
        assert g.norm == pytest.approx(torch.linalg.vector_norm(want.double()).item(), rel=1e-6)
        np.testing.assert_allclose(got[name.split(".", 1)[1]].numpy(), want.numpy(), rtol=1e-6)


def test_what_each_node_sends_is_the_chain_rule_in_a_chain_and_through_views():
    """Nodes feeding single edges (no post-hook: their receivers fill in what they sent), a view's
    backward (TBackward, with one) and a fan-in: every edge's gradient against plain torch."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)

    def f(x, w):
        a = x.exp()
        b = a.sin()
        c = b @ w.t()
        d = c.tanh()
        e = d * d
        return e.sum(), {"a": a, "b": b, "c": c, "d": d, "e": e}

    with am.trace() as t:
        a = x.exp()
        b = a.sin()
        c = b @ w.t()
        d = c.tanh()
        e = d * d
        e.sum().backward()
    want = _grads_wrt(f, [x, w], ["a", "b", "c", "d", "e"])
    steps = {s.node_id: s for s in t.passes[0].steps}
    sent_to = {}  # receiver node -> sum of what its senders sent (the engine adds a fan-in up)
    for s in steps.values():
        assert len(s.grad_out) == len(s.next_ids)
        for g, target in zip(s.grad_out, s.next_ids):
            if target in steps:
                assert g is not None, s.node
                sent_to[target] = sent_to.get(target, 0) + g.values
    for name in want:
        record = t.last(name)
        node = next(s for s in steps.values() if record.id in s.records)
        np.testing.assert_allclose(sent_to[node.node_id], want[name].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(node.grad_in[0].values, want[name].numpy(), rtol=1e-5, atol=1e-7)
    for leaf, name in ((x, "x"), (w, "w")):
        acc = next(s for s in steps.values() if t.last(name).id in s.records)
        np.testing.assert_allclose(sent_to[acc.node_id], leaf.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_a_record_changed_in_place_keeps_the_gradient_of_its_own_version():
    x = torch.ones(3, requires_grad=True)
    with am.trace() as t:
        y = x * 2
        y.mul_(torch.tensor([1.0, 2.0, 3.0]))
        (y * torch.tensor([1.0, 10.0, 100.0])).sum().backward()
    before, after = [r for r in t.records if r.name == "y"][:2]
    np.testing.assert_array_equal(after.grads[0].values, [1.0, 10.0, 100.0])
    np.testing.assert_array_equal(before.grads[0].values, [1.0, 20.0, 300.0])  # through mul_
    np.testing.assert_array_equal(t.last("x").grad, x.grad.numpy())


def test_autograd_grad_of_an_intermediate_is_its_record_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with am.trace() as t:
        h = x ** 2
        out = (h * 3).sum()
        (gh,) = torch.autograd.grad(out, [h])
    np.testing.assert_array_equal(t.last("h").grads[0].values, gh.numpy())
    assert x.grad is None


def test_a_leaf_grad_changed_after_backward_is_read_afresh():
    w = torch.ones(2, 70, requires_grad=True)
    with am.trace() as t:
        (w * 3).sum().backward()
        w.grad.data.zero_()  # no version bump: the preview taken in the pass is stale now
    shown = t.last("w").attr_grad
    assert shown.min == shown.max == 0.0 and not shown.values.any()
    assert t.last("w").grads[0].max == 3.0  # what the pass itself delivered


def test_a_leaf_grad_changed_by_a_post_accumulate_hook_is_read_afresh():
    w = torch.ones(3, 40, requires_grad=True)

    def scale(p):
        p.grad.mul_(10)  # in place, after the gradient was handed over as .grad

    h = w.register_post_accumulate_grad_hook(scale)
    try:
        with am.trace() as t:
            (w * 2).sum().backward()
    finally:
        h.remove()
    assert t.last("w").attr_grad.max == float(w.grad.max()) == 20.0


def test_module_names_follow_every_change_of_the_namespace():
    """Unnamed modules (a model held by a closure) are looked up without walking the whole
    namespace each time, yet any name bound to another value, with no `name = ...` line the
    tracer sees (a loop target, `globals()[...]`), is still found."""
    from autograd_magic.capture.names import NameIndex

    ns = {"net": torch.nn.Sequential(torch.nn.Linear(2, 2)), "m": None, "n": 3}
    names = NameIndex(ns)
    assert names.module_name(ns["net"][0]) == "net.0"
    hidden = [torch.nn.ReLU(), torch.nn.Tanh()]
    assert [names.module_name(h) for h in hidden] == ["ReLU", "Tanh"]  # reachable from no name
    ns["m"] = torch.nn.Linear(3, 3)  # same size; a name that held no module now holds one
    assert names.module_name(ns["m"]) == "m"
    ns["net"].append(torch.nn.Linear(2, 2))  # no name bound at all: the module trees are walked again
    assert names.module_name(ns["net"][1]) == "net.1"
    ns["m"] = torch.nn.Sequential(torch.nn.Linear(1, 1))
    assert names.module_name(ns["m"][0]) == "m.0"
