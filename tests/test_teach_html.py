"""Static HTML of the stepper, explanations and gradient check: content, escaping, well-formedness."""

from __future__ import annotations

from html.parser import HTMLParser

from autograd_magic.variants.gradcheck import LeafCheck
from autograd_magic.render.teach_html import explanations_html, gradcheck_html, stepper_html

VOID = {"br", "hr", "img", "meta", "input", "col", "wbr"}


class _Balance(HTMLParser):
    """Balanced tags, no scripts, no event handlers; a <style> only where `sheet` is allowed
    (a whole snapshot has its one sheet, `html_table.CSS`; the fragments have none)."""

    def __init__(self, sheet: bool = False):
        super().__init__()
        self.stack: list[str] = []
        self.bad: list[str] = []
        self.sheet = sheet
        self.sheets: list[str] = []

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "style":
            self.sheets.append(data)

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "link", "iframe") or (tag == "style" and not self.sheet):
            self.bad.append(tag)
        if any(name.startswith("on") for name, _ in attrs):
            self.bad.append(f"{tag} event handler")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()


def well_formed(fragment: str, sheet: bool = False) -> None:
    from autograd_magic.render.html_table import CSS

    p = _Balance(sheet)
    p.feed(fragment)
    p.close()
    assert not p.stack, p.stack
    assert not p.bad, p.bad
    assert p.sheets in ([], [CSS])


def traced(shell, body: str, flags: str = "--quiet"):
    shell.run_cell("import torch")
    shell.user_ns.pop("t", None)
    shell.run_cell(f"%%autograd {flags} -o t\n" + body)
    return shell.user_ns["t"]


SEED_001 = "x = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)\ny = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()"


def test_stepper_html_shows_the_chain(shell):
    t = traced(shell, SEED_001)
    html = stepper_html(t)
    well_formed(html)
    for text in ("MeanBackward0", "0.1667 in each of 6 elements", "AccumulateGrad", "[[10., 16., 22.], [22., 16., 10.]]",
                 "divided by the number of elements", "Backward pass 1"):
        assert text in html, text
    assert html.index("MeanBackward0") < html.index("PowBackward0") < html.index("AccumulateGrad")


def test_explanations_html(shell):
    t = traced(shell, SEED_001)
    html = explanations_html(t)
    well_formed(html)
    assert "y.retain_grad()" in html and "line 3" in html
    assert "<code" in html  # backticked source shows as code


def test_error_explanation_in_html(shell):
    t = traced(shell, "x = torch.ones(3, requires_grad=True)\ny = x * 2\ny.backward()")
    html = explanations_html(t)
    well_formed(html)
    assert "grad can be implicitly created only for scalar outputs" in html


def test_user_text_is_escaped(shell):
    body = 'x = torch.ones(2, requires_grad=True)\n(x * len("<script>alert(1)</script>")).sum().backward()'
    t = traced(shell, body, flags="--quiet --check")
    for html in (stepper_html(t), explanations_html(t), gradcheck_html(t)):
        well_formed(html)
        assert "<script" not in html
    assert "&lt;script&gt;" in stepper_html(t) and "&lt;script&gt;" in explanations_html(t)


def test_gradcheck_html_verdicts():
    from autograd_magic.data.trace import Trace

    t = Trace()
    assert gradcheck_html(t) == ""  # not run
    t.gradcheck = []
    assert "no leaf" in gradcheck_html(t)
    t.gradcheck = [
        LeafCheck(0, "x", 1e-9, 1e-10, 3, True, samples=[(0, 1.0, 1.0)]),
        LeafCheck(1, "<w>", 21.0, 0.77, 3, False, note="differs <b>", samples=[(0, 2.0, 3.0)]),
        LeafCheck(2, "b", note="computed `before` this cell"),
    ]
    html = gradcheck_html(t)
    well_formed(html)
    assert "✓ agrees" in html and "✗ differs" in html and "not checked" in html
    assert "&lt;w&gt;" in html and "differs &lt;b&gt;" in html and "<b>" not in html
    assert "2.10e+01" in html and "[0] 2 vs 3" in html


def test_teach_sections_fit_the_snapshot(shell):
    from autograd_magic.render.html import render_html
    from autograd_magic.render.teach_html import teach_sections

    t = traced(shell, SEED_001, flags="--quiet --check")
    secs = teach_sections(t)
    assert len(secs) == 3
    page = render_html(t, sections=secs)
    well_formed(page, sheet=True)
    assert "backward, step by step" in page and "gradient check" in page and "✓ agrees" in page
    t.gradcheck = None
    assert len(teach_sections(t)) == 2
