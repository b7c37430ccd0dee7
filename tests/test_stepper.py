"""The backward stepper: every number it shows equals what torch itself computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autograd_magic.explain.stepper import describe_grad, rule_for, steps


def run(shell, body: str, setup: str = "import torch"):
    shell.run_cell(setup)
    result = shell.run_cell("%%autograd --quiet -o t\n" + body)
    assert result.error_in_exec is None, result.error_in_exec
    return shell.user_ns["t"]


def _step_for(st, label):
    found = [s for s in st if label in s.labels]
    assert found, f"no step for {label}: {[s.labels for s in st]}"
    return found[0]


def _close(preview, ref: torch.Tensor):
    assert preview is not None and preview.complete
    np.testing.assert_allclose(np.asarray(preview.values, dtype=np.float64), ref.detach().double().numpy(), rtol=1e-6, atol=1e-7)


SEED_001 = (
    "x = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)\n"
    "y = 3*x + 2\n"
    "z = 2*y**2\n"
    "out = z.mean()\n"
    "out.backward()"
)


def _seed_001_reference():
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    a = 3 * x
    y = a + 2
    p = y**2
    z = 2 * p
    out = z.mean()
    grads = torch.autograd.grad(out, [out, z, p, y, a, x], retain_graph=True)
    return dict(zip(["out", "z", "y**2", "y", "3*x", "x"], grads))


def test_seed_001_steps_match_torch(shell):
    t = run(shell, SEED_001)
    st = steps(t, 0)
    ref = _seed_001_reference()
    assert [s.node for s in st] == [
        "MeanBackward0", "MulBackward0", "PowBackward0", "AddBackward0", "MulBackward0", "AccumulateGrad"
    ]
    for label, g in ref.items():
        _close(_step_for(st, label).grad_in[0], g)
    # what each node sends on is what the next one receives
    for s in st[:-1]:
        sent = [g for g, tg in zip(s.grad_out, s.targets) if tg.node is not None]
        assert len(sent) == 1
        nxt = next(n for n in st if n.node_id == s.targets[[tg.node is not None for tg in s.targets].index(True)].node_id)
        np.testing.assert_allclose(sent[0].values, nxt.grad_in[0].values)
    assert st[-1].labels == ["x"]
    _close(st[-1].grad_in[0], torch.tensor([[10.0, 16, 22], [22, 16, 10]]))


def test_seed_001_sentences_and_rules(shell):
    st = steps(run(shell, SEED_001), 0)
    assert st[0].text.startswith("MeanBackward0 for out (line 5) received 1.")
    assert "0.1667 in each of 6 elements to z" in st[0].text
    assert "divided by the number of elements" in st[0].rule
    assert st[1].rule.startswith("d(2·x) = 2·dx")  # 2*y**2: the constant from the source
    assert "2·x" in st[2].rule  # y**2
    assert "unchanged" in st[3].rule
    assert st[-1].text == "AccumulateGrad (line 2): [[10., 16., 22.], [22., 16., 10.]] is added into x.grad"
    # targets: MulBackward0 (3*x) sends to x's AccumulateGrad; the constant gets nothing
    mul = _step_for(st, "3*x")
    assert mul.targets[0].labels == ["x"] and mul.targets[0].node == "AccumulateGrad"
    assert all(t.node is None for t in mul.targets[1:])


def test_branching_graph_accumulates(shell):
    body = "x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)\nh = x * x\ne = x.exp()\ns = (h + e).sum()\ns.backward()"
    t = run(shell, body)
    st = steps(t, 0)
    x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    h = x * x
    e = x.exp()
    q = h + e
    s = q.sum()
    gs, gq, gh, ge, gx = torch.autograd.grad(s, [s, q, h, e, x], retain_graph=True)
    _close(_step_for(st, "s").grad_in[0], gs)
    _close(_step_for(st, "h + e").grad_in[0], gq)
    _close(_step_for(st, "h").grad_in[0], gh)
    _close(_step_for(st, "e").grad_in[0], ge)
    acc = _step_for(st, "x")
    assert acc.node == "AccumulateGrad"
    _close(acc.grad_in[0], gx)  # the sum of both branches
    mul = _step_for(st, "h")
    assert mul.node == "MulBackward0" and [tg.labels for tg in mul.targets] == [["x"], ["x"]]
    for g in mul.grad_out:  # x*x: each side gets grad * x
        _close(g, gh * x)
    assert "broadcast" in _step_for(st, "s").rule
    assert "eˣ" in _step_for(st, "e").rule


def test_linear_bce_steps_match_torch(shell, seeds):
    cell = seeds.NOTEBOOKS["001"][6] + "\nloss.backward()"
    t = run(shell, cell)
    st = steps(t, 0)
    torch.manual_seed(0)
    x = torch.ones(5)
    y = torch.zeros(3)
    w = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    z = torch.matmul(x, w) + b
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    gl, gz, gw, gb = torch.autograd.grad(loss, [loss, z, w, b])
    assert st[0].node == "BinaryCrossEntropyWithLogitsBackward0"
    assert "σ(z) - target" in st[0].rule
    _close(st[0].grad_in[0], gl)
    _close(_step_for(st, "z").grad_in[0], gz)
    _close(_step_for(st, "w").grad_in[0], gw)
    _close(_step_for(st, "b").grad_in[0], gb)
    assert _step_for(st, "w").text.endswith("is added into w.grad")


def test_second_pass_has_its_own_steps(shell):
    body = "x = torch.tensor(2.0, requires_grad=True)\ny = x**3\ny.backward(retain_graph=True)\ny.backward()"
    t = run(shell, body)
    assert len(t.passes) == 2
    for i in range(2):
        st = steps(t, i)
        _close(_step_for(st, "y").grad_in[0], torch.tensor(1.0))
        _close(_step_for(st, "x").grad_in[0], torch.tensor(12.0))
        assert "d(x^3) = 3·x^2" in _step_for(st, "y").rule


def test_describe_grad_and_unknown_rule():
    from autograd_magic.data.trace import Preview

    assert describe_grad(None) == "nothing"
    assert describe_grad(Preview(shape=(2,), dtype="torch.float32", values=np.array([0.5, 0.5], np.float32))) == (
        "0.5000 in each of 2 elements"
    )
    assert "chain rule" in rule_for("FancyBackward7")
    assert rule_for("AddBackward0", "a + b") == rule_for("AddBackward0")
    assert "negated" in rule_for("SubBackward0")
    assert rule_for("DivBackward0", "x / 4") == "d(x/4) = dx/4: the gradient is divided by 4"
    assert "divided by 4" not in rule_for("DivBackward0", "4 / x")  # the constant on the left: the generic rule
    assert "constant 2 needs none" in rule_for("AddBackward0", "x + 2")
    assert "constant 1 needs none" in rule_for("SubBackward0", "x - 1")
    assert rule_for("MulBackward0", "y*y") == rule_for("MulBackward0")


def test_loop_passes_beyond_the_limit_are_not_invented(shell):
    """Later loop passes are run but not recorded: no made-up 'implicit' pass, and the explanation says so."""
    from autograd_magic.explain.why import explain_record

    t = run(shell, "w = torch.tensor([1., 2.], requires_grad=True)\nfor i in range(5):\n    loss = (w * i).sum()\n    loss.backward()")
    assert [p.kind for p in t.passes] == ["backward"] * 3
    w = t.records[0]
    assert sorted(w.grads) == [0, 1, 2]
    for i in range(3):
        _close(w.grads[i], torch.full((2,), float(i)))
        _close(_step_for(steps(t, i), "w").grad_in[0], torch.full((2,), float(i)))
    _close(w.attr_grad, torch.full((2,), 10.0))  # 0+1+2+3+4, as torch says
    assert any("later passes were not recorded" in n for n in t.notes)
    assert "were not recorded" in " ".join(explain_record(t, 0))


def test_autograd_grad_of_an_intermediate_then_backward(shell):
    body = (
        "x = torch.tensor([1., 2.], requires_grad=True)\ny = x * 2\nz = y ** 2\n"
        "(gy,) = torch.autograd.grad(z.sum(), [y], retain_graph=True)\nz.sum().backward()"
    )
    t = run(shell, body)
    y = t.last("y")
    _close(y.grads[0], torch.tensor([4.0, 8.0]))  # d(sum y²)/dy = 2y
    first = steps(t, 1)[0]
    assert first.node == "SumBackward0" and y.id not in first.records
    assert [s.labels for s in steps(t, 1)][-1] == ["x"]
    pow_step = _step_for(steps(t, 0), "z")  # autograd.grad stops at y: y's node never runs
    assert pow_step.targets[0].labels == ["y"] and "to y" in pow_step.text
    _close(_step_for(steps(t, 1), "y").grad_in[0], torch.tensor([4.0, 8.0]))


PROGRAMS = [
    # reuse of one tensor on several paths, broadcasting, matmul with bias, activations
    "x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], requires_grad=True)\n"
    "b = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)\n"
    "h = x * x + b\n"
    "a = torch.sigmoid(h) * torch.tanh(x)\n"
    "loss = (a / (1 + h.abs())).sum()",
    "torch.manual_seed(0)\n"
    "W = torch.randn(3, 4, requires_grad=True)\n"
    "c = torch.randn(4, requires_grad=True)\n"
    "inp = torch.randn(5, 3)\n"
    "pre = inp @ W + c\n"
    "act = torch.relu(pre)\n"
    "flat = act.reshape(-1)\n"
    "part = torch.cat([flat[:7], flat[10:] * 2])\n"
    "loss = torch.nn.functional.mse_loss(part, torch.zeros_like(part))",
    "p = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)\n"
    "q = p.exp() - p.log()\n"
    "r = q.view(2, 2).t()\n"
    "s = r.mean(dim=0)\n"
    "loss = (s ** 3).sum() - (p * q).sum() / 10",
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_named_tensor_received_what_torch_computes(shell, program):
    t = run(shell, program + "\nloss.backward()")
    ns: dict = {"torch": torch}
    exec(program, ns)
    names = [n for n, v in ns.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    refs = torch.autograd.grad(ns["loss"], [ns[n] for n in names], allow_unused=True)
    st = steps(t, 0)
    checked = 0
    for name, ref in zip(names, refs):
        rec = t.last(name)
        assert rec is not None, name
        if ref is None:
            assert 0 not in rec.grads
            continue
        _close(rec.grads[0], ref)
        _close(_step_for(st, name).grad_in[0], ref)
        checked += 1
    assert checked >= 4
    # what every node sent on arrives: each target's received grad is the sum of what was sent to it
    sent: dict[int, np.ndarray] = {}
    for s in st:
        for g, tg in zip(s.grad_out, s.targets):
            if tg.node_id is not None and g is not None and g.complete:
                sent[tg.node_id] = sent.get(tg.node_id, 0) + np.asarray(g.values, dtype=np.float64)
    for s in st:
        if s.node_id in sent and s.grad_in and s.grad_in[0] is not None and s.grad_in[0].complete:
            np.testing.assert_allclose(np.asarray(s.grad_in[0].values, dtype=np.float64), sent[s.node_id], rtol=1e-5, atol=1e-6)


def test_custom_function_step(shell):
    shell.run_cell(
        "import torch\nclass Square(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x):\n"
        "        ctx.save_for_backward(x)\n        return x * x\n    @staticmethod\n    def backward(ctx, g):\n"
        "        (x,) = ctx.saved_tensors\n        return 2 * x * g\n"
    )
    t = run(shell, "x = torch.tensor([1., -3.], requires_grad=True)\ny = Square.apply(x).sum()\ny.backward()", setup="pass")
    st = steps(t, 0)
    custom = next(s for s in st if s.node == "SquareBackward")
    assert "Square.backward()" in custom.rule
    _close(custom.grad_out[0], torch.tensor([2.0, -6.0]))
    assert custom.targets[0].labels == ["x"]


def test_a_leaf_updated_in_place_is_named_once_per_step(shell):
    """An optimizer's step makes a record per version of each parameter: the stepper still names
    the parameter once where AccumulateGrad adds into it, and once as the target it sends to."""
    t = run(shell, "torch.manual_seed(0)\nm = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
                   "for i in range(3):\n    opt.zero_grad()\n    m(torch.ones(1, 2)).sum().backward()\n    opt.step()")
    for p in t.passes:
        for s in steps(t, p.index):
            assert len(s.labels) == len(set(s.labels)), (p.index, s.node, s.labels)
            for target in s.targets:
                assert len(target.labels) == len(set(target.labels)), (p.index, s.node, target.labels)
        acc = [s for s in steps(t, p.index) if s.node == "AccumulateGrad"]
        assert sorted(s.labels[0] for s in acc) == ["m.bias", "m.weight"]
