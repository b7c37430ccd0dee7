"""The magic in a real IPython shell: a cell behaves exactly as without it."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from IPython.utils.capture import capture_output

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(shell, cell):
    with capture_output(display=True) as cap:
        result = shell.run_cell(cell)
    return result, cap


def test_prints_and_last_expression_are_shown(shell):
    shell.run_cell("import torch\nx = torch.ones(2, 2, requires_grad=True)")
    result, cap = run(shell, "%%autograd --quiet\ny = x + 2\nprint('y is', y.sum().item())\ny.sum()")
    assert result.success
    assert "y is 12.0" in cap.stdout
    assert "tensor(12., grad_fn=<SumBackward0>)" in cap.stdout  # the cell's last expression is displayed
    assert torch.equal(shell.user_ns["_"], torch.tensor(12.0))


@pytest.mark.parametrize("cell", ["torch.ones(3).sum();", "torch.ones(3).sum()", "t3 = torch.ones(3)\nt3"])
def test_display_of_the_last_expression_matches_a_plain_cell(shell, cell):
    shell.run_cell("import torch")
    _, plain = run(shell, cell)
    _, traced = run(shell, "%%autograd --quiet\n" + cell)
    assert traced.stdout == plain.stdout


def test_view_is_displayed_with_text_and_html(shell):
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)")
    _, cap = run(shell, "%%autograd --static\ny = x * 3\ny.backward()")
    bundles = [o.data for o in cap.outputs]
    assert any("text/html" in b and "text/plain" in b for b in bundles)
    html = next(b["text/html"] for b in bundles if "text/html" in b)
    assert "<script" not in html.lower()


def test_variables_land_in_the_namespace(shell):
    shell.run_cell("import torch")
    run(shell, "%%autograd --quiet\na = torch.tensor([3.0, 2.0], requires_grad=True)\nb = (a * 8).sum()\nb.backward()")
    assert torch.equal(shell.user_ns["a"].grad, torch.tensor([8.0, 8.0]))
    assert shell.user_ns["b"].grad_fn is not None
    assert "__autograd_magic_bind__" not in shell.user_ns


def test_a_failing_cell_fails_with_its_own_traceback(shell):
    shell.run_cell("import torch")
    cell = "x = torch.randn(4)\ny = x + 2\nz = (y * y).mean()\nz.backward()\nprint('not reached')"
    plain, plain_cap = run(shell, cell)
    traced, cap = run(shell, "%%autograd --quiet\n" + cell)
    assert type(traced.error_in_exec) is type(plain.error_in_exec) is RuntimeError
    assert str(traced.error_in_exec) == str(plain.error_in_exec)
    text = ANSI.sub("", cap.stdout)
    assert not text.startswith("not reached")
    assert "----> 5 z.backward()" in text  # line 5 of the cell: %%autograd is line 1
    assert "autograd_magic" not in text  # none of our frames
    assert "overrides.py" not in text  # nor torch's dispatch to our mode
    # the rest of the traceback is the one a plain run shows
    plain_files = re.findall(r"File (\S+):\d+", ANSI.sub("", plain_cap.stdout))
    assert re.findall(r"File (\S+):\d+", text) == plain_files


def test_syntax_error_is_reported_like_python(shell):
    result, _ = run(shell, "%%autograd\nx = = 1")
    assert isinstance(result.error_before_exec, SyntaxError) and not result.success


def run_counted(shell, cell):
    """A cell as a notebook runs it: stored in history, so it gets a prompt number."""
    with capture_output(display=True) as cap:
        result = shell.run_cell(cell, store_history=True)
    return result, ANSI.sub("", cap.stdout + cap.stderr)


def test_traceback_header_names_the_cell_by_its_prompt_number(shell):
    shell.run_cell("import torch")
    cell = "x = torch.ones(2, requires_grad=True)\ny = x * 2\ny.backward()"
    plain, plain_text = run_counted(shell, cell)
    traced, text = run_counted(shell, "%%autograd --quiet\n" + cell)
    assert traced.execution_count == plain.execution_count + 1
    assert f"Cell In[{plain.execution_count}], line 3\n" in plain_text  # IPython's own header
    assert f"Cell In[{traced.execution_count}], line 4\n" in text  # the same count, lines as the editor shows
    assert f"Cell In[{traced.execution_count + 1}]" not in text


@pytest.mark.parametrize("body", ["x = (1,\ny = 2", "x = = 1", "if True:\nprint(1)", "def f():\n  a = 1\n    b = 2"])
def test_syntax_error_looks_exactly_like_a_plain_cells(shell, body):
    # the plain cell gets a first line too, so both bodies start on editor line 2
    plain, plain_text = run_counted(shell, "# plain\n" + body)
    traced, text = run_counted(shell, "%%autograd --quiet\n" + body)
    assert type(traced.error_before_exec) is type(plain.error_before_exec)
    assert issubclass(type(plain.error_before_exec), SyntaxError)
    assert traced.error_in_exec is None and not traced.success
    assert text == plain_text.replace(f"Cell In[{plain.execution_count}]", f"Cell In[{traced.execution_count}]")
    assert "autograd_magic" not in text and "run_cell_magic" not in text and "Traceback" not in text
    ours, theirs = traced.error_before_exec, plain.error_before_exec
    assert (ours.msg, ours.lineno, ours.offset, ours.text) == (theirs.msg, theirs.lineno, theirs.offset, theirs.text)


def test_a_cell_that_parses_still_runs_after_the_syntax_check(shell):
    shell.run_cell("import torch")
    result, text = run_counted(shell, "%%autograd --quiet -o t\nx = torch.ones(2, requires_grad=True)\n(x * 3).sum().backward()")
    assert result.success and torch.equal(shell.user_ns["x"].grad, torch.tensor([3.0, 3.0]))


def test_error_in_a_function_defined_in_an_earlier_cell(shell):
    shell.run_cell("import torch\ndef f(t):\n    return t.view(7)")
    result, cap = run(shell, "%%autograd --quiet -o t\nx = torch.ones(6, requires_grad=True)\ny = f(x * 2)")
    assert isinstance(result.error_in_exec, RuntimeError)
    t = shell.user_ns.get("t")
    assert t is not None and t.error is not None and t.error.line == 3
    assert t.last("x") is not None


def test_trace_is_stored_with_o_and_shown_in_text_mode(shell):
    shell.run_cell("import torch\nx = torch.tensor(2.0, requires_grad=True)")
    _, cap = run(shell, "%%autograd --text -o tr\ny = x ** 2\ny.backward()")
    tr = shell.user_ns["tr"]
    assert [r.expr for r in tr.records if not r.external] == ["x ** 2"]
    assert "x ** 2" in cap.stdout and "PowBackward0" in cap.stdout


@pytest.mark.parametrize("line", ["--bogus", "--limit 0", "--limit x", "-o"])
def test_bad_options_give_usage(shell, line):
    result, cap = run(shell, f"%%autograd {line}\n1 + 1")
    err = result.error_in_exec or result.error_before_exec
    assert err is not None and type(err).__name__ == "UsageError"
    assert "usage" in str(err).lower() or "usage" in cap.stdout.lower() + cap.stderr.lower()


def test_help_is_the_docstring(shell):
    from autograd_magic.notebook.magic import AutogradMagics

    doc = AutogradMagics.autograd.__doc__
    assert "--no-grad" in doc and "--detach" in doc and "-o" in doc


def test_loop_iterations_are_told_apart_and_counted(shell):
    shell.run_cell("import torch\nw = torch.tensor(1.0, requires_grad=True)")
    run(shell, "%%autograd --quiet -o t --limit 3\nh = w\nfor i in range(10):\n    h = h * 2\nh.backward()")
    t = shell.user_ns["t"]
    muls = [r for r in t.records if r.expr == "h * 2"]
    assert [r.occurrence for r in muls] == [0, 1, 2]
    assert t.repeats[muls[0].id] == 7
    assert float(shell.user_ns["w"].grad) == 1024.0  # the real computation ran all 10 steps


def test_no_grad_and_detach_options_show_variants_and_leave_the_run_alone(shell):
    shell.run_cell("import torch\nx = torch.tensor([[1., 2, 3], [3, 2, 1]], requires_grad=True)")
    cell = "y = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()"
    run(shell, "%%autograd --quiet -o v --detach y\n" + cell)
    v = shell.user_ns["v"]
    assert v.variant_of is not None
    # the real run still happened, untouched
    np.testing.assert_allclose(shell.user_ns["x"].grad.numpy(), [[10, 16, 22], [22, 16, 10]])


def test_torch_warnings_point_at_the_users_line(shell):
    shell.run_cell("import torch\nx = torch.ones(2, requires_grad=True)\ny = x * 2")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shell.run_cell("%%autograd --quiet\nz = 1\nprint(y.grad)")
    grad_warnings = [w for w in caught if ".grad attribute" in str(w.message)]
    assert grad_warnings, "torch warns about reading a non-leaf's .grad, as in a plain run"
    w = grad_warnings[0]
    assert "autograd_magic" not in w.filename and w.lineno == 3  # the cell's own line 3


@pytest.mark.parametrize("last", ["a, b;", "b ;  # quiet", "a, b  # not quiet;", "b"])
def test_a_trailing_semicolon_silences_the_value_as_in_a_plain_cell(shell, last):
    from IPython.utils.capture import capture_output

    shell.run_cell("import torch", store_history=True)
    body = f"a = torch.arange(4.); b = a * 2\n{last}"
    with capture_output() as plain_out:
        plain = shell.run_cell(body, store_history=True)
    with capture_output() as traced_out:
        traced = shell.run_cell("%%autograd --quiet\n" + body, store_history=True)
    assert (plain.result is None) == (traced.result is None)
    if plain.result is not None:
        assert repr(traced.result) == repr(plain.result)
    assert ("Out[" in plain_out.stdout) == ("Out[" in traced_out.stdout)


def test_text_shows_the_real_run_then_the_variant_and_the_gradient_check(shell):
    """`--text` with a variant prints the real run and the variant against it, and with `--check`
    the verdict per leaf, as the other views show them (it printed the variant alone, and no check)."""
    shell.run_cell("import torch\nx = torch.tensor([2.0, 1.0], requires_grad=True)")
    with capture_output() as out:
        shell.run_cell("%%autograd --text --no-grad\ny = (x**3).sum()")
    heads = [line for line in out.stdout.splitlines() if line.startswith("autograd trace:")]
    assert len(heads) == 2 and "variant" not in heads[0] and "[variant: under torch.no_grad()]" in heads[1]
    with capture_output() as out:
        shell.run_cell("%%autograd --text --check\ny = (x**3).sum()\ny.backward()")
    plain = torch.tensor([2.0, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: (t ** 3).sum(), (plain,))  # torch agrees the gradient is right
    check = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith(("✓", "✗", "?"))]
    assert len(check) == 1 and check[0].startswith("✓ x: ") and "2 elements" in check[0], out.stdout
