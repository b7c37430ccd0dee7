"""Layout out of process: SVG without a system Graphviz, and never a hung kernel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from autograd_magic.render import layout as _layout
from autograd_magic.render.layout import LayoutError, layout, render_svg, svg_or_fallback_html

SMALL = 'digraph g { r0 [label="x"]; op1 [label="MulBackward0"]; r0 -> op1 -> r1; }'


@pytest.fixture(autouse=True)
def _cold_cache():
    _layout._CACHE.clear()
    yield
    _layout._CACHE.clear()


def _big_dot(n: int = 3000) -> str:
    """A dense graph Graphviz needs far longer than 0.05 s for."""
    edges = "\n".join(f"n{i} -> n{(i * 7 + 3) % n}; n{i} -> n{(i * 13 + 5) % n};" for i in range(n))
    return "digraph big {\n" + edges + "\n}"


def test_svg_without_system_dot(monkeypatch):
    monkeypatch.setattr(_layout.shutil, "which", lambda name: None)  # as on a machine without Graphviz
    result = layout(SMALL)
    assert result.engine == "pygraphviz"
    assert result.hint is None
    svg = result.svg
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "<?xml" not in svg and "<!DOCTYPE" not in svg  # inline-ready
    for node in ("r0", "op1", "r1"):
        assert f"<title>{node}</title>" in svg
    assert render_svg(SMALL) == svg


def test_this_machine_has_no_system_dot():
    # The brief's premise: the wheel's Graphviz is all there is here. If a
    # system dot appears, the other tests still pass; this one says so.
    if shutil.which("dot"):
        pytest.skip("a system dot is installed here")
    assert layout(SMALL).engine == "pygraphviz"


def test_time_limit_stops_a_slow_layout():
    dot = _big_dot()
    start = time.perf_counter()
    result = layout(dot, timeout=0.05)
    elapsed = time.perf_counter() - start
    assert result.svg is None
    assert "took over 0.05 s" in result.hint and "layout_timeout" in result.hint
    assert elapsed < 0.05 + 3
    with pytest.raises(LayoutError) as err:
        render_svg(dot, timeout=0.05)
    assert err.value.hint == result.hint


def test_time_limit_kills_the_whole_process_group(monkeypatch, tmp_path):
    """A hung engine and anything it started are killed, not left running."""
    pidfile = tmp_path / "pids"
    hang = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(120)\n"
    )
    monkeypatch.setattr(_layout, "engines", lambda: [("dot", [sys.executable, "-c", hang])])
    start = time.perf_counter()
    result = layout(SMALL, timeout=1.0)
    assert time.perf_counter() - start < 1.0 + 3
    assert result.svg is None and "took over 1 s" in result.hint
    if os.name != "posix":
        return
    pids = [int(p) for p in pidfile.read_text().split()]
    deadline = time.time() + 3
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie is dead, just not reaped by its parent
    except FileNotFoundError:
        return False


def test_missing_engine_gives_a_hint(monkeypatch):
    monkeypatch.setattr(_layout.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(_layout.shutil, "which", lambda name: None)
    result = layout(SMALL)
    assert result.svg is None and result.engine is None
    assert "pygraphviz" in result.hint
    with pytest.raises(LayoutError):
        render_svg(SMALL)
    html = svg_or_fallback_html(SMALL)
    assert "am-graph-fallback" in html and "MulBackward0" in html and "<svg" not in html


def test_falls_back_to_system_dot_when_the_wheel_fails(monkeypatch):
    """The first engine failing (not timing out) hands over to the next one."""
    fake_dot = [sys.executable, "-c", _layout._WORKER + "\n"]  # one process per graph, like dot
    broken = [sys.executable, "-c", "import sys; sys.exit('no graphviz here')"]
    monkeypatch.setattr(_layout, "engines", lambda: [("pygraphviz", broken), ("dot", fake_dot)])
    result = layout(SMALL)
    assert result.engine == "dot" and result.svg.startswith("<svg")


def test_bad_dot_gives_a_hint_not_an_exception():
    result = layout("digraph { a -> ")
    assert result.svg is None
    assert result.hint and "could not lay out" in result.hint


def test_fallback_html_escapes_the_dot():
    dot = 'digraph { a [label=<&lt;script&gt;>]; b [label="</pre><script>alert(1)</script>"]; a -> b }'
    html = svg_or_fallback_html(dot, timeout=0.0)
    assert "am-graph-fallback" in html
    assert "<script" not in html.lower() and "</pre><" not in html.replace("</pre></div>", "")
    ok = svg_or_fallback_html(dot)
    assert "<svg" in ok and "<script" not in ok.lower()


def test_layout_never_imports_torch_in_the_worker():
    """The worker's startup is what each drawing pays: it must not load torch."""
    code = _layout._WORKER + "\nimport sys as _s\nassert 'torch' not in _s.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], input=SMALL.encode(), capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"<svg" in proc.stdout


