"""A real Jupyter server and a real Chromium for the browser tests.

Follows shared/notes/browser-testing.md: Debian's chromium through Playwright's
persistent context, an isolated Jupyter state per run, a free port, settings
that keep pop-ups and virtual scrolling out of the way, and a kernel-readiness
observer (the toolbar says "idle" before the kernel session exists).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

#: where the browser tests leave their screenshots (look at them)
SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
TIMEOUT = 60_000  # ms, for anything that goes through the kernel

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# Records every state the toolbar's execution indicator shows; "idle" counts only after another state.
KERNEL_OBSERVER = """
(() => {
  window.__agmStates = [];
  const note = () => {
    const el = document.querySelector('.jp-Notebook-ExecutionIndicator');
    const s = el && el.getAttribute('data-status');
    if (s && window.__agmStates[window.__agmStates.length - 1] !== s) window.__agmStates.push(s);
  };
  const start = () => {
    new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-status']});
    note();
  };
  if (document.body) start(); else document.addEventListener('DOMContentLoaded', start);
})();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    token: str
    root: Path
    proc: subprocess.Popen

    def page_url(self, kind: str, notebook: str) -> str:
        path = "lab/tree" if kind == "lab" else "notebooks"
        return f"{self.url}/{path}/{notebook}?token={self.token}"


def _isolated_env(state: Path, settings: dict | None = None) -> dict[str, str]:
    """Jupyter's state in `state`; the rest of this process's environment (PYTHONPATH included,
    so the kernels import the package from the tree under test) passes through."""
    env = dict(os.environ)
    for var, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("IPYTHONDIR", "ipython"),
    ):
        (state / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(state / sub)
    for rel, content in (SETTINGS if settings is None else settings).items():
        path = state / "settings" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    env.pop("JUPYTER_TOKEN", None)
    return env


@contextlib.contextmanager
def jupyter_server(root: Path, state: Path, timeout: float = 60.0, settings: dict | None = None) -> Iterator[Server]:
    """`jupyter lab` on a free port, stopped by its PID (and waited for) on exit.

    `settings` replaces SETTINGS (relative settings path -> JSON content) when given.
    """
    port, token = free_port(), secrets.token_hex(16)
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root"]
    log = open(state / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=_isolated_env(state, settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", token, root, proc)
    try:
        _wait_for_status(server, proc, timeout)
        yield server
    finally:
        _stop(proc)
        log.close()


def _wait_for_status(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{server.url}/api/status?token={server.token}", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("jupyter lab did not answer /api/status")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def chromium_path() -> str:
    path = shutil.which("chromium")
    if not path:
        raise RuntimeError("chromium is not installed: run `make browser-deps` (apt-get install -y chromium)")
    return path


@contextlib.contextmanager
def browser_context(profile: Path) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=chromium_path(),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.add_init_script(KERNEL_OBSERVER)
        try:
            yield context
        finally:
            context.close()


def wait_kernel_ready(page, timeout: float = 60.0) -> None:
    """Idle after having been something else: the kernel session really exists."""
    page.wait_for_function(
        "() => { const s = window.__agmStates || []; return s.some(x => x !== 'idle') && s[s.length - 1] === 'idle'; }",
        timeout=timeout * 1000,
    )


def run_all(page) -> None:
    """Run > Run All Cells, by the menu labels a user clicks."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def seed_cells(name: str) -> list[str]:
    """The code cells of the repository's notebooks/<name>.ipynb (a seed), as they are written there."""
    path = Path(__file__).resolve().parent.parent / "notebooks" / f"{name}.ipynb"
    doc = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in doc["cells"] if c["cell_type"] == "code"]


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook of code cells with the python3 kernel, as a user would save it."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


def numbers(text: str) -> list[float]:
    """The numbers a view shows in a piece of text, in order."""
    import re

    return [float(m) for m in re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?", text)]


def saved_by(page, path: Path, save) -> None:
    """Call `save()` (a menu click, a key press) and wait until the page has written `path`."""
    before = path.stat().st_mtime_ns
    save()
    for _ in range(100):
        if path.stat().st_mtime_ns != before:
            break
        page.wait_for_timeout(100)
    page.wait_for_timeout(500)  # the write may still be under way when the time stamp changes


def save_by_menu(page, path: Path) -> None:
    """File > Save (Lab's "Save Notebook", Notebook 7's "Save"), as a user clicks it; returns once
    `path` is written."""
    import re

    def click():
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^File$")).first.click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Save( Notebook)?$")).first.click()

    saved_by(page, path, click)
