"""Debugging real training cells (issue 16): the first NaN/Inf and gradient flow, against torch's own.

Each cell runs through the magic in a fresh IPython shell (`%%autograd -o t`), and the same
code runs plainly; plain PyTorch says which tensor first holds a NaN or an Inf
(`torch.isfinite`), which autograd node first sends a non-finite gradient (node hooks), and
what each parameter's `.grad.norm()` is. The trace must say the same.
"""

from __future__ import annotations

import math

from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from autograd_magic import limits
from autograd_magic.capture.preview import DeviceQueue, preview
from autograd_magic.explain.debug import EXPLODING, VANISHING, flow_summary, nonfinite_kind
from autograd_magic.render.debug import banner_html, debug_payload, flow_svg
from autograd_magic.render.payload import build_payload
from autograd_magic.render.snapshot import snapshot_html
from run_cells import backward_order, plain as _plain, traced as _traced

LOG0 = """x = torch.tensor([1.0, 0.5, 3.0], requires_grad=True)
h = x - 1.0
z = torch.relu(h)
p = torch.log(z)
loss = (p * z).sum()
loss.backward()
"""
LOG0_ORDER = ["x", "h", "z", "p", "loss"]  # the cell's tensors in the order it makes them

EXP = """a = torch.tensor([29.5, 1.0], requires_grad=True)
y = torch.exp(a)
cube = y ** 3
loss = cube.sum()
loss.backward()
"""

FINITE = """x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
y = (x ** 2).sum()
y.backward()
"""

TANH_SETUP = """import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(30) for m in (nn.Linear(16, 16), nn.Tanh())])
xs = torch.randn(8, 16)
"""
EXPLODE_SETUP = """import math
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(16, 16), nn.ReLU())])
for layer in model[::2]:
    nn.init.normal_(layer.weight, std=3 / math.sqrt(16))
xs = torch.randn(8, 16)
"""
STEP = "loss = model(xs).pow(2).mean()\nloss.backward()\n"


def _kind(t: torch.Tensor):
    """What plain torch says a tensor holds: "nan", "inf" or None."""
    if torch.isnan(t).any():
        return "nan"
    if torch.isinf(t).any():
        return "inf"
    return None


def _first_nonfinite_node(cell: str, root: str):
    """Plain PyTorch: run `cell` without its backward, hook every node of `root`'s graph, run
    the backward; the first node (in the order they ran) that received or sent a non-finite
    gradient, with what it received: (node name, [received gradients])."""
    forward = "\n".join(line for line in cell.splitlines() if ".backward(" not in line)
    ns = _plain(forward)
    for node, sent, received in backward_order(ns[root]):
        if any(g is not None and _kind(g) for g in tuple(sent) + tuple(received)):
            return type(node).__name__, [g for g in received if g is not None]
    return None