@pytest.mark.skipif(os.name != "posix", reason="the long-lived worker is POSIX only")
def test_one_worker_serves_many_graphs_and_a_dead_one_is_replaced():
    server = _layout._SERVER_PROCESS
    assert layout(SMALL).svg is not None
    first = server._proc
    assert first is not None and first.poll() is None
    assert layout(SMALL.replace("x", "y")).svg is not None
    assert server._proc is first  # the same process drew the second graph
    _layout._kill(first)  # e.g. killed from outside while idle
    result = layout(SMALL.replace("x", "z"))
    assert result.svg is not None and result.engine == "pygraphviz"
    assert server._proc is not None and server._proc is not first
    bad = layout("digraph { a -> ")
    assert bad.svg is None and "syntax error" in bad.hint  # Graphviz's own words
    assert layout(SMALL.replace("x", "w")).svg is not None  # and the worker goes on


@pytest.mark.skipif(os.name != "posix", reason="the long-lived worker is POSIX only")
def test_time_limit_kills_the_long_lived_worker():
    layout(SMALL)
    worker = _layout._SERVER_PROCESS._proc
    result = layout(_big_dot(), timeout=0.05)
    assert result.svg is None and "took over" in result.hint
    assert worker.poll() is not None  # killed, not left laying out in the background
    assert layout(SMALL.replace("x", "v")).svg is not None  # a new worker takes over


def test_a_busy_worker_does_not_make_another_caller_wait():
    """Another thread holding the worker: this caller lays out in its own process."""
    lock = _layout._SERVER_PROCESS._lock
    assert lock.acquire(timeout=5)
    try:
        result = layout(SMALL.replace("x", "busy"))
    finally:
        lock.release()
    assert result.svg is not None and "<title>r0</title>" in result.svg


_WORKER_STARTED = (
    "import autograd_magic.render.layout as L\n"
    "print(L._SERVER_PROCESS._proc is not None)\n"
)


@pytest.mark.skipif(os.name != "posix" or not any(n == "pygraphviz" for n, _ in _layout.engines()),
                    reason="the long-lived worker is POSIX only, and serves pygraphviz")
@pytest.mark.parametrize("in_notebook", [True, False])
def test_the_worker_starts_as_the_package_imports_only_in_a_notebook(in_notebook):
    """The first traced cell must not wait for the worker to start: in an IPython shell it starts
    when the package begins importing (before `%load_ext` returns); a plain script starts none."""
    shell = "from IPython.core.interactiveshell import InteractiveShell\nInteractiveShell.instance()\n"
    code = (shell if in_notebook else "") + _WORKER_STARTED
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(in_notebook)


@pytest.mark.skipif(os.name != "posix", reason="the long-lived worker is POSIX only")
def test_graphs_sent_ahead_come_back_as_laid_out_then():
    """`prefetch` starts a layout and returns; `layout` later reads that answer (the same SVG a
    plain call gives), in any order, and an unasked answer lands in the cache."""
    a, b = SMALL.replace("x", "ahead1"), SMALL.replace("x", "ahead2")
    expected = {d: layout(d).svg for d in (a, b)}
    _layout._CACHE.clear()
    server = _layout._SERVER_PROCESS
    assert _layout.prefetch(a) and _layout.prefetch(b)
    assert [d for d, _ in server._ahead] == [a, b]
    assert _layout.prefetch(SMALL.replace("x", "third")) is False  # two wait at most
    got_b = layout(b)  # asked out of order: a's answer is read first, into the cache
    assert got_b.svg == expected[b] and got_b.engine == "pygraphviz"
    assert not server._ahead and a in _layout._CACHE
    assert layout(a).svg == expected[a]
    assert _layout.prefetch(a) is False  # already drawn: nothing to start


@pytest.mark.skipif(os.name != "posix", reason="the long-lived worker is POSIX only")
def test_a_graph_sent_ahead_keeps_its_time_limit():
    """The limit runs from when the graph was sent: a slow one is stopped and its worker killed."""
    layout(SMALL)
    worker = _layout._SERVER_PROCESS._proc
    big = _big_dot()
    assert _layout.prefetch(big, timeout=0.05)
    time.sleep(0.2)
    start = time.perf_counter()
    result = layout(big, timeout=60)  # the prefetch's limit holds, not this call's (callers pass the same)
    assert result.svg is None and "took over" in result.hint
    assert time.perf_counter() - start < 1
    assert worker.poll() is not None and not _layout._SERVER_PROCESS._ahead
    assert layout(SMALL.replace("x", "after")).svg is not None  # a new worker takes over
