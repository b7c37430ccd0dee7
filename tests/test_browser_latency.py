"""The Transformer cell in real JupyterLab: the first screen draws, the rest comes when asked.

A 6-layer TransformerEncoder forward+backward under `%%autograd` (over 300 backward
steps): the table shows with the first steps; the stepper walks past them (the page asks
Python for more), a row opens the detail panel with its why-explanations, and the graph is
laid out after the cell returned and drawn when it arrives. The time from Run to a drawn
widget is printed next to the plain cell's (not asserted: machines are noisy).
Reference numbers come from the same model in plain PyTorch.
"""

from __future__ import annotations

import json
import re

import nbformat

import pytest
import torch

from browser_util import SCREENSHOTS, TIMEOUT, jupyter_server, numbers, run_all, saved_by, wait_kernel_ready, write_notebook

pytestmark = pytest.mark.browser


SETUP = (
    "%load_ext autograd_magic\nimport torch, warnings\nwarnings.filterwarnings('ignore')\ntorch.manual_seed(0)\n"
    "m = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 4, 512, batch_first=True), 6)\n"
    "m.eval()  # no dropout: the same numbers in plain PyTorch\n"
    "inp = torch.randn(8, 32, 256)"
)
CELL = "loss = m(inp).pow(2).mean()\nloss.backward()"
CELLS = [SETUP, CELL, "m.zero_grad()", "%%autograd\n" + CELL]


def _plain_loss() -> float:
    torch.manual_seed(0)
    m = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(256, 4, 512, batch_first=True), 6)
    m.eval()
    inp = torch.randn(8, 32, 256)
    return m(inp).pow(2).mean().item()


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    write_notebook(root / "transformer.ipynb", CELLS)
    with jupyter_server(root, tmp_path_factory.mktemp("jupyter_state")) as server:
        yield server


# Run All queues every cell at once; the kernel runs them one after another. So a cell's time
# is from the previous cell's prompt getting its number to this cell's prompt getting one
# (the plain cell), or to the widget's first row drawn (the traced cell).
TIMING = """
() => {
  window.__agmDone = {};
  window.__agmTimes = {};
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
  new MutationObserver(() => {
    const now = performance.now();
    cells.forEach((c, i) => {
      const prompt = c.querySelector('.jp-InputPrompt');
      if (window.__agmDone[i] === undefined && prompt && /\\[\\d+\\]/.test(prompt.textContent)) window.__agmDone[i] = now;
    });
    const d = window.__agmDone;
    if (d[1] !== undefined && d[0] !== undefined && window.__agmTimes[1] === undefined) window.__agmTimes[1] = d[1] - d[0];
    if (d[2] !== undefined && window.__agmTimes[3] === undefined && cells[3].querySelector('.agm-root .agm-row')) window.__agmTimes[3] = now - d[2];
    if (d[2] !== undefined && d[3] !== undefined) window.__agmTimes.reply = d[3] - d[2];
    const snap = cells[3].querySelector('.agm-snapshot');
    if (d[2] !== undefined && snap && window.__agmTimes.snapshot === undefined) window.__agmTimes.snapshot = now - d[2];
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""


def test_transformer_cell_first_screen_then_on_demand(jupyter, browser):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    try:
        page.goto(jupyter.page_url("lab", "transformer.ipynb"))
        wait_kernel_ready(page)
        page.evaluate(TIMING)
        run_all(page)
        view = page.locator(".jp-OutputArea-output .agm-root").first
        view.locator("tr.agm-row").first.wait_for(timeout=TIMEOUT)
        page.wait_for_function("() => window.__agmTimes[3] !== undefined && window.__agmTimes[1] !== undefined && window.__agmTimes.reply !== undefined && window.__agmTimes.snapshot !== undefined", timeout=TIMEOUT)
        times = page.evaluate("() => window.__agmTimes")
        print(f"\ntransformer cell to a drawn widget {times['3'] / 1000:.2f} s, plain cell {times['1'] / 1000:.2f} s"
              f" (the traced cell's prompt numbered at {times.get('reply', 0) / 1000:.2f} s, its snapshot output in the page at {times.get('snapshot', 0) / 1000:.2f} s)")

        # the loss row: plain PyTorch's number
        loss_row = view.locator("tr.agm-row").filter(has=page.locator(".agm-c-label .agm-v", has_text=re.compile(r"^loss$"))).first
        assert numbers(loss_row.locator(".agm-c-value .agm-v").inner_text()) == pytest.approx([_plain_loss()], rel=1e-4)

        # the graph: asked for once the view was drawn, laid out after the cell returned
        view.locator(".agm-graph g.agm-gnode").first.wait_for(timeout=TIMEOUT)
        assert view.locator(".agm-graph-wait").count() == 0

        # the stepper: the first steps came with the table, the rest are asked for as it walks
        total = int(re.search(r"(\d+) steps", view.locator(".agm-step-text").inner_text()).group(1))
        assert total > 300  # limits.WIDGET_FIRST_STEPS came first
        slider = view.locator("input.agm-slider")
        slider.evaluate("(el, v) => { el.value = String(v); el.dispatchEvent(new Event('input', {bubbles: true})); }", 250)
        text = view.locator(".agm-step-text")
        text.filter(has_text=re.compile(r"^step 251/\d+ — (?!loading)")).wait_for(timeout=TIMEOUT)
        view.locator("button.agm-next").click()
        text.filter(has_text=re.compile(r"^step 252/\d+ — (?!loading)")).wait_for(timeout=TIMEOUT)
        assert "Backward" in text.inner_text() or "AccumulateGrad" in text.inner_text()

        # the detail panel, with its why-explanations, for the row clicked
        loss_row.locator(".agm-c-label").click()
        view.locator(".agm-detail h4", has_text=re.compile(r"^loss$")).wait_for(timeout=TIMEOUT)
        view.locator(".agm-detail .agm-why li").first.wait_for(timeout=TIMEOUT)
        view.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        view.screenshot(path=str(SCREENSHOTS / "lab_transformer_on_demand.png"))

        # saved: the traced cell's outputs (the widget's and its snapshot) stay small in the file
        path = jupyter.root / "transformer.ipynb"
        page.locator(".jp-Notebook").first.click()
        saved_by(page, path, lambda: page.keyboard.press("Control+s"))
        saved = nbformat.read(str(path), as_version=4)
        outputs = saved.cells[3].outputs
        assert any("text/html" in o.get("data", {}) for o in outputs)
        size = len(json.dumps(outputs).encode())
        print(f"the traced cell's outputs in the saved file: {size / 1000:.0f} KB")
        assert size <= 150_000
    finally:
        page.close()
