"""Shared fixtures: one IPython shell with the extension loaded, the seed notebooks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEED_IDS = ("000", "001", "002", "003", "004")
SEED_NOTEBOOKS = {nb: ROOT / "notebooks" / f"seed_{nb}.ipynb" for nb in SEED_IDS}

# What the notebooks themselves raise, by (notebook, index into its cells below). The cells
# that raise are tagged `raises-exception` in the .ipynb; the test data adds the message.
RAISES = {("003", 9): "element 0 of tensors does not require grad and does not have a grad_fn"}

# Figures the notebooks print, as (notebook, cell index, expression, value): after running
# cells 0..index, `expression` evaluates to `value`. Seed 003 draws random numbers, so only
# its shapes and errors are fixed.
EXPECTED = [
    ("000", 2, "y", 63.0),
    ("000", 4, "x.grad", 93.0),
    ("000", 9, "x.grad", [[10.0, 16.0, 22.0], [22.0, 16.0, 10.0]]),
    ("001", 4, "x.grad", 93.0),
    ("001", 5, "x.grad", [[10.0, 16.0, 22.0], [22.0, 16.0, 10.0]]),
    ("001", 5, "y.grad", [[10 / 3, 16 / 3, 22 / 3], [22 / 3, 16 / 3, 10 / 3]]),
    ("002", 6, "x.grad", [[4.5, 4.5], [4.5, 4.5]]),
    ("002", 8, "a.grad", [8.0, 8.0]),
    ("002", 8, "b.grad", None),
    ("002", 11, "x.grad", [[30.0, 30.0], [30.0, 30.0]]),
    ("004", 1, "x.grad", [1.0, 1.0, 1.0]),
    ("004", 3, "x.grad", [[4.5, 4.5], [4.5, 4.5]]),
]

LOAD_EXT = "%load_ext autograd_magic"
MAGIC = "%%autograd\n"


def load_seeds():
    """The seed notebooks' code cells as our users run them, read from the repository's own
    notebooks/seed_*.ipynb: the `%load_ext` cell dropped, each cell's `%%autograd` line
    stripped (the tests run a cell either plainly or under the magic themselves).

    A missing or unreadable notebook raises: the tests that use the seeds fail, never skip.
    """
    notebooks, tagged = {}, set()
    for nb, path in SEED_NOTEBOOKS.items():
        if not path.is_file():
            raise FileNotFoundError(f"seed notebook missing from the repository: {path}")
        doc = json.loads(path.read_text(encoding="utf-8"))
        cells = []
        for cell in doc["cells"]:
            if cell["cell_type"] != "code":
                continue
            src = cell["source"]
            src = "".join(src) if isinstance(src, list) else src
            if src.strip() == LOAD_EXT:
                continue
            if src.startswith(MAGIC):
                src = src[len(MAGIC) :]
            if "raises-exception" in cell.get("metadata", {}).get("tags", []):
                tagged.add((nb, len(cells)))
            cells.append(src)
        if not cells:
            raise ValueError(f"seed notebook has no code cells: {path}")
        notebooks[nb] = cells
    if tagged != set(RAISES):
        raise ValueError(f"cells tagged raises-exception {sorted(tagged)} != RAISES {sorted(RAISES)}")
    for nb, i, _expr, _value in EXPECTED:
        if i >= len(notebooks[nb]):
            raise ValueError(f"EXPECTED names cell {i} of seed {nb}, which has {len(notebooks[nb])}")
    return SimpleNamespace(NOTEBOOKS=notebooks, RAISES=RAISES, EXPECTED=EXPECTED)


@pytest.fixture(params=["fused", "numpy"])
def stats_path(request, monkeypatch):
    """The test on both paths of exact statistics: the compiled one-pass kernel (and the compiled
    whole preview of a dense CPU float tensor), and numpy's (what runs where it is not built).
    Previews and gradient norms both read this switch."""
    from autograd_magic.capture import preview as preview_mod

    if request.param == "numpy":
        monkeypatch.setattr(preview_mod, "_fused_stats", None)
        monkeypatch.setattr(preview_mod, "_fused_preview", None)
    elif preview_mod._fused_stats is None:
        pytest.skip("the compiled statistics are not built")
    return request.param


@pytest.fixture(scope="session")
def seeds():
    return load_seeds()


@pytest.fixture(scope="session")
def _ipython():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext autograd_magic", store_history=False)
    return shell


@pytest.fixture
def shell(_ipython):
    """The shell with a clean user namespace (the extension stays loaded)."""
    _ipython.reset(new_session=False)  # magics stay registered across resets
    yield _ipython
    _ipython.reset(new_session=False)


@pytest.fixture(autouse=True)
def _no_leaked_torch_modes():
    """A mode left on torch's stack fails the test that left it, not every test after it."""
    import torch

    from autograd_magic.capture.tracer import purge_stale_modes

    purge_stale_modes()
    depth = torch._C._len_torch_function_stack()
    grad_enabled = torch.is_grad_enabled()
    yield
    # A finished run's mode that torch pushed back when a generator left suspended
    # by a Ctrl-C (timer tests) was collected is inert; the extension purges it
    # before the next cell, as here. Any other mode left on the stack is a leak.
    purge_stale_modes()
    leaked = torch._C._len_torch_function_stack() - depth
    while torch._C._len_torch_function_stack() > depth:
        torch._C._pop_torch_function_stack()
    grad_changed = torch.is_grad_enabled() != grad_enabled
    torch.set_grad_enabled(grad_enabled)
    assert leaked <= 0, f"{leaked} TorchFunctionMode(s) left on torch's stack"
    assert not grad_changed, "grad mode left changed"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One Chromium per browser test module (Playwright's sync API allows one at a time)."""
    from browser_util import browser_context

    with browser_context(tmp_path_factory.mktemp("chromium_profile")) as context:
        yield context
