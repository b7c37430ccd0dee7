"""The widget in real JupyterLab 4 and Notebook 7, driven in Chromium.

A notebook of seed cells under `%%autograd` is opened, run with Run All, and
the view is used as a student would: read the gradients, switch no_grad on and
off, detach `y`, select a row, click a graph node. Reference numbers come from
plain PyTorch. A missing chromium fails the test (see `make browser-deps`).
"""

from __future__ import annotations

import re

import pytest
import torch

from browser_util import SCREENSHOTS, TIMEOUT, jupyter_server, numbers, run_all, wait_kernel_ready, write_notebook

pytestmark = pytest.mark.browser


CELLS = [
    "%load_ext autograd_magic\nimport torch",
    "x = torch.tensor(2.0, requires_grad=True)",
    "%%autograd\ny = 2*x**4 + x**3 + 3*x**2 + 5*x + 1\ny.backward()\nprint(x.grad)",
    "x = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)",
    "%%autograd\ny = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()\nprint(x.grad)",
    "%%autograd\nlin = torch.nn.Linear(3, 2)\nh = lin(torch.ones(1, 3)).sum()",
    # last, because it raises (Run All stops there): hostile text must show as text, never run
    "%%autograd\nw = torch.ones(2, requires_grad=True) * len('" + "<img src=x onerror=\"window.__pwned=1\">" + "')\n"
    "raise ValueError('<img src=x onerror=\"window.__pwned=2\">')",
]
HOSTILE = '<img src=x onerror="window.__pwned=2">'


def _plain_grads() -> tuple[list[float], list[float]]:
    """The reference: the same cells in plain PyTorch."""
    x = torch.tensor(2.0, requires_grad=True)
    y = 2 * x**4 + x**3 + 3 * x**2 + 5 * x + 1
    y.backward()
    poly = x.grad.flatten().tolist()
    x = torch.tensor([[1.0, 2, 3], [3, 2, 1]], requires_grad=True)
    y = 3 * x + 2
    z = 2 * y**2
    z.mean().backward()
    return poly, x.grad.flatten().tolist()


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    for kind in ("lab", "notebook"):
        write_notebook(root / f"seed_{kind}.ipynb", CELLS)
    with jupyter_server(root, tmp_path_factory.mktemp("jupyter_state")) as server:
        yield server


def _row(view, label_pattern: str):
    return view.locator("tr.agm-row").filter(has=view.page.locator(".agm-c-label .agm-v", has_text=re.compile(label_pattern)))


def _grad_text(view, label_pattern: str) -> str:
    return _row(view, label_pattern).first.locator(".agm-c-grad .agm-v").inner_text()


@pytest.mark.parametrize("kind", ["lab", "notebook"])
def test_seed_views(jupyter, browser, kind):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    poly_grad, grid_grad = _plain_grads()
    page = browser.new_page()
    try:
        page.goto(jupyter.page_url(kind, f"seed_{kind}.ipynb"))
        wait_kernel_ready(page)
        run_all(page)
        views = page.locator(".jp-OutputArea-output .agm-root")
        views.nth(3).locator(".agm-error").wait_for(timeout=TIMEOUT)
        poly, grid, module, hostile = (views.nth(i) for i in range(4))

        # the seeds' gradients, as plain PyTorch computes them
        assert numbers(_grad_text(poly, r"^x$")) == pytest.approx(poly_grad)
        assert numbers(_grad_text(grid, r"^x$")) == pytest.approx(grid_grad)
        grid.scroll_into_view_if_needed()
        grid.screenshot(path=str(SCREENSHOTS / f"{kind}_seed_2x3.png"))

        _check_hostile_text(page, hostile)
        _check_folded_internals(module)
        _check_stepper(grid)
        _check_no_grad(grid, grid_grad, kind)
        _check_detach(grid, grid_grad, kind)
        _check_selection(grid, kind)
    finally:
        page.close()


def _check_hostile_text(page, hostile) -> None:
    assert HOSTILE in hostile.locator(".agm-error").inner_text()
    # the name column shows the name; the line header (and the name's tooltip) the source, as text
    assert any("<img src=x" in text for text in hostile.locator(".agm-line code").all_inner_texts())
    assert any("<img src=x" in (el.get_attribute("title") or "") for el in hostile.locator("td.agm-c-label").all())
    assert hostile.locator("img").count() == 0
    assert page.evaluate("() => window.__pwned === undefined")


