"""Issue 14, side effects: a variant or the gradient check never runs a cell's shell commands or magics again.

A real file append, counted after the real run, a variant and the check, against the same
cell run plainly; the view names what was skipped and says the Python code runs again.
"""

from __future__ import annotations

from pathlib import Path

from IPython.utils.capture import capture_output

from autograd_magic.notebook.session import snapshot_budget


def cell(log: Path) -> str:
    return (
        f"!echo run >> {log}\n"
        f"with open({str(log)!r}, 'a') as f:\n    f.write('py\\n')\n"
        "%time z = 1\n"
        "y = (x * x).sum()\n"
        "y.backward()"
    )


def lines(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def run(shell, text):
    with capture_output(display=True):
        result = shell.run_cell(text, store_history=True)
    assert result.success, result.error_in_exec
    return result


def test_a_plain_run_appends_once_from_the_shell_and_once_from_python(shell, tmp_path):
    log = tmp_path / "log.txt"
    shell.run_cell("import torch\nx = torch.ones(3, requires_grad=True)")
    run(shell, cell(log))
    assert lines(log) == ["run", "py"]


def test_a_no_grad_variant_re_runs_python_but_not_the_shell_escape(shell, tmp_path):
    log = tmp_path / "log.txt"
    shell.run_cell("import torch\nx = torch.ones(3, requires_grad=True)")
    run(shell, "%%autograd --quiet --no-grad -o v\n" + cell(log))
    assert lines(log).count("run") == 1  # the real run's only
    assert lines(log).count("py") == 2  # the real run's and the variant's: the Python code ran again
    v = shell.user_ns["v"]
    assert v.variant_of is not None and v.grad_mode == "no_grad"  # (its backward() fails, as under no_grad)
    note = next(n for n in v.notes if "skipped" in n)
    assert f"!echo run >> {log}" in note and "%time z = 1" in note and "written again" in note
    assert shell.user_ns["x"].grad.tolist() == [2.0, 2.0, 2.0]  # the real run's grad, untouched


def test_the_gradient_check_never_runs_the_shell_escape_again(shell, tmp_path):
    log = tmp_path / "log.txt"
    shell.run_cell("import torch\nx = torch.ones(3, requires_grad=True)")
    run(shell, "%%autograd --quiet --check -o t\n" + cell(log))
    t = shell.user_ns["t"]
    (check,) = t.gradcheck
    assert check.ok is True and check.elements_checked > 0
    assert lines(log).count("run") == 1
    assert lines(log).count("py") > 2  # the reference run and each nudge re-ran the Python code


def test_the_view_says_what_a_re_run_repeats_and_skips(shell, tmp_path):
    log = tmp_path / "log.txt"
    shell.run_cell("import torch\nx = torch.ones(3, requires_grad=True)")
    for s in snapshot_budget(shell).sessions():
        s.close()
    with capture_output(display=True) as cap:
        shell.run_cell("%%autograd\n" + cell(log), store_history=True)
    (session,) = snapshot_budget(shell).sessions()
    note = next(n for n in session.trace.notes if "shell commands and magics" in n)
    assert "re-run this cell's Python code" in note and f"!echo run >> {log}" in note
    assert any("shell commands and magics" in str(o.data) for o in cap.outputs)  # in the snapshot output too
    session.close()


def test_every_variant_says_it_re_ran_the_python_code(shell, tmp_path):
    log = tmp_path / "py.txt"
    shell.run_cell("import torch\nx = torch.ones(3, requires_grad=True)")
    body = f"with open({str(log)!r}, 'a') as f:\n    f.write('py\\n')\ny = (x * x).sum()"
    run(shell, "%%autograd --quiet --detach y -o v\n" + body)
    assert lines(log) == ["py", "py"]  # the real run and the variant, as the note says
    assert any("re-ran the cell's Python code" in n and "written again" in n for n in shell.user_ns["v"].notes)
