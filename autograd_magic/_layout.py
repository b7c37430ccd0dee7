"""Graphviz layout out of process, with a hard time limit: the kernel never hangs.

Plain `dot` was seen running over 12 minutes on a 760-node unrolled LSTM
graph. So layout runs in a child process that reads DOT on stdin and writes
SVG on stdout, and is killed (its whole process group) when the time runs
out. The engine is the Graphviz that ships inside the `pygraphviz` wheel (no
system install needed), or `dot` on PATH. The child never imports torch;
one is started ahead of need (`_Spare`) so a small drawing costs the layout
itself, not a Python start.

When no engine runs or the time runs out, callers get `svg=None` and a
one-line hint, and `svg_or_fallback_html` shows the DOT text instead.
"""

from __future__ import annotations

import html
import atexit
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

DEFAULT_TIMEOUT = 5.0

# The child: pygraphviz lays out with the Graphviz library it bundles.
_WORKER = """\
import sys
import pygraphviz
dot = sys.stdin.buffer.read().decode("utf-8")
svg = pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot")
sys.stdout.buffer.write(svg)
"""

_CACHE: "OrderedDict[str, tuple[str, str]]" = OrderedDict()  # DOT -> (SVG, engine): redraws are free
_CACHE_SIZE = 32


class LayoutError(RuntimeError):
    """No SVG: the engine is missing, failed, or ran out of time. `hint` says which."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


@dataclass
class Layout:
    svg: Optional[str]  # inline-ready SVG (no XML prolog), or None
    engine: Optional[str]  # "pygraphviz" or "dot"; None when none could run
    seconds: float
    hint: Optional[str] = None  # one line for the user when svg is None


def engines() -> list[tuple[str, list[str]]]:
    """The layout commands available here, best first: (engine name, argv)."""
    found = []
    if importlib.util.find_spec("pygraphviz") is not None:
        found.append(("pygraphviz", [sys.executable, "-c", _WORKER]))
    dot = shutil.which("dot")
    if dot:
        found.append(("dot", [dot, "-Tsvg"]))
    return found


def layout(dot: str, timeout: Optional[float] = None) -> Layout:
    """Lay `dot` out as SVG in a child process killed after `timeout` seconds."""
    limit = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    start = time.perf_counter()
    if dot in _CACHE:
        _CACHE.move_to_end(dot)
        svg, engine = _CACHE[dot]
        return Layout(svg, engine, time.perf_counter() - start)
    available = engines()
    if not available:
        return Layout(None, None, 0.0, _NO_ENGINE)
    hint = None
    for name, argv in available:
        remaining = limit - (time.perf_counter() - start)
        if remaining <= 0:
            break
        status, text = _run(argv, dot, remaining)
        if status == "ok":
            svg = _inline(text)
            _remember(dot, svg, name)
            return Layout(svg, name, time.perf_counter() - start)
        if status == "timeout":
            return Layout(None, name, time.perf_counter() - start, _timeout_hint(limit))
        hint = f"Graphviz ({name}) could not lay out the graph: {text}; showing DOT text."
    return Layout(None, available[0][0], time.perf_counter() - start, hint or _timeout_hint(limit))


def render_svg(dot: str, timeout: Optional[float] = None) -> str:
    """The SVG of `dot`, or `LayoutError(hint)`."""
    result = layout(dot, timeout)
    if result.svg is None:
        raise LayoutError(result.hint or "Graph layout failed.")
    return result.svg


def svg_or_fallback_html(trace_or_dot: Union[str, "object"], timeout: Optional[float] = None, **options) -> str:
    """Inline SVG in a scrolling box, or the hint and the escaped DOT text. No scripts."""
    if isinstance(trace_or_dot, str):
        dot = trace_or_dot
    else:
        from ._dot import render_dot

        dot = render_dot(trace_or_dot, **options)
    result = layout(dot, timeout)
    if result.svg is not None:
        return f'<div class="am-graph" style="overflow:auto;max-width:100%">{result.svg}</div>'
    return (
        '<div class="am-graph am-graph-fallback">'
        f'<p style="margin:0 0 4px 0;color:#8a6d3b">{html.escape(result.hint or "")}</p>'
        '<pre style="max-height:24em;overflow:auto;font-size:11px;white-space:pre">'
        f"{html.escape(dot)}</pre></div>"
    )


# ---------------------------------------------------------------- internals

_NO_ENGINE = (
    "No Graphviz engine found (pip install pygraphviz, or install Graphviz's dot); showing DOT text."
)


def _timeout_hint(limit: float) -> str:
    return (
        f"Graph layout took over {limit:g} s and was stopped; showing DOT text. "
        "Fold more, or raise AutogradMagics.layout_timeout."
    )


def _run(argv: list[str], dot: str, timeout: float) -> tuple[str, str]:
    """("ok", svg) | ("timeout", "") | ("error", one line)."""
    try:
        proc = _SPARE.take(argv) or _start(argv)
    except OSError as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    try:
        out, err = proc.communicate(dot.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return "timeout", ""
    except BaseException:  # KeyboardInterrupt included: never leave the child running
        _kill(proc)
        raise
    finally:
        _SPARE.refill(argv)
    if proc.returncode == 0 and b"<svg" in out:
        return "ok", out.decode("utf-8", errors="replace")
    return "error", _last_line(err) or f"exit status {proc.returncode}"


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **_new_group(),
    )


class _Spare:
    """One worker started ahead of need, waiting on stdin with pygraphviz imported.

    Starting Python and importing pygraphviz is most of a small drawing's
    cost (~0.1 s of ~0.15 s); a worker started after each layout takes it
    off the next one. Each worker still lays out one graph and exits, so the
    time limit and the kill work exactly as for a fresh one. A spare whose
    kernel dies reads EOF and exits.
    """

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._pid = os.getpid()  # a forked child must not share its parent's spare
        self._lock = threading.Lock()
        atexit.register(self.close)

    def take(self, argv: list[str]) -> Optional[subprocess.Popen]:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None or self._pid != os.getpid():
            return None
        if proc.args != argv or proc.poll() is not None:
            _kill(proc)
            return None
        return proc

    def refill(self, argv: list[str]) -> None:
        if argv != [sys.executable, "-c", _WORKER]:
            return  # only the Python worker is slow to start
        with self._lock:
            if self._proc is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            try:
                self._proc = _start(argv)
            except OSError:
                self._proc = None

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and self._pid == os.getpid():
            _kill(proc)


_SPARE = _Spare()


def _new_group() -> dict:
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


def _kill(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.communicate(timeout=2)
    except Exception:
        pass


def _last_line(err: bytes) -> str:
    lines = [
        line.strip()
        for line in err.decode("utf-8", errors="replace").splitlines()
        if line.strip() and "Fontconfig" not in line
    ]
    return lines[-1][:200] if lines else ""


def _inline(svg: str) -> str:
    """Drop the XML prolog, DOCTYPE and generator comments so the SVG can sit inside HTML."""
    start = svg.find("<svg")
    return svg[start:].strip() if start >= 0 else svg


def _remember(dot: str, svg: str, engine: str) -> None:
    _CACHE[dot] = (svg, engine)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
