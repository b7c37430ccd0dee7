"""Graphviz layout out of process, with a hard time limit: the kernel never hangs.

Plain `dot` was seen running over 12 minutes on a 760-node unrolled LSTM
graph. So layout runs in a child process that reads DOT on stdin and writes
SVG on stdout, and is killed (its whole process group) when the time runs
out. The engine is the Graphviz that ships inside the `pygraphviz` wheel (no
system install needed), or `dot` on PATH. The child never imports torch.
On POSIX one worker stays up and serves graph after graph (`_Server`), so a
small drawing costs the layout itself, not a Python start; a worker that
overruns is killed like any other.

When no engine runs or the time runs out, callers get `svg=None` and a
one-line hint, and `svg_or_fallback_html` shows the DOT text instead.
"""

from __future__ import annotations

import atexit
import html
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

from .. import limits
from .dot import render_dot

DEFAULT_TIMEOUT = limits.LAYOUT_SECONDS

# The child: pygraphviz lays out with the Graphviz library it bundles. One
# graph per process (Windows, and the engine's identity in `engines()`).
_WORKER = """\
import sys
import pygraphviz
dot = sys.stdin.buffer.read().decode("utf-8")
svg = pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot")
sys.stdout.buffer.write(svg)
"""

# The long-lived child (POSIX): length-prefixed DOT in; status (K ok / E error),
# length and SVG or the error's last line out. Graphviz's own messages go to a
# temporary file, so an unread stderr pipe can never fill up and block it.
_SERVER = """\
import os, sys, tempfile
import pygraphviz
err = tempfile.TemporaryFile()
os.dup2(err.fileno(), 2)
# the first layout loads Graphviz's plugins and fonts (~40 ms): paid here, while the kernel goes on
pygraphviz.AGraph(string='digraph { node [shape=box fontname="Helvetica,sans-Serif"]; a -> b [label="x"] }').draw(format="svg", prog="dot")
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    dot = inp.read(int.from_bytes(head, "big")).decode("utf-8")
    err.seek(0)
    err.truncate()
    try:
        body, status = pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot"), b"K"
    except Exception as exc:
        err.seek(0)
        said = [x for x in err.read().decode("utf-8", "replace").splitlines() if x.strip() and "Fontconfig" not in x]
        body, status = (said[-1] if said else type(exc).__name__ + ": " + str(exc)).encode(), b"E"
    out.write(status + len(body).to_bytes(8, "big") + body)
    out.flush()
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


def prefetch(dot: str, timeout: Optional[float] = None) -> bool:
    """Start laying `dot` out now and return at once (POSIX, the pygraphviz worker); a later
    `layout(dot)` reads the answer. The time limit runs from now. False when nothing was
    started (no worker here, already drawn, or two graphs already wait)."""
    if dot in _CACHE or os.name != "posix":
        return False
    limit = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if not any(name == "pygraphviz" for name, _ in engines()):
        return False
    return _SERVER_PROCESS.send_ahead(dot, limit)


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
    if argv == [sys.executable, "-c", _WORKER] and os.name == "posix":
        answer = _SERVER_PROCESS.run(dot, timeout)
        if answer is not None:
            return answer
    return _run_once(argv, dot, timeout)


def _run_once(argv: list[str], dot: str, timeout: float) -> tuple[str, str]:
    """One process per graph: start, feed, wait at most `timeout`, kill its group."""
    try:
        proc = _start(argv)
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
    if proc.returncode == 0 and b"<svg" in out:
        return "ok", out.decode("utf-8", errors="replace")
    return "error", _last_line(err) or f"exit status {proc.returncode}"


def _start(argv: list[str], stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, **_new_group())


class _Server:
    """One long-lived pygraphviz worker serving graph after graph (POSIX).

    Starting Python and importing pygraphviz is most of a small drawing's
    cost (~0.1 s of ~0.15 s, more on a busy machine); a worker that stays
    up pays it once per session. The time limit is kept the same way: the
    answer is awaited with `select` up to the deadline, and a worker that
    overruns is killed with its process group and replaced on the next call.
    It exits by itself when the kernel goes (EOF on its stdin).
    """

    RECYCLE = 200  # graphs per worker, so a leak in Graphviz cannot grow forever

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._pid = os.getpid()  # a forked child must not talk to its parent's worker
        self._served = 0
        self._lock = threading.Lock()
        self._ahead: list[tuple[str, float]] = []  # (DOT, deadline) sent ahead, answers not read yet
        atexit.register(self.close)

    def warm(self) -> None:
        """Start the worker now (it imports pygraphviz while the caller goes on)."""
        with self._lock:
            self._ensure()

    def send_ahead(self, dot: str, timeout: float) -> bool:
        """Hand `dot` to the worker and return at once; `run(dot)` reads its answer later.

        The worker lays it out while the kernel builds the rest of the view. Its time limit
        runs from now. At most two graphs wait; the second only when small, so that writing
        it can never block on a worker that is itself blocked writing the first answer."""
        payload = dot.encode("utf-8")
        if not self._lock.acquire(timeout=0.05):
            return False
        try:
            if len(self._ahead) >= 2 or (self._ahead and len(payload) > _AHEAD_SMALL):
                return False
            if any(d == dot for d, _ in self._ahead):
                return True
            try:
                proc = self._ensure()
                proc.stdin.write(len(payload).to_bytes(8, "big") + payload)
                proc.stdin.flush()
            except OSError:
                self._discard()
                return False
            self._ahead.append((dot, time.monotonic() + timeout))
            return True
        finally:
            self._lock.release()

    def run(self, dot: str, timeout: float) -> Optional[tuple[str, str]]:
        """Like `_run`; None when another thread holds the worker (the caller starts its own)."""
        deadline = time.monotonic() + timeout
        payload = dot.encode("utf-8")
        if not self._lock.acquire(timeout=min(timeout, 0.05)):
            return None
        try:
            answer = self._read_ahead(dot)
            if answer is not None:
                return answer
            for attempt in range(2):  # a worker found dead while idle is replaced once
                try:
                    proc = self._ensure()
                    proc.stdin.write(len(payload).to_bytes(8, "big") + payload)
                    proc.stdin.flush()
                    answer = self._answer(proc, deadline)
                except TimeoutError:
                    self._discard()
                    return "timeout", ""
                except (OSError, EOFError) as exc:
                    self._discard()
                    if attempt or time.monotonic() >= deadline:
                        return "error", f"the layout worker stopped ({type(exc).__name__})"
                    continue
                except BaseException:  # KeyboardInterrupt: never leave a worker mid-layout
                    self._discard()
                    raise
                self._served += 1
                if self._served >= self.RECYCLE:
                    self._discard()
                return answer
            return "error", "the layout worker stopped"
        finally:
            self._lock.release()

    def _answer(self, proc: subprocess.Popen, deadline: float) -> tuple[str, str]:
        head = _read_exact(proc.stdout.fileno(), 9, deadline)
        body = _read_exact(proc.stdout.fileno(), int.from_bytes(head[1:], "big"), deadline)
        text = body.decode("utf-8", errors="replace")
        return ("ok", text) if head[:1] == b"K" and "<svg" in text else ("error", text[:200])

    def _read_ahead(self, wanted: str) -> Optional[tuple[str, str]]:
        """Read the answers to graphs sent ahead, in order, up to `wanted` (all when it is not
        among them): `wanted`'s is returned, another's SVG goes into the cache. None when
        `wanted` was not sent ahead or its answer was lost. Caller holds the lock."""
        found = None
        if self._proc is None or self._pid != os.getpid():  # a forked child: the parent's worker
            self._ahead.clear()
        if all(d != wanted for d, _ in self._ahead):
            wanted = None
        while self._ahead:
            dot, deadline = self._ahead.pop(0)
            try:
                answer: Optional[tuple[str, str]] = self._answer(self._proc, deadline)
            except TimeoutError:
                answer = ("timeout", "")
                self._discard()  # the graphs behind it go with the worker
            except (OSError, EOFError):
                answer = None  # the worker stopped: `run` lays the wanted one out again
                self._discard()
            except BaseException:
                self._discard()
                raise
            else:
                self._served += 1
            if dot == wanted:
                found = answer
                break
            if answer is not None and answer[0] == "ok":
                _remember(dot, _inline(answer[1]), "pygraphviz")
        if not self._ahead and self._served >= self.RECYCLE:
            self._discard()
        return found

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _ensure(self) -> subprocess.Popen:
        if self._pid != os.getpid():
            self._proc, self._pid = None, os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            self._discard()
            self._proc = _start([sys.executable, "-c", _SERVER], stderr=subprocess.DEVNULL)
            self._served = 0
        return self._proc

    def _discard(self) -> None:
        self._ahead.clear()  # their answers go with the worker
        proc, self._proc = self._proc, None
        if proc is not None and self._pid == os.getpid():
            _kill(proc)


_AHEAD_SMALL = 16_000  # bytes of DOT a second graph sent ahead may have (well under a pipe's buffer)


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    chunks, got = [], 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


_SERVER_PROCESS = _Server()


def warm() -> None:
    """Start the layout worker ahead of the first drawing (e.g. when the extension loads)."""
    if os.name == "posix" and any(name == "pygraphviz" for name, _ in engines()):
        try:
            _SERVER_PROCESS.warm()
        except OSError:
            pass


def warm_in_notebook() -> None:
    """`warm()` when an IPython shell is running: called first thing as the package
    imports, so the worker (~0.1-0.2 s to start Python, load Graphviz and its fonts)
    is up by the time `%load_ext` returns (~0.4 s of imports) rather than making
    the first traced cell wait for it. A plain script starts no worker."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:
        return
    if shell is not None:
        warm()


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
