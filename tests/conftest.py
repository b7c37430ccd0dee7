"""Shared fixtures: one IPython shell with the extension loaded, the seed notebooks."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT.parent / "shared" / "seeds" / "cells.py"


def _load_seeds():
    if not SEEDS.exists():
        return None
    spec = importlib.util.spec_from_file_location("seed_cells", SEEDS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def seeds():
    mod = _load_seeds()
    if mod is None:
        pytest.skip(f"seed notebooks not found at {SEEDS}")
    return mod


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
