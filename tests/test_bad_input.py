"""Bad and unusual input: option errors, empty cells, huge and odd tensors, magics inside the cell.

Every option error is a `UsageError` that shows the usage line and runs
nothing; a cell without tensor ops runs and gets a one-line note; a 1e8
element tensor costs no extra copy; sparse, meta, complex, integer, bool,
non-contiguous and subclass tensors run exactly as plain and every view
renders them; `%time` and `!cmd` inside the cell behave as in a plain cell;
user strings are escaped in HTML and DOT.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from fuzz_programs import fresh_shell, run

USAGE = "%autograd [-o NAME]"


@pytest.fixture(scope="module")
def ipy():
    return fresh_shell()


@pytest.mark.parametrize(
    "options", ["--bogus", "--limit 0", "--limit -3", "--limit x", "-o", "--detach", "-o a b", "-o 1bad", "-o class", "-o a.b",
                "--detach ''"]
)
def test_option_errors_are_usage_errors(ipy, options, capsys):
    ipy.user_ns.pop("ran", None)
    result = ipy.run_cell(f"%%autograd {options}\nran = torch.ones(1) * 2", store_history=False)
    err = result.error_in_exec or result.error_before_exec
    assert type(err).__name__ == "UsageError", err
    assert USAGE in str(err), str(err)  # the usage line comes with the message
    assert "ran" not in ipy.user_ns  # nothing ran
    shown = capsys.readouterr()
    assert "UsageError" in shown.out + shown.err


@pytest.mark.parametrize("body", ["\n", "   \n\n", "# only a comment", "a = 1 + 2\nprint(a)", "import math\nmath.sqrt(4)"])
@pytest.mark.parametrize("mode", ["", "--text", "--static"])
def test_cell_without_tensor_ops_gets_a_short_note(ipy, body, mode):
    plain = run(ipy, body, traced=False)
    traced = run(ipy, body, traced=True, magic=f"%%autograd {mode} -o t".replace("  ", " "))
    assert traced.error is None and plain.error is None
    assert traced.namespace.keys() - {"t"} == plain.namespace.keys()
    assert traced.stdout.startswith(plain.stdout)  # the cell's own output first, as in a plain run
    note = traced.stdout[len(plain.stdout):].strip()
    assert "no tensor" in note.lower(), note
    assert len(note.splitlines()) == 1 and len(note) < 120, note
    assert len(ipy.user_ns["t"].records) == 0


def test_truly_empty_cell_is_ipythons_usage_error(ipy):
    # IPython refuses an empty body for every cell magic (%%time, %%capture ...) before the magic runs.
    ours = ipy.run_cell("%%autograd\n", store_history=False)
    theirs = ipy.run_cell("%%capture\n", store_history=False)
    assert type(ours.error_in_exec or ours.error_before_exec).__name__ == "UsageError"
    assert type(theirs.error_in_exec or theirs.error_before_exec).__name__ == "UsageError"


# ---- huge tensors: bounded previews, no extra copies ----
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import torch
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext autograd_magic")
    shell.run_cell("import torch")
    torch.manual_seed(0)
    torch.ones(1) * 2  # warm up kernels and allocator before measuring
    # the current RSS (KiB), not the high-water mark: imports may have peaked higher
    base = int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
    traced, cell = sys.argv[1] == "traced", sys.argv[2]
    result = shell.run_cell(("%%autograd --quiet -o t\\n" if traced else "") + cell)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sizes = [r.preview.values.size for r in shell.user_ns["t"].records if r.preview is not None
             and r.preview.values is not None] if traced else []
    print(json.dumps({"error": repr(result.error_in_exec), "base": base, "peak": peak, "sizes": sizes}))
    """
)

HUGE_CELLS = [
    "x = torch.randn(10**8, requires_grad=True)\ny = x * 2\ns = y.sum()\ns.backward()",
    # non-contiguous views and outputs: a preview must not flatten them into a copy
    "x = torch.randn(10000, 10000)\ny = x.t()\nz = (y * 1)[::2]\ns = z.sum()",
    # integer tensors: their statistics must not make a float64 copy
    "k = torch.full((5 * 10**7,), 3, dtype=torch.int32)\nj = k + 1",
]


