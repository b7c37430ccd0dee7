"""Debugging a training cell in real JupyterLab and Notebook 7: where the first NaN came from, and the loop's chart.

A 50-iteration logistic-regression loop with a learning rate that diverges: `torch.log(1 - p)`
turns -inf in an iteration past `--limit`. The view names that op at its top; its link selects
the tensor's row; the training-loop chart and the gradient-flow chart are drawn (through the
page's SVG sanitizer). Which iteration goes non-finite first comes from plain PyTorch.
"""

from __future__ import annotations

import re

import pytest
import torch

from autograd_magic.explain.debug import ordinal
from test_training_debug import DIVERGES, LOOP as TRAINING_LOOP, _plain_loop
from browser_util import SCREENSHOTS, TIMEOUT, jupyter_server, run_all, save_by_menu, wait_kernel_ready, write_notebook

pytestmark = pytest.mark.browser

LOOP = TRAINING_LOOP.format(lr=DIVERGES)  # the loop the engine's tests check against plain torch


def _first_nonfinite_iteration() -> int:
    ns: dict = {"torch": torch}
    code = LOOP.replace("    loss.backward()", "    if not torch.isfinite(loss): break\n    loss.backward()")
    exec(code, ns)
    return ns["i"]


def _banner(page, url: str):
    """Open the notebook at `url`, Run All, and wait for the traced cell's view and its NaN banner."""
    page.goto(url)
    wait_kernel_ready(page)
    run_all(page)
    view = page.locator(".jp-OutputArea-output .agm-root").first
    banner = view.locator(".agm-debug-nf").first
    banner.wait_for(timeout=TIMEOUT)
    return view, banner


@pytest.mark.parametrize("kind", ["lab", "notebook"])
def test_the_first_nan_of_a_diverging_loop_is_named_and_linked(browser, tmp_path_factory, kind):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("debug")
    write_notebook(root / "train.ipynb", ["%load_ext autograd_magic\nimport torch", "%%autograd\n" + LOOP])
    first = _first_nonfinite_iteration()
    assert first > 3  # past the default --limit: the op ran unrecorded then
    with jupyter_server(root, tmp_path_factory.mktemp("state")) as server:
        page = browser.new_page()
        try:
            view, banner = _banner(page, server.page_url(kind, "train.ipynb"))
            text = banner.inner_text()
            assert re.search(r"inf|NaN", text, re.I) and "log" in text, text
            # the iteration plain PyTorch finds first (i counts from 0; the view says "the 35th time it ran")
            assert f"the {ordinal(first + 1)} time it ran" in text, text
            link = banner.locator("button.agm-debug-link").first
            link.click()
            view.locator("tr.agm-row.agm-selected").first.wait_for(timeout=TIMEOUT)
            # the row is marked at once; its detail comes from the kernel
            view.locator(".agm-detail h4", has_text="log").wait_for(timeout=TIMEOUT)
            chart = view.locator("details.agm-training svg")
            chart.first.wait_for(timeout=TIMEOUT)
            assert view.locator("details.agm-flow svg").count() >= 1
            # three recorded passes: a button each, the last one drawn first; pass 1's chart shows
            # the total gradient norm plain torch's first backward call gives
            flow = view.locator("details.agm-flow:not(.agm-training)")
            passes = flow.locator("button.agm-flow-pass")
            assert passes.count() == 3 and passes.nth(2).get_attribute("aria-pressed") == "true"
            assert flow.locator(".agm-flow-summary").inner_text().startswith("pass 3:")
            passes.nth(0).click()
            assert passes.nth(0).get_attribute("aria-pressed") == "true"
            caption = flow.locator(".agm-flow-summary").inner_text()
            (_, norm), *_ = _plain_loop(LOOP)[0]
            assert caption.startswith("pass 1:") and f"total gradient norm {norm:.3g}" in caption, (caption, norm)
            assert flow.locator("svg").count() == 1
            assert view.locator("script").count() == 0
            view.scroll_into_view_if_needed()
            view.screenshot(path=str(SCREENSHOTS / f"{kind}_debug_training.png"))
            page.wait_for_timeout(500)
            save_by_menu(page, root / "train.ipynb")
        finally:
            page.close()
    # opened by a fresh server (no kernel ran it): the snapshot draws the last pass's gradient flow
    # and folds the passes before it, each with plain torch's total norm of that pass
    norms = [n for _, n in _plain_loop(LOOP)[0][:3]]
    with jupyter_server(root, tmp_path_factory.mktemp("reopened")) as server:
        page = browser.new_page()
        try:
            page.goto(server.page_url(kind, "train.ipynb"))
            snap = page.locator(".jp-OutputArea-output .agm-snapshot").first
            snap.wait_for(state="visible", timeout=TIMEOUT)
            assert f"the {ordinal(first + 1)} time it ran" in snap.inner_text()
            flow = snap.locator("details", has=page.locator("summary", has_text=re.compile("^gradient flow$"))).first
            assert f"total gradient norm {norms[2]:.3g}" in flow.locator(":scope > div > div").first.inner_text()
            folded = flow.locator("details")
            assert [folded.nth(i).locator("summary").inner_text() for i in range(folded.count())] == ["pass 2", "pass 1"]
            earliest = folded.nth(1)
            earliest.locator("summary").click()  # unfolds, as a reader clicks it
            image = earliest.locator("img[src^='data:image/svg+xml']")
            image.wait_for(state="visible", timeout=TIMEOUT)
            assert image.evaluate("i => i.complete && i.naturalWidth > 0")  # drawn
            assert f"total gradient norm {norms[0]:.3g}" in earliest.inner_text()
            flow.scroll_into_view_if_needed()
            flow.screenshot(path=str(SCREENSHOTS / f"{kind}_debug_saved_flow.png"))
        finally:
            page.close()