def _check_folded_internals(module) -> None:
    """Ops inside Linear.forward are folded under their call line until unfolded."""
    assert module.locator("tr.agm-row.agm-internal").count() == 0
    module.locator("button.agm-fold-btn", has_text="Linear.forward").click()
    module.locator("tr.agm-row.agm-internal").first.wait_for(timeout=TIMEOUT)


def _check_stepper(grid) -> None:
    """Walking the backward pass highlights each node's tensors in the table and the graph."""
    out_id = _row(grid, r"^out$").get_attribute("data-id")
    grid.locator("button.agm-next").click()
    grid.locator(f"tr.agm-row.agm-step[data-id='{out_id}']").wait_for(timeout=TIMEOUT)
    assert grid.locator(f".agm-graph g.agm-gnode.agm-step[data-id='{out_id}']").count() == 1
    assert "MeanBackward0" in grid.locator(".agm-step-text").inner_text()
    grid.locator("button.agm-prev").click()
    grid.locator("tr.agm-row.agm-step").first.wait_for(state="detached", timeout=TIMEOUT)


def _check_no_grad(grid, grid_grad, kind) -> None:
    grid.locator("input.agm-allcols").check()  # requires_grad is one of the columns shown on demand
    grid.locator(".agm-c-requires-grad").first.wait_for(timeout=TIMEOUT)
    grid.locator("input.agm-nograd").check()
    grid.locator(".agm-variant").wait_for(timeout=TIMEOUT)
    y_rg = _row(grid, r"^y$").locator(".agm-c-requires-grad .agm-v")
    y_rg.filter(has_text="False").wait_for(timeout=TIMEOUT)
    error = grid.locator(".agm-error")
    assert "does not require grad" in error.inner_text()
    grid.screenshot(path=str(SCREENSHOTS / f"{kind}_no_grad.png"))

    grid.locator("input.agm-nograd").uncheck()
    grid.locator(".agm-variant").wait_for(state="detached", timeout=TIMEOUT)
    assert y_rg.inner_text() == "True"
    assert numbers(_grad_text(grid, r"^x$")) == pytest.approx(grid_grad)
    grid.locator("input.agm-allcols").uncheck()
    assert grid.locator(".agm-c-requires-grad").count() == 0


def _check_detach(grid, grid_grad, kind) -> None:
    _row(grid, r"^y$").locator("input.agm-detach").check()
    grid.locator(".agm-variant").wait_for(timeout=TIMEOUT)
    x_grad = _row(grid, r"^x$").first.locator(".agm-c-grad .agm-v")
    x_grad.filter(has_text=re.compile(r"^None$")).wait_for(timeout=TIMEOUT)
    grid.screenshot(path=str(SCREENSHOTS / f"{kind}_detach_y.png"))
    grid.locator("button.agm-reset").click()
    grid.locator(".agm-variant").wait_for(state="detached", timeout=TIMEOUT)
    assert numbers(x_grad.inner_text()) == pytest.approx(grid_grad)


def _check_selection(grid, kind) -> None:
    # a row -> the detail panel
    _row(grid, r"^z$").locator(".agm-c-label").click()
    grid.locator(".agm-detail h4", has_text=re.compile(r"^z$")).wait_for(timeout=TIMEOUT)
    assert "2*y**2" in grid.locator(".agm-detail").inner_text()
    # a graph node -> the same record's row
    out_id = _row(grid, r"^out$").get_attribute("data-id")
    node = grid.locator(f".agm-graph g.agm-gnode[data-id='{out_id}']")
    node.click()
    grid.locator(f"tr.agm-row.agm-selected[data-id='{out_id}']").wait_for(timeout=TIMEOUT)
    grid.locator(".agm-detail h4", has_text=re.compile(r"^out$")).wait_for(timeout=TIMEOUT)
    grid.screenshot(path=str(SCREENSHOTS / f"{kind}_selected.png"))
    # the gradient check re-runs the cell in float64 and gives its verdict per leaf
    grid.locator("button.agm-check").click()
    grid.locator(".agm-gradcheck pre", has_text="x: agrees").wait_for(timeout=TIMEOUT)
