"""Seed 000 run cell by cell in real JupyterLab and Notebook 7: the backward cell shows the chain rule.

`x = ...`, `y = ...` and `y.backward()` are separate `%%autograd` cells, as the
seed notebook has them. The `y.backward()` cell's view must list the
polynomial's intermediates with the gradient each received (plain PyTorch is
the reference) and say, with its controls disabled, why toggles are off.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from browser_util import SCREENSHOTS, TIMEOUT, jupyter_server, numbers, run_all, seed_cells, wait_kernel_ready, write_notebook

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent


def _seed_000_first_part() -> list[str]:
    cells = seed_cells("seed_000")
    end = next(i for i, c in enumerate(cells) if c.strip().endswith("y.backward()"))
    return cells[: end + 1]


def _plain() -> dict[str, float]:
    x = torch.tensor(2.0, requires_grad=True)
    parts = {"x**4": x**4, "x**2": x**2, "5*x": 5 * x}
    parts["2*x**4"] = 2 * parts["x**4"]
    for t in parts.values():
        t.retain_grad()
    y = parts["2*x**4"] + x**3 + 3 * parts["x**2"] + parts["5*x"] + 1
    y.backward()
    out = {k: float(t.grad) for k, t in parts.items()}
    out["x"] = float(x.grad)
    return out


# the classroom's update written as a rebinding, then the next step in its own cell
REBOUND = [
    "%load_ext autograd_magic\nimport torch\nw = torch.tensor([1.0, 2.0], requires_grad=True)",
    "%%autograd\nloss = (w * 3).sum()\nloss.backward()",
    "%%autograd\nw = w - 0.1 * w.grad",
    "%%autograd\nloss = (w * 3).sum()\nloss.backward()",
]


# the model's cell run again after the optimizer's, then the training loop
STALE_OPTIMIZER = [
    "%load_ext autograd_magic\nimport torch\nmodel = torch.nn.Linear(3, 1)\nx = torch.randn(4, 3)",
    "opt = torch.optim.SGD(model.parameters(), lr=0.1)",
    "model = torch.nn.Linear(3, 1)",
    "%%autograd\nfor i in range(5):\n    opt.zero_grad()\n    loss = model(x).pow(2).mean()\n    loss.backward()\n    opt.step()",
]


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    for kind in ("lab", "notebook"):
        write_notebook(root / f"cells_{kind}.ipynb", _seed_000_first_part())
    write_notebook(root / "rebound.ipynb", REBOUND)
    write_notebook(root / "stale_optimizer.ipynb", STALE_OPTIMIZER)
    with jupyter_server(root, tmp_path_factory.mktemp("jupyter_state")) as server:
        yield server


@pytest.mark.parametrize("kind", ["lab", "notebook"])
def test_the_backward_cell_shows_the_intermediates_of_earlier_cells(jupyter, browser, kind):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    expected = _plain()
    page = browser.new_page()
    try:
        page.goto(jupyter.page_url(kind, f"cells_{kind}.ipynb"))
        wait_kernel_ready(page)
        run_all(page)
        views = page.locator(".jp-OutputArea-output .agm-root")
        views.nth(2).wait_for(timeout=TIMEOUT)  # x, y, y.backward()
        view = views.nth(2)
        view.locator("tr.agm-row").first.wait_for(timeout=TIMEOUT)
        for label, grad in expected.items():
            row = view.locator("tr.agm-row").filter(
                has=page.locator(".agm-c-label .agm-v", has_text=re.compile(rf"^{re.escape(label)}$"))
            )
            assert row.count() >= 1, label
            assert numbers(row.first.locator(".agm-c-grad .agm-v").inner_text()) == pytest.approx([grad]), label
        assert "earlier cells" in view.inner_text()  # the reason toggles are off, in one line
        for control in ("input.agm-nograd", "button.agm-check"):  # off, not clickable-and-failing
            assert view.locator(control).is_disabled(), control
        view.scroll_into_view_if_needed()
        view.screenshot(path=str(SCREENSHOTS / f"{kind}_cell_by_cell_backward.png"))
    finally:
        page.close()


def test_the_leaf_a_rebinding_left_behind_is_the_earlier_w_in_the_next_cell(jupyter, browser):
    """In Notebook 7 (one notebook per page: Lab would reopen the earlier tests' tabs and kernels),
    cell by cell: the last cell's view calls the first `w` "earlier w", with the .grad plain torch
    gives it after both backward calls."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    first = torch.tensor([1.0, 2.0], requires_grad=True)
    (first * 3).sum().backward()
    ((first - 0.1 * first.grad) * 3).sum().backward()
    page = browser.new_page()
    try:
        page.goto(jupyter.page_url("notebook", "rebound.ipynb"))
        wait_kernel_ready(page)
        run_all(page)
        views = page.locator(".jp-OutputArea-output .agm-root")
        views.nth(2).wait_for(timeout=TIMEOUT)
        view = views.nth(2)
        view.locator("tr.agm-row").first.wait_for(timeout=TIMEOUT)
        row = view.locator("tr.agm-row").filter(has=page.locator(".agm-c-label .agm-v", has_text=re.compile(r"^earlier w$")))
        assert row.count() == 1, view.inner_text()
        assert numbers(row.first.locator(".agm-c-grad .agm-v").inner_text()) == pytest.approx(first.grad.tolist())
        assert "unnamed tensor" not in view.inner_text()
        view.scroll_into_view_if_needed()
        view.screenshot(path=str(SCREENSHOTS / "notebook_rebound_earlier_w.png"))
    finally:
        page.close()


def test_a_loop_whose_optimizer_holds_an_earlier_model_says_its_step_changed_nothing(jupyter, browser):
    """Notebook 7: the loop's view says above its table, in one line, that `opt.step()` changed nothing and why."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    try:
        page.goto(jupyter.page_url("notebook", "stale_optimizer.ipynb"))
        wait_kernel_ready(page)
        run_all(page)
        view = page.locator(".jp-OutputArea-output .agm-root").first
        view.locator("tr.agm-row").first.wait_for(timeout=TIMEOUT)
        text = view.inner_text()
        assert "opt.step() on line 6 changed nothing" in text and "built again after the optimizer was made" in text, text
        banner = view.locator(".agm-banner")
        assert "changed nothing" in banner.inner_text()  # the view's line of notes, above the table
        banner.scroll_into_view_if_needed()
        banner.screenshot(path=str(SCREENSHOTS / "notebook_stale_optimizer.png"))
    finally:
        page.close()