# an SGD loop whose learning rate turns NaN at i == 20: the step of that iteration, run with the
# tracer's mode lifted (capture/steps.py), is what first puts a NaN into a parameter
STEP_LOOP = """torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
X, Y = torch.randn(32, 6), torch.randn(32, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for i in range(30):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y)
    loss.backward()
    if i == 20:
        opt.param_groups[0]['lr'] = float('nan')
    opt.step()
"""


def test_a_nan_an_optimizer_step_makes_is_named_at_that_step(browser, tmp_path_factory):
    ns: dict = {"torch": torch}
    exec(STEP_LOOP.replace("    opt.step()\n", "    opt.step()\n    if not all(torch.isfinite(p).all() for p in model.parameters()):\n        break\n"), ns)
    first = ns["i"]  # plain torch: the iteration whose step first made a parameter non-finite
    root = tmp_path_factory.mktemp("step")
    write_notebook(root / "step.ipynb", ["%load_ext autograd_magic\nimport torch", "%%autograd\n" + STEP_LOOP])
    with jupyter_server(root, tmp_path_factory.mktemp("state")) as server:
        page = browser.new_page()
        try:
            view, banner = _banner(page, server.page_url("lab", "step.ipynb"))
            text = banner.inner_text()
            assert "First NaN in an optimizer step" in text and "model.0.weight = opt.step()" in text, text
            assert f"the {ordinal(first + 1)} time it ran" in text, text
            banner.locator("button.agm-debug-link").first.click()
            view.locator("tr.agm-row.agm-selected").first.wait_for(timeout=TIMEOUT)
            # the parameter's row, its detail from the kernel: the step made it, in place
            view.locator(".agm-detail h4", has_text="model.0.weight").wait_for(timeout=TIMEOUT)
            detail = view.locator(".agm-detail").first.inner_text()
            assert "opt.step()" in detail and "inside SGD.step" in detail and "nan" in detail, detail
            # made in the 21st iteration: the three recorded passes ran before it existed
            assert detail.count("ran before this tensor was made") == 3 and "did not reach this tensor" not in detail, detail
            view.scroll_into_view_if_needed()
            view.screenshot(path=str(SCREENSHOTS / "lab_debug_step_nan.png"))
        finally:
            page.close()
