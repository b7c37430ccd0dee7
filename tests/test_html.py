"""The static HTML snapshot: no scripts, everything escaped, the seed figures, variant highlights.

Traces come from the real magic on real cells; reference values from
plain PyTorch printing the same tensors.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest
import torch

from autograd_magic.data.identity import changed_fields, match_records
from autograd_magic.explain.wording import grad_phrase
from autograd_magic.render.html import render_html, section
from autograd_magic.variants.interventions import Toggles
from autograd_magic.variants.sandbox import run_variant, take_snapshot

ALLOWED_TAGS = {"div", "span", "b", "i", "code", "pre", "table", "thead", "tbody", "tr", "th", "td",
                "details", "summary", "ul", "li"}


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, list]] = []
        self.text: list[str] = []
        self.sheets: list[str] = []  # the text of each <style> element
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.sheets if self._in_style else self.text).append(data)


def parse(fragment: str) -> _Tags:
    p = _Tags()
    p.feed(fragment)
    p.close()
    return p


def assert_safe(fragment: str) -> _Tags:
    """Only layout tags, no event handlers, no scripts, no external styles.

    One <style> element is allowed: the snapshot's own sheet, exactly `html_table.CSS`
    (every rule scoped to `.agm-s`, nothing fetched), never one made of user text.
    """
    from autograd_magic.render.html_table import CSS

    assert "<script" not in fragment.lower()
    parsed = parse(fragment)
    for tag, attrs in parsed.tags:
        assert tag in ALLOWED_TAGS | {"style"}, tag
        for name, _ in attrs:
            assert name in {"style", "class", "colspan", "open", "data-record", "data-changed"}, name
    assert sum(1 for tag, _ in parsed.tags if tag == "style") <= 1
    assert parsed.sheets in ([], [CSS])
    selectors = [sel for group in re.findall(r"([^{}]+)\{[^{}]*\}", CSS) for sel in group.split(",")]
    assert selectors and all(sel.startswith(".agm-s ") for sel in selectors), selectors
    assert "url(" not in CSS and "@import" not in CSS and "<" not in CSS
    return parsed


def magic(shell, body: str, flags: str = ""):
    shell.run_cell(f"%%autograd --quiet -o _t {flags}\n{body}")
    return shell.user_ns.pop("_t")


def run(shell, body: str) -> None:
    result = shell.run_cell(body)
    assert result.success, result.error_in_exec


NASTY = "<script>alert(1)</script> <img src=x onerror=alert(2)> \"dq\" 'sq' {braces} {{0}}"


# ---- safety ----
def test_error_messages_and_source_are_escaped(shell):
    run(shell, "import torch")
    body = (
        "x = torch.ones(2, requires_grad=True)\n"
        f"y = x * len({NASTY!r})\n"
        f"raise ValueError({NASTY!r} + '\\nsecond line')"
    )
    t = magic(shell, body)
    assert t.error is not None and "<script>" in t.error.message
    out = render_html(t)
    parsed = assert_safe(out)
    text = "".join(parsed.text)
    assert "<img src=x onerror=alert(2)>" in text  # shown as text, not as a tag
    assert '"dq"' in text and "'sq'" in text and "{braces} {{0}}" in text
    assert "second line" in text
    assert html.escape("<script>alert(1)</script>") in out


def test_module_paths_and_names_are_escaped(shell):
    run(shell, "import torch\nm = torch.nn.Sequential()\n"
               "m.add_module('<img src=x onerror=alert(3)>', torch.nn.Linear(2, 1))\n"
               "inp = torch.ones(1, 2)")
    t = magic(shell, "out = m(inp).sum()\nout.backward()")
    assert any("<img" in (r.name or "") for r in t.records)
    out = render_html(t)
    parsed = assert_safe(out)
    assert "m.<img src=x onerror=alert(3)>.weight" in "".join(parsed.text)


def test_variant_error_and_sections_are_safe(shell):
    run(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)")
    body = f"y = x * 3\nlabel = {NASTY!r}\ny.backward()"
    snap = take_snapshot(shell, body)
    t = magic(shell, body)
    v = run_variant(shell, body, t, snap, Toggles(no_grad=True))
    extra = section(NASTY, "<div>trusted body</div>")
    out = render_html(t, variant=v, sections=[extra])
    parsed = assert_safe(out)
    assert NASTY in "".join(parsed.text)
    assert out.endswith("</div></details></div>")  # sections come last, inside the box


# ---- content ----
def test_seed_polynomial_values_and_gradient(shell, seeds):
    run(shell, seeds.NOTEBOOKS["000"][0] + "\n" + seeds.NOTEBOOKS["000"][1])
    t = magic(shell, "y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()")
    px = torch.tensor(2.0, requires_grad=True)
    py = 2 * px**4 + px**3 + 3 * px**2 + 5 * px + 1
    py.backward()
    out = render_html(t)
    assert html.escape(str(py)) in out  # tensor(63., grad_fn=<AddBackward0>)
    assert html.escape(str(px.grad)) in out  # tensor(93.)
    assert "63." in str(py) and "93." in str(px.grad)
    assert t.to_html() == out


def test_seed_2x3_gradient_as_torch_prints_it(shell, seeds):
    run(shell, "import torch")
    t = magic(shell, seeds.NOTEBOOKS["001"][5])
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    y = 3 * x + 2
    y.retain_grad()
    z = 2 * y**2
    z.mean().backward()
    out = render_html(t)
    assert html.escape(str(x.grad)) in out
    assert html.escape(str(y.grad)) in out  # retained, so torch keeps it and so do we
    assert html.escape(str(z)) in out
    # the line's source heads its group
    assert html.escape("z = 2 * y**2") in out


def test_each_row_shows_the_gradient_beside_the_value(shell, seeds):
    """A snapshot narrower than its table (GitHub, a notebook pane) scrolls the last columns out of
    sight: the gradient is next to the value there, as in the widget, and shape and dtype come last."""
    run(shell, "import torch")
    t = magic(shell, seeds.NOTEBOOKS["001"][5])
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    z = 2 * (3 * x + 2) ** 2
    z.mean().backward()
    out = render_html(t)
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", out).group(1)
    names = re.findall(r"<th>(.*?)</th>", header)
    assert names[:3] == ["tensor", "value", "gradient"] and names[-2:] == ["shape", "dtype"], names
    row = re.search(r'<tr data-record="0">(.*?)</tr>', out, re.S).group(1)  # x, the leaf
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    assert len(cells) == len(names)
    assert html.escape(str(x.grad)) in cells[2] and html.escape(str(x.grad)) not in cells[1]


def test_gradient_column_before_backward_and_none_phrases(shell):
    run(shell, "import torch\nx = torch.ones(2, requires_grad=True)")
    before = magic(shell, "y = x * 2\nc = torch.ones(2)")
    out = render_html(before)
    assert "—" in out and "backward did not reach" not in out
    t = magic(shell, "y = x * 2\nc = torch.ones(2)\nz = (y * c).sum()\nz.backward()")
    y = torch.ones(2, requires_grad=True) * 2
    c = torch.ones(2)
    assert y.grad_fn is not None and not y.is_leaf and c.grad is None  # what torch does
    assert grad_phrase(t.last("y"), t) == "None (non-leaf, no retain_grad)"
    assert grad_phrase(t.last("c"), t) == "None (requires_grad=False)"
    assert grad_phrase(t.last("x"), t) == ""
    out = render_html(t)
    assert "None (non-leaf, no retain_grad)" in out and "None (requires_grad=False)" in out


def test_no_grad_phrase(shell):
    run(shell, "import torch\nx = torch.ones(2, requires_grad=True)")
    t = magic(shell, "with torch.no_grad():\n    y = x * 2")
    assert grad_phrase(t.last("y"), t) == "None (made under no_grad)"


def test_internal_ops_folded_and_loops_counted(shell):
    run(shell, "import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())\n"
               "x = torch.ones(1, 3)")
    t = magic(shell, "h = model(x)\nacc = torch.zeros(4)\nfor i in range(7):\n    acc = acc + h[0] * i\nacc.sum().backward()")
    internal = [r for r in t.records if r.internal and not r.external]
    assert internal
    out = render_html(t)
    import re

    folded = [int(n) for n in re.findall(r"<summary[^>]*>(\d+) ops? inside ", out)]
    assert folded and sum(folded) == len(internal)
    assert all(r.line == 2 for r in internal)  # the Linear/ReLU internals fold under `h = model(x)`
    assert t.repeats and "×7" in out
    assert "backward pass 1" in out


def test_error_shown_at_its_line(shell):
    run(shell, "import torch\nx = torch.randn(4)")
    t = magic(shell, "y = x + 2\nz = (y*y*2).mean()\nz.backward()")
    assert t.error is not None and t.error.line == 4
    out = render_html(t)
    table_part = out[out.index("<table"):]
    assert html.escape("RuntimeError (line 4): element 0 of tensors does not require grad") in table_part


# ---- variants ----
def test_variant_highlights_changed_cells(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    body = "y = 3*x + 2\nz = (y * x).sum()\nz.backward()"
    snap = take_snapshot(shell, body)
    t = magic(shell, body)
    v = run_variant(shell, body, t, snap, Toggles(detach_names=("y",)))
    matches = match_records(t, v)
    assert len(matches) == len(t.records)
    y_o, y_v = t.last("y"), v.records[matches[t.last("y").id]]
    assert "detached" in changed_fields(y_o, y_v)
    x_o, x_v = t.last("x"), v.records[matches[t.last("x").id]]
    # plain torch: with y detached, x's gradient is y (5, 8) instead of 2y + 3x... so it changes
    px = torch.tensor([1.0, 2.0], requires_grad=True)
    ((3 * px + 2).detach() * px).sum().backward()
    assert x_v.attr_grad.values.tolist() == px.grad.tolist()
    assert "grad" in changed_fields(x_o, x_v)
    out = render_html(t, variant=v)
    assert_safe(out)
    assert 'data-changed="grad"' in out and "background:#fff1b8" in out
    assert "variant: detached y" in out
    assert html.escape(str(px.grad)) in out


def test_identical_rerun_has_no_highlights(shell):
    run(shell, "import torch\nx = torch.tensor([1., 2.], requires_grad=True)")
    body = "y = (x * 2).sum()\ny.backward()"
    snap = take_snapshot(shell, body)
    t = magic(shell, body)
    v = run_variant(shell, body, t, snap)
    assert all(not changed_fields(t.records[o], v.records[n]) for o, n in match_records(t, v).items())
    assert "data-changed" not in render_html(t, variant=v)


def test_no_grad_variant_shows_the_error_at_its_line(shell):
    run(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)")
    body = "y = 2*x**4 + x**3\ny.backward()"
    snap = take_snapshot(shell, body)
    t = magic(shell, body)
    v = run_variant(shell, body, t, snap, Toggles(no_grad=True))
    out = render_html(t, variant=v)
    assert grad_phrase(v.last("x"), v) == "None (backward failed)"
    assert "under torch.no_grad()" in out
    assert html.escape("RuntimeError (line 3): element 0 of tensors does not require grad") in out
    assert 'data-changed="grad_fn"' in out and 'data-changed="requires_grad"' in out


@pytest.mark.parametrize("phrase_case", ["detached"])
def test_grad_phrase_detached(shell, phrase_case):
    run(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)")
    v = magic(shell, "y = x * 3\nz = y * 2", flags="--detach y")
    assert grad_phrase(v.last("y"), v) == "None (detached)"


def test_long_traces_are_capped(shell):
    run(shell, "import torch\nx = torch.ones(2, requires_grad=True)")
    body = "acc = x * 1\n" + "".join(f"acc = acc + x * {i}\n" for i in range(40))
    t = magic(shell, body)
    full = render_html(t)
    assert "more tensors are not shown" not in full
    from autograd_magic.render.html import table

    capped = table(t, max_rows=10)
    assert capped.count("data-record=") == 10
    assert f"{len(t.records) - 10} more tensors are not shown" in capped


def test_trace_outside_ipython_renders(tmp_path):
    import autograd_magic as am

    x = torch.ones(2, requires_grad=True)
    with am.trace() as t:
        y = (x * 3).sum()
        y.backward()
    out = assert_safe(t.to_html())
    text = "".join(out.text)
    assert str(x.grad) == "tensor([3., 3.])" and str(x.grad) in text  # the gradient as torch prints it
    assert str(y) in text


def test_a_variant_alone_is_shown_against_its_original(shell):
    run(shell, "import torch\nx = torch.tensor(2.0, requires_grad=True)")
    v = magic(shell, "y = x * 3\ny.backward()", flags="--no-grad")
    assert v.variant_of is not None
    out = v.to_html()
    assert out == render_html(v.variant_of, variant=v)
    assert "variant: under torch.no_grad()" in out and 'data-changed="grad_fn"' in out


def test_an_in_place_statement_is_not_shown_as_an_assignment(shell):
    """`h += 1` and `h.relu_()` change h: their rows show the statement, never `h = h += 1`."""
    from autograd_magic.render.text import render_text

    run(shell, "import torch")
    t = magic(shell, "w = torch.randn(3, requires_grad=True)\nh = w * 2\nh.relu_()\nh += 1")
    plain_h = torch.relu(torch.as_tensor(t.last("w").preview.values) * 2) + 1
    assert torch.allclose(torch.as_tensor(t.records[-1].preview.values), plain_h)
    for text in (render_text(t), html.unescape(re.sub(r"<[^>]+>", "", render_html(t)))):
        for bad in ("h = h += 1", "h = h.relu_()"):
            assert bad not in text, bad
        assert "h += 1" in text and "h.relu_()" in text



def test_a_runs_badge_counts_the_ops_own_runs_not_every_op_on_its_line():
    """`h[:, 1] *= 2` reads the slice (`__getitem__`), then writes it back (`__setitem__`) on the same
    span: the write is no second run of anything. In a loop each op's rows are numbered by iteration."""
    import autograd_magic as am
    from autograd_magic.data.trace import op_run
    from autograd_magic.render.html_table import label_cell
    from autograd_magic.render.text import render_text

    with am.trace() as t:
        h = torch.ones(2, 3, requires_grad=True) * 1
        h[:, 1] *= 2
        for _ in range(3):
            h = h * 2
    read = next(r for r in t.records if r.op == "getitem")
    write = next(r for r in t.records if r.op == "setitem")
    assert write.span == read.span and write.occurrence == 1  # the span's second op: the identity counts both
    assert op_run(t, read) == op_run(t, write) == 1
    assert "#" not in label_cell(write, t)
    loop = [r for r in t.records if r.expr == "h * 2"]
    assert [op_run(t, r) for r in loop] == [1, 2, 3]  # range(3)
    assert ["#" in label_cell(r, t) for r in loop] == [False, True, True]
    text = render_text(t)
    assert text.count("#2") == 1 and text.count("#3") == 1