# ---- the statistics tell NaN and Inf exactly ---------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 64, 200, 20_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None])
def test_a_preview_says_exactly_whether_its_tensor_holds_nan_or_inf(n, dtype, value):
    torch.manual_seed(n)
    t = torch.randn(n, dtype=torch.float64).to(dtype)
    if value is not None:
        t[(n * 7) // 11] = value  # not an edge element: the statistics must see it, not the values
    for view in (t, t[1::2] if n > 1 else t, t.reshape(-1, 1).expand(-1, 2)):
        assert nonfinite_kind(preview(view)) == _kind(view), (n, dtype, value)
        queue = DeviceQueue(include_cpu=True)  # the device path (torch reductions, batched)
        p = queue.add(view, True)
        queue.flush()
        assert nonfinite_kind(p) == _kind(view)


def test_nan_wins_over_inf_and_a_finite_overflowing_sum_is_finite():
    both = torch.tensor([1.0, math.inf, math.nan, 2.0] * 40)
    assert nonfinite_kind(preview(both)) == "nan"
    big = torch.full((1000,), 3e38)  # its sum and norm overflow float32; its values don't
    p = preview(big)
    assert nonfinite_kind(p) is None and _kind(big) is None


# ---- forward: a loss that goes NaN through log(0) three ops after the input --------------------


def test_log_of_zero_is_found_where_torch_first_sees_a_nonfinite_value(shell):
    shell.run_cell("import torch")
    plain = _plain(LOG0)
    first = next(name for name in LOG0_ORDER if _kind(plain[name].detach()))
    assert torch.isnan(plain["loss"]).item()  # the loss goes NaN ...
    t = _traced(shell, LOG0)
    nf = t.nonfinite
    assert nf is not None and nf.label == first == "p"  # ... through the log, three ops after x
    assert nf.op == "log" and nf.expr == "torch.log(z)"
    assert t.source_line(nf.line).strip() == "p = torch.log(z)"
    made = [r.id for r in t.records]
    assert made.index(nf.record) - made.index(t.last("x").id) == 3  # three ops after the input
    assert nf.kind == _kind(plain["p"].detach())
    assert nf.count == int((~torch.isfinite(plain["p"])).sum())
    (z,) = nf.inputs
    assert z.label == "z" and z.kind is None
    assert z.preview.min == plain["z"].min().item() and z.preview.max == plain["z"].max().item()
    assert math.isclose(z.preview.mean, plain["z"].mean().item(), rel_tol=1e-6)


def test_log_of_zero_backward_names_the_node_torch_hooks_see_first(shell):
    shell.run_cell("import torch")
    t = _traced(shell, LOG0)
    (found,) = t.backward_nonfinite
    name, received = _first_nonfinite_node(LOG0, "loss")
    assert found.node == name
    assert [g.norm for g in found.received] == pytest.approx([r.double().norm().item() for r in received])


def test_the_banner_names_the_origin_and_links_to_its_row(shell):
    shell.run_cell("import torch")
    t = _traced(shell, LOG0)
    html = snapshot_html(t, graph=False)
    banner = html[html.index('class="am-debug"') : html.index("autograd trace")]
    assert "First Inf in forward" in banner and "torch.log(z)" in banner and "line 5" in banner
    anchor = banner.split('href="#', 1)[1].split('"', 1)[0]
    assert f'<tr data-record="{t.nonfinite.record}" id="{anchor}"' in html
    assert "min 0" in banner and "max 1" in banner  # its input's statistics
    assert str(t).splitlines()[1].startswith("First Inf in forward: `p = torch.log(z)` on line 5")
    payload = build_payload(t)["debug"]
    assert payload["forward"]["id"] == t.nonfinite.record
    assert payload["backward"][0]["text"].startswith("Backward pass 1:")


# ---- backward only: an overflow in exp that forward never shows -------------------------------


def test_exp_overflow_only_in_backward(shell):
    shell.run_cell("import torch")
    plain = _plain(EXP)
    assert all(_kind(plain[n].detach()) is None for n in ("a", "y", "cube", "loss"))  # forward is finite
    assert _kind(plain["a"].grad) == "inf"  # the gradient is not
    t = _traced(shell, EXP)
    assert t.nonfinite is None
    (found,) = t.backward_nonfinite
    name, received = _first_nonfinite_node(EXP, "loss")
    assert found.node == name == "ExpBackward0"
    assert not found.received_nonfinite  # it turned Inf there: it received finite values
    assert [g.norm for g in found.received] == pytest.approx([r.double().norm().item() for r in received], rel=1e-6)
    assert [t.records[i].label for i in found.targets] == ["a"]
    html = snapshot_html(t, graph=False)
    assert "First Inf in forward" not in html and "ExpBackward0" in html[: html.index("autograd trace")]


def test_an_all_finite_cell_shows_no_banner_and_no_chart(shell):
    shell.run_cell("import torch")
    t = _traced(shell, FINITE)
    assert t.nonfinite is None and t.backward_nonfinite == [] and t.grad_flow() == []
    assert banner_html(t) == "" and debug_payload(t) is None
    html = snapshot_html(t, graph=False)
    assert "am-debug" not in html and "gradient flow" not in html
    assert str(t).splitlines()[1].startswith("line")  # the table right under the header
    assert t.grad_flow(leaves=True)[0].params[0].label == "x"  # a plain leaf only when asked for


# ---- gradient flow: vanishing and exploding stacks, norms against p.grad.norm() ---------------


def _torch_flags(norms: dict, values: dict) -> dict:
    """The documented rule applied to torch's own norms."""
    finite = [v for v in norms.values() if math.isfinite(v)]
    largest = max(finite)
    flags = {}
    for name, n in norms.items():
        if not math.isfinite(n) or n > EXPLODING * values[name]:
            flags[name] = "exploding"
        elif n < VANISHING * largest:
            flags[name] = "vanishing"
        else:
            flags[name] = None
    return flags


def _check_flow(shell, setup: str):
    shell.run_cell(setup)
    values = {f"model.{n}": p.norm().item() for n, p in shell.user_ns["model"].named_parameters()}
    t = _traced(shell, STEP)
    model = shell.user_ns["model"]  # the traced cell ran as a plain one: these are torch's gradients
    norms = {f"model.{n}": p.grad.norm().item() for n, p in model.named_parameters()}
    (flow,) = t.grad_flow()
    assert [p.label for p in flow.params] == list(norms)
    for p in flow.params:
        assert p.norm == pytest.approx(norms[p.label], rel=1e-5, abs=1e-30)
        assert p.value_norm == pytest.approx(values[p.label], rel=1e-6)
    assert {p.label: p.flag for p in flow.params} == _torch_flags(norms, values)
    modules = {m.module: m.norm for m in flow.modules}
    for name, mod in model.named_children():
        grads = [p.grad.norm().item() for p in mod.parameters()]
        if grads:
            assert modules[f"model.{name}"] == pytest.approx(math.hypot(*grads), rel=1e-5)
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert flow.total == pytest.approx(total, rel=1e-5)
    return t, flow


def test_a_thirty_layer_tanh_stack_flags_its_vanishing_early_gradients(shell):
    t, flow = _check_flow(shell, TANH_SETUP)
    flags = {p.label: p.flag for p in flow.params}
    assert flags["model.0.weight"] == "vanishing" and flags["model.58.weight"] is None
    assert "exploding" not in flags.values()
    svg = flow_svg(flow)
    assert "<script" not in svg and "vanishing" in svg and len(svg) <= limits.DEBUG_FLOW_BYTES
    root = ElementTree.fromstring(svg)  # well-formed; 60 parameters are more bars than fit: one per module
    bars = [g for g in root.iter("{http://www.w3.org/2000/svg}g")]
    assert len(bars) == 30 and "per module" in svg
    html = snapshot_html(t, graph=False)
    assert "gradient flow" in html and "data:image/svg+xml," in html and "vanishing: model.0.weight" in html
    assert build_payload(t)["debug"]["flow"]["svg"].startswith("<svg")


def test_a_deep_stack_initialised_to_explode_is_flagged(shell):
    t, flow = _check_flow(shell, EXPLODE_SETUP)
    weights = [p for p in flow.params if p.label.endswith("weight")]
    assert all(p.flag == "exploding" for p in weights)
    assert all(p.norm > EXPLODING * p.value_norm for p in weights)
    assert "exploding" in flow_svg(flow)


PART_NAN_SETUP = """import torch
from torch import nn
torch.manual_seed(0)
model = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1), nn.Linear(4, 1)])
xs = torch.randn(8, 4)
"""
BRANCHES = "loss = sum(m(xs).pow(2).mean() for m in model)\nloss.backward()\n"  # a NaN stays in its own branch


@pytest.mark.parametrize("nan_layers", [(1,), (0, 1, 2)])
def test_the_flow_summary_names_non_finite_norms_and_takes_largest_and_median_over_the_finite(shell, nan_layers):
    """A weight made NaN turns its own branch's gradients NaN (what plain torch's .grad holds): the
    summary counts those, and its largest and median are those of the finite norms."""
    shell.run_cell(PART_NAN_SETUP)
    for i in nan_layers:
        shell.run_cell(f"with torch.no_grad():\n    model[{i}].weight[0, 0] = float('nan')")
    t = _traced(shell, BRANCHES)
    norms = [p.grad.norm().item() for p in shell.user_ns["model"].parameters()]
    finite = sorted(n for n in norms if math.isfinite(n))
    (flow,) = t.grad_flow()
    summary = flow_summary(flow)
    nonfinite = len(norms) - len(finite)
    assert 0 < nonfinite and "?" not in summary, summary
    if finite:
        median = (finite[1] + finite[2]) / 2  # four finite norms: the two branches left
        assert nonfinite == 2 and len(finite) == 4, norms
        assert f"2 non-finite; of the finite ones, largest {finite[-1]:.3g}, median {median:.3g}" in summary, (summary, norms)
    else:
        assert "no finite norm" in summary and "largest" not in summary, summary


def test_chart_stays_within_its_bytes_for_a_wide_model(shell):
    setup = "import torch\nfrom torch import nn\nmodel = nn.Sequential(*[nn.Linear(4, 4) for _ in range(300)])\nxs = torch.randn(2, 4)"
    shell.run_cell(setup)
    t = _traced(shell, STEP)
    (flow,) = t.grad_flow()
    assert len(flow.params) == 600 and len(flow.modules) == 300
    svg = flow_svg(flow)
    assert len(svg) <= limits.DEBUG_FLOW_BYTES and "more" in svg
    assert np.isfinite(flow.total)


def test_a_nan_in_a_later_loop_iteration_names_that_iteration(shell):
    cell = "w = torch.tensor([1.0, 2.0], requires_grad=True)\nfor i in range(3):\n    y = torch.log(w - i * 0.5)\n"
    shell.run_cell("import torch")
    plain = [torch.log(torch.tensor([1.0, 2.0]) - i * 0.5) for i in range(3)]
    first = next(i for i, y in enumerate(plain) if _kind(y))
    t = _traced(shell, cell)
    nf = t.nonfinite
    assert nf.label == "y" and nf.occurrence == first == 2 and nf.kind == _kind(plain[first])
    assert "(run 3 of that line)" in str(t).splitlines()[1]


def test_one_show_analyses_a_trace_once_and_says_the_same(shell, monkeypatch):
    """Within `one_look` (what display.show wraps the view and snapshot in), the banner, the text
    view and the widget's data read one analysis of the trace; outside it each makes its own.
    What they say is the same either way."""
    import autograd_magic.render.debug as rdebug

    shell.run_cell("import torch")
    t = _traced(shell, LOG0)
    calls = []
    real = rdebug.backward_nonfinite
    monkeypatch.setattr(rdebug, "backward_nonfinite", lambda tr: calls.append(tr) or real(tr))

    def everything():
        return rdebug.text_lines(t), banner_html(t), debug_payload(t)

    apart = everything()
    assert len(calls) == 3
    calls.clear()
    with rdebug.one_look():
        together = everything()
        with rdebug.one_look():  # nested: the outer one's answers still hold
            assert everything() == together
    assert len(calls) == 1
    assert together == apart and apart[1]  # LOG0's NaN: the banner says something
    calls.clear()
    everything()
    assert len(calls) == 3  # nothing kept after the show


def _six_passes():
    """A trace of six backward passes of a Linear, and torch's total gradient norm after each."""
    import autograd_magic as am

    torch.manual_seed(4)
    model = torch.nn.Linear(3, 2)
    xs = torch.randn(6, 4, 3)
    plain_norms = []
    with am.trace(detail_limit=10) as t:
        for k in range(6):
            model.zero_grad()
            model(xs[k]).pow(2).sum().backward()
            plain_norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
    return t, plain_norms


def test_the_snapshot_draws_the_last_pass_and_folds_the_ones_the_widget_can_switch_to():
    """The saved snapshot has the same passes as the widget's buttons: the last one drawn open,
    the three before it each a folded block (latest first) with torch's total norm of that pass."""
    import re
    import urllib.parse

    t, plain_norms = _six_passes()
    html = snapshot_html(t, graph=False)
    start = html.index("<b>gradient flow</b>")
    body = html[start:]
    folded = re.findall(r"<details><summary><b>pass (\d+)</b></summary><div>(.*?)</div></details>", body)
    assert [int(n) for n, _ in folded] == [5, 4, 3]  # DEBUG_FLOW_PASSES in all, the last one open above them
    for n, block in folded:
        assert f"total gradient norm {plain_norms[int(n) - 1]:.3g}" in block
        svg = urllib.parse.unquote(re.search(r'src="data:image/svg\+xml,([^"]*)"', block).group(1))
        assert f"pass {n}, log scale" in svg
    last = body[: body.index("<details><summary><b>pass 5")]
    assert f"total gradient norm {plain_norms[5]:.3g}" in last and "the last of 6 passes; the 3 before it folded below; trace.grad_flow() has each" in last
    assert "pass 6, log scale" in urllib.parse.unquote(last)


def test_past_the_snapshot_budget_the_earlier_passes_give_way_before_the_last_one(monkeypatch):
    """A snapshot over its byte budget first drops the folded earlier passes and keeps the last
    pass's chart; only past that does the gradient-flow section give way to a line."""
    t, plain_norms = _six_passes()
    full = snapshot_html(t, graph=False)
    folded = full.count("<details><summary><b>pass ")
    assert folded == 3
    monkeypatch.setattr(limits, "SNAPSHOT_HTML_BYTES", len(full) - 1)
    lean = snapshot_html(t, graph=False)
    assert "<details><summary><b>pass " not in lean and len(lean) <= limits.SNAPSHOT_HTML_BYTES
    body = lean[lean.index("<b>gradient flow</b>"):]
    assert f"total gradient norm {plain_norms[5]:.3g}" in body and "pass 6, log scale" in urllib_unquote(body)
    assert "the last of 6 passes; trace.grad_flow() has each" in body  # no word of folded passes
    # tighter still: the whole section gives way to its line, as any section does
    monkeypatch.setattr(limits, "SNAPSHOT_HTML_BYTES", 1000)
    tight = snapshot_html(t, graph=False)
    flow = tight[tight.index("<b>gradient flow</b>"):]
    assert flow[: flow.index("</details>")].count("Left out of this snapshot") == 1


def urllib_unquote(text: str) -> str:
    import urllib.parse

    return urllib.parse.unquote(text)


def test_the_widget_gets_each_recorded_pass_s_gradient_flow_with_torch_s_norms():
    from autograd_magic.render.debug import debug_payload

    t, plain_norms = _six_passes()
    flow = debug_payload(t)["flow"]
    passes = flow["passes"]
    assert len(passes) == limits.DEBUG_FLOW_PASSES and flow["selected"] == len(passes) - 1
    assert [p["pass"] for p in passes] == [2, 3, 4, 5]  # the last four of six
    for p in passes:
        assert p["svg"].startswith("<svg") and p["summary"].startswith(f"pass {p['pass'] + 1}:")
        assert f"total gradient norm {plain_norms[p['pass']]:.3g}" in p["summary"]
        assert "2 earlier passes" in p["summary"]


def test_a_node_that_sends_inf_on_one_edge_and_nan_on_another_turns_the_gradient_nan(shell):
    # x / x at 0: DivBackward0 sends 1/x (Inf) to the numerator and -x/x² (NaN) to the denominator,
    # both x: x.grad is NaN there. Plain torch's own node says what it sends (a post-hook reads it)
    from autograd_magic.explain.debug import backward_nonfinite, backward_sentence

    cell = "x = torch.tensor([0.0, 2.0], requires_grad=True)\ny = (x / x).sum()\ny.backward()"
    x = torch.tensor([0.0, 2.0], requires_grad=True)
    q = x / x
    sent = []
    q.grad_fn.register_hook(lambda grad_inputs, grad_outputs: sent.extend(grad_inputs))
    q.sum().backward()
    assert {nonfinite_kind(preview(g)) for g in sent} == {"inf", "nan"} and math.isnan(x.grad[0])
    t = _traced(shell, cell)
    (b,) = backward_nonfinite(t)
    assert b.node == q.grad_fn.name() and b.kind == "nan"
    text = backward_sentence(b, t)
    assert "the gradient turns NaN in DivBackward0" in text and "sent Inf and NaN to x" in text, text


# ---- infinities a mask was given are not where a NaN came from -------------------------------------

ATTENTION = """torch.manual_seed(0)
scores = torch.randn(2, 4, 4, requires_grad=True)
mask = torch.triu(torch.full((4, 4), float("-inf")), diagonal=1)
weights = (scores + mask).softmax(-1)
padded = scores.masked_fill(torch.tensor([False, False, True, True]), float("-inf")).softmax(-1)
loss = (weights * padded).sum()
"""


def test_the_infinities_of_an_attention_mask_are_not_reported_as_an_origin(shell):
    """`-inf` written into a mask (torch.full, masked_fill) and carried on (scores + mask) is the
    mask's; the softmax after it is finite, so nothing is reported, as torch computes it."""
    ns = _plain(ATTENTION)
    assert torch.isinf(ns["mask"]).any() and torch.isfinite(ns["loss"])
    t = _traced(shell, ATTENTION)
    assert t.nonfinite is None, t.nonfinite
    assert "First" not in str(t).splitlines()[1]


def test_a_nan_after_a_mask_is_still_found_where_it_first_appears(shell):
    """A row masked entirely: its softmax is NaN (0/0), found at the softmax, not at the mask."""
    cell = "scores = torch.ones(2, 3)\nmasked = scores.masked_fill(torch.tensor([[True] * 3, [False] * 3]), float('-inf'))\np = masked.softmax(-1)"
    ns = _plain(cell)
    assert ns["p"][0].isnan().all()
    t = _traced(shell, cell)
    assert t.nonfinite is not None and t.nonfinite.kind == "nan" and t.nonfinite.op == "softmax"