def _measure(cell: str) -> tuple[dict, dict]:
    """Peak RSS of a plain and a traced run, each in its own process (the two run side by side)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _MEMORY_SCRIPT, kind, cell], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for kind in ("plain", "traced")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results[0], results[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and ru_maxrss in KiB")
@pytest.mark.parametrize("cell", HUGE_CELLS, ids=["contiguous", "non-contiguous", "integer"])
def test_huge_tensor_costs_no_extra_copy(cell):
    plain, traced = _measure(cell)
    assert plain["error"] == traced["error"] == "None"
    grown_plain = plain["peak"] - plain["base"]  # KiB
    grown_traced = traced["peak"] - traced["base"]
    assert grown_plain > 180_000  # the cell really made 200-400 MB tensors
    assert grown_traced <= grown_plain * 1.10 + 50_000, (grown_plain, grown_traced)
    assert traced["sizes"] and max(traced["sizes"]) <= 512


# ---- odd tensors ----
ODD_CELLS = {
    "non-contiguous": "x = torch.arange(12.).reshape(3, 4).t()\ny = x * 2\nz = y[::2, 1:]\nz",
    "complex": "z = torch.tensor([1+2j, 3-1j], requires_grad=True)\nw = (z * z.conj()).real.sum()\nw.backward()\nprint(z.grad)",
    "integer": "i = torch.arange(10)\nj = i * 3 // 2\nk = j.sum()\nprint(k)",
    "bool": "b = torch.tensor([True, False]) & torch.tensor([True, True])\nc = b.any()\nb",
    "sparse": "s = torch.eye(3).to_sparse()\nt2 = s * 2\nd = t2.to_dense()\nprint(d.sum())",
    "sparse-grad": "w = torch.randn(3, 3, requires_grad=True)\ns = torch.eye(3).to_sparse()\n"
                   "y = torch.sparse.mm(s, w).sum()\ny.backward()\nprint(w.grad)",
    "meta": "m = torch.empty(1000, 1000, device='meta', requires_grad=True)\nn = (m @ m).sum()\nprint(n.shape)",
    "subclass": "class Tagged(torch.Tensor):\n    pass\na = torch.ones(3, requires_grad=True).as_subclass(Tagged)\n"
                "b = (a + 1).sum()\nb.backward()\nprint(type(b).__name__)",
    "subclass-torch-function": "class Loud(torch.Tensor):\n    @classmethod\n"
                               "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                               "        return super().__torch_function__(func, types, args, kwargs or {})\n"
                               "a = torch.ones(3).as_subclass(Loud)\nb = a * 2\nc = b.sum()\nprint(c)",
    "half": "h = torch.randn(100, 100, dtype=torch.bfloat16, requires_grad=True)\n"
            "g = torch.randn(10, dtype=torch.float16)\nk = (h.float() ** 2).mean()\nk.backward()",
    "empty": "e = torch.empty(0, 3, requires_grad=True)\nf = e.sum(0)\nf.sum().backward()\nprint(e.grad)",
    "nan-inf": "x = torch.tensor([0.0, 1.0, -1.0], requires_grad=True)\ny = x / 0\nz = y.nansum()\nz",
    "many-dims": "x = torch.zeros(7, 7, 7, 7, 7, requires_grad=True)\ny = (x + 1).permute(4, 3, 2, 1, 0)\n"
                 "y.sum().backward()",
    "uint8-image": "img = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)\nf = img.float() / 255\nf.mean()",
}


@pytest.mark.parametrize("name", sorted(ODD_CELLS))
def test_odd_tensors_run_as_plain_and_render(ipy, name):
    cell = ODD_CELLS[name]
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True, magic="%%autograd --quiet -o t")
    assert traced.error == plain.error
    assert traced.stdout == plain.stdout
    assert {k: v for k, v in traced.namespace.items() if k != "t"} == plain.namespace
    t = ipy.user_ns["t"]
    assert t.records, "the cell's ops were recorded"
    assert not any("tracer skipped" in n for n in t.notes), t.notes
    text = str(t)
    assert "autograd trace" in text
    html = t.to_html()
    assert html.strip().startswith("<") and "<script" not in html
    dot = t.to_dot()
    assert dot.lstrip().startswith(("digraph", "strict digraph"))
    for rec in t.records:
        if rec.preview is not None and rec.preview.values is not None:
            assert rec.preview.values.size <= 512


def test_huge_graph_previews_and_views_stay_bounded(ipy):
    cell = "x = torch.randn(1000, 1000, requires_grad=True)\ny = x\nfor i in range(50):\n    y = y * 1.01\ny.sum().backward()"
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True, magic="%%autograd --quiet -o t")
    assert traced.namespace.keys() - {"t"} == plain.namespace.keys()
    t = ipy.user_ns["t"]
    assert len(t.records) < 20  # loop repetitions beyond the detail limit are counted, not kept
    assert len(str(t)) < 20_000


# ---- magics and shell escapes inside the cell ----
def test_line_magic_and_shell_escape_inside_cell(ipy, capfd):
    cells = [
        "%time y = torch.ones(2) * 3\nprint(y)",
        "out = !echo hi\nprint(out)",
        "x = torch.ones(2)\n%xdel x\nprint('x' in dir())",
        "y = torch.ones(2)\n!echo from-shell\nz = y + 1",
    ]
    for cell in cells:
        plain = run(ipy, cell, traced=False)
        plain_fd = capfd.readouterr().out
        traced = run(ipy, cell, traced=True)
        traced_fd = capfd.readouterr().out
        assert traced.error == plain.error == None, cell  # noqa: E711
        assert traced.namespace == plain.namespace, cell
        timings = re.compile(r"[\d.]+ ?(ns|µs|us|ms|s)\b")
        assert timings.sub("T", traced.stdout) == timings.sub("T", plain.stdout), cell
        assert traced_fd == plain_fd, cell
    assert "from-shell" in plain.stdout + plain_fd and "from-shell" in traced.stdout + traced_fd


# ---- escaping of user strings ----
HOSTILE = '<script>alert("x")</script>'


def test_user_strings_are_escaped(ipy):
    cell = (
        f"label = '{HOSTILE}'\n"
        "x = torch.ones(2, requires_grad=True)\n"
        f"y = x * len('{HOSTILE}') if label else x\n"
        f"Weird = type('<img src=x onerror=alert(1)>', (torch.nn.Module,), {{'forward': lambda self, v: v * 2}})\n"
        "m = Weird()\nz = m(y)\nz.sum().backward()\n"
        f"raise ValueError('{HOSTILE} & \"quotes\"')"
    )
    traced = run(ipy, cell, traced=True, magic="%%autograd --quiet -o t")
    assert traced.error == ("ValueError", f'{HOSTILE} & "quotes"')
    t = ipy.user_ns["t"]
    html = t.to_html()
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(" in html  # the hostile text is shown, escaped
    dot = t.to_dot()
    assert "<script" not in dot and "<img" not in dot
    import pygraphviz  # a declared dependency: missing, this fails rather than skips
    pygraphviz.AGraph(string=dot)  # still valid DOT
    svg = t.to_svg()
    assert "<script" not in svg and "<img" not in svg


# ---- awkward source ----
def test_deeply_nested_expression_runs_as_plain(ipy):
    """900 nested additions compile in a plain cell; the name binding must not hit the recursion limit."""
    cell = "x = torch.ones(2, requires_grad=True)\ny = " + " + ".join(["x"] * 900) + "\ny.sum().backward()\nprint(x.grad)"
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True, magic="%%autograd --quiet -o t")
    assert plain.error is None and traced.error is None
    assert traced.stdout == plain.stdout
    assert {k: v for k, v in traced.namespace.items() if k != "t"} == plain.namespace
    assert ipy.user_ns["t"].last("y") is not None


@pytest.mark.parametrize("cell", ["x = (", "x = torch.ones(2)\n  y = x", "def f(:\n  pass", "x = 1\ny = x +* 2"])
def test_syntax_errors_as_plain(ipy, cell):
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True)
    assert plain.error is not None and traced.error[0] == plain.error[0]

    def message(error):  # the cell's filename and line count differ: the magic is line 1
        return re.sub(r"\(<ipython-input-[^>]*>, line \d+\)", "", error[1])

    assert message(traced.error) == message(plain.error)
    # The offending source line is shown as in a plain cell (above it, like IPython's
    # own %%time, the frames of the magic that parsed the cell).
    assert traced.shown.split("\n")[-3:] == plain.shown.split("\n")[-3:]
    assert "x" not in ipy.user_ns or cell.startswith("x = 1")


def test_unicode_names_and_source(ipy):
    cell = "λ = torch.ones(2) * 2\nμ = λ + 1  # ünïcode ✓\nz = (μ * 3).sum()\nprint('✓', z)"
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True, magic="%%autograd --quiet -o t")
    assert traced.stdout == plain.stdout and traced.error is None
    t = ipy.user_ns["t"]
    assert [(r.name, r.expr) for r in t.records if r.name] == [("λ", "torch.ones(2) * 2"), ("μ", "λ + 1"), ("z", "(μ * 3).sum()")]
    assert "μ" in str(t) and "μ" in t.to_html()


@pytest.mark.xfail(strict=True, reason="top-level await under a cell magic: IPython's own %%time refuses it too")
def test_top_level_await_as_plain(ipy):
    cell = "import asyncio\nx = torch.ones(2) * 2\nawait asyncio.sleep(0)\ny = x + 1\nprint(y)"
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True)
    assert plain.error is None
    assert traced.error == plain.error


ODD_PROGRAMS = {
    # a non-string key in the namespace (legal through globals())
    "int-key": "globals()[1] = 'x'\nx = torch.ones(2, requires_grad=True)\ny = x * 2\ny.sum().backward()\n"
               "print(x.grad)\ndel globals()[1]",
    # an exception whose str() fails, and one that is not an Exception
    "bad-str": "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no str')\n"
               "x = torch.ones(2) * 2\nraise E()",
    "base-exception": "class B(BaseException):\n    pass\nx = torch.ones(2) * 2\nraise B('base')",
    "system-exit": "x = torch.ones(2) * 2\nraise SystemExit(3)",
    # a namespace value whose __class__ raises (a lazy proxy): isinstance() on it raises
    "proxy": "class Proxy:\n    @property\n    def __class__(self):\n        raise RuntimeError('not loaded')\n"
             "p = Proxy()\nx = torch.ones(2, requires_grad=True)\ny = x * 2\ny.sum().backward()\nprint(x.grad)",
}


@pytest.mark.parametrize("name", sorted(ODD_PROGRAMS))
def test_odd_programs_fail_or_pass_as_plain(ipy, name):
    cell = ODD_PROGRAMS[name]
    plain = run(ipy, cell, traced=False)
    traced = run(ipy, cell, traced=True)
    assert traced.error == plain.error
    assert traced.namespace == plain.namespace
    assert traced.shown == plain.shown


@pytest.mark.parametrize("options", ["--limit 0", "-o 1x", "--bogus", "--detach ''"])
def test_autograd_on_refuses_options_every_cell_would_refuse(ipy, options):
    """`%autograd on OPTIONS` checks them as a cell does: accepted, each later cell would fail with them."""
    result = ipy.run_cell(f"%autograd on {options}", store_history=False)
    err = result.error_in_exec or result.error_before_exec
    try:
        assert type(err).__name__ == "UsageError" and USAGE in str(err), err
        after = ipy.run_cell("ran = torch.ones(1) * 2", store_history=False)
        assert after.success and ipy.user_ns["ran"].tolist() == [2.0]  # the notebook goes on, plain
    finally:
        ipy.run_cell("%autograd off", store_history=False)
