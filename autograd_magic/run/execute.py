"""Run a cell's text the way IPython would, under the tracer.

IPython's own pipeline without `run_cell`: `transform_cell` (so `%time`
and `!ls` inside the cell work), `compile.cache` (tracebacks and linecache
show the cell's lines), `ast_parse`, the shell's AST transformers, then our
name binding; each top-level statement runs in order and the last bare
expression is displayed by the display hook, as in a plain cell. Exceptions
propagate; `trim_traceback` removes our frames from what the user sees.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import sys
import warnings
from dataclasses import dataclass
from types import TracebackType
from typing import Iterable, Optional

import torch

from ..data.trace import Trace, TraceError
from ..capture.earlier import EarlierCells
from ..capture.interventions import Intervention
from ..capture.sites import PACKAGE_DIR
from ..capture.source import BIND_NAME, SourceMap, bind_names
from ..capture.torch_compat import set_grad_enabled
from ..capture.tracer import Tracer
from .. import limits

_MISSING = object()



@dataclass
class CellRun:
    trace: Trace
    error: Optional[BaseException]
    filename: str
    stdout: str = ""


def _compile_nodes(shell, tree: ast.Module, filename: str, display_last: bool):
    """One code object per top-level statement; the last expression in 'single' mode."""
    codes = []
    body = tree.body
    for i, node in enumerate(body):
        if display_last and i == len(body) - 1 and isinstance(node, ast.Expr):
            mod = ast.Interactive(body=[node])
            codes.append(shell.compile(mod, filename, "single"))
        else:
            mod = ast.Module(body=[node], type_ignores=[])
            codes.append(shell.compile(mod, filename, "exec"))
    return codes


def _silenced(shell, code_text: str) -> bool:
    """Whether IPython would keep a plain cell of this text quiet. Its displayhook reads the last
    stored input: this body, for a cell stored in the history (a notebook's, a terminal's); for one
    run with store_history=False, the input before it, as for a plain cell run so."""
    hook = getattr(shell, "displayhook", None)
    try:
        info = getattr(getattr(hook, "exec_result", None), "info", None)
        if info is not None and not getattr(info, "store_history", True):
            return bool(hook.quiet())
        return bool(hook.semicolon_at_end_of_expression(code_text))
    except Exception:  # an older IPython, or a shell without its displayhook
        return code_text.rstrip().endswith(";")


def cell_number(shell) -> int:
    """The execution count of the cell running now: what IPython's own `Cell In[n]` shows for it.

    `run_cell` caches the cell under the count it had on entry and bumps
    `shell.execution_count` before running it, so inside a cell (and so inside
    the magic) the shell's counter is already the next prompt's. The count the
    cell got is on the result IPython fills while it runs; outside a cell (a
    widget click re-running a variant) there is none, and the counter is used.
    """
    result = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    number = getattr(result, "execution_count", None)
    return number if isinstance(number, int) else shell.execution_count


def parse_cell(shell, body: str, *, first_line: int = 2, number: Optional[int] = None) -> tuple[str, str, ast.Module]:
    """(the code as compiled, its cached file name, its AST): the body as IPython parses a cell.

    Lines count as the editor shows them (`first_line` is the body's first).
    A SyntaxError propagates exactly as IPython's parser raises it.
    """
    code_text = "\n" * (first_line - 1) + _transform_cell(shell, body)
    filename = shell.compile.cache(code_text, number=cell_number(shell) if number is None else number)
    tree = shell.compile.ast_parse(code_text, filename=filename)
    return code_text, filename, tree


def execute(
    shell,
    body: str,
    *,
    first_line: int = 2,
    namespace: Optional[dict] = None,
    interventions: Iterable[Intervention] = (),
    display: bool = True,
    capture: bool = False,
    detail_limit: int = limits.DETAIL_LIMIT,
    earlier: Optional[EarlierCells] = None,
) -> CellRun:
    """Run `body` (a cell without its `%%autograd` line) traced.

    `first_line` is the editor line of the body's first line, so records and
    tracebacks count lines as the user sees them. `namespace` defaults to the
    shell's user namespace; the sandbox passes a copy. `interventions` are a
    variant's changes (none for the real run). With `display=False`
    the last expression is not shown; with `capture=True` prints are kept in
    `CellRun.stdout` instead of shown. `earlier` holds the records of earlier
    traced cells: a backward reaching their nodes brings them into this trace,
    and a real run (no interventions) leaves its own records there too.
    """
    __tracebackhide__ = True
    ns = shell.user_ns if namespace is None else namespace
    code_text, filename, tree = parse_cell(shell, body, first_line=first_line)  # a SyntaxError propagates
    tree = shell.transform_ast(tree)
    tree = bind_names(tree)
    # `a, b;`: a trailing semicolon silences the value, as IPython's own displayhook does for a plain
    # cell (it reads the last history entry, which here is the magic's call, not this body)
    display = display and not _silenced(shell, code_text)
    codes = _compile_nodes(shell, tree, filename, display_last=display)
    interventions = tuple(interventions)
    no_grad = any(iv.disables_grad for iv in interventions)

    tracer = Tracer(
        SourceMap(filename, code_text),
        anchor=lambda code: code.co_filename == filename,
        namespace=ns,
        detail_limit=detail_limit,
        interventions=interventions,
        earlier=earlier,
    )
    error: Optional[BaseException] = None
    out = io.StringIO()
    previous_bind = ns.get(BIND_NAME, _MISSING)  # an outer run's helper (or a user's value) comes back
    # Saved before anything changes and put back in `finally`, not by context
    # managers: an interrupt landing inside `torch.no_grad().__enter__` (after
    # it disabled grad) would skip its `__exit__` and leave grad mode off.
    grad_before, streams_before = torch.is_grad_enabled(), (sys.stdout, sys.stderr)
    ns[BIND_NAME] = tracer.bind
    try:
        tracer.start()  # inside the try: an interrupt while starting still unbinds the helper
        if no_grad:
            set_grad_enabled(False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_warnings_at_user_lines())
            if capture:
                stack.enter_context(contextlib.redirect_stdout(out))
                stack.enter_context(contextlib.redirect_stderr(out))
                _capture_warnings(stack, out)
            for code in codes:
                exec(code, ns)
    except BaseException as exc:
        error = exc
    finally:
        try:
            try:
                trace = tracer.stop()
            except BaseException:
                tracer.stop()  # an interrupt landed inside stop(): finish the clean-up, then raise
                raise
        finally:  # even when an interrupt lands inside stop()
            if no_grad:
                set_grad_enabled(grad_before)
            if capture:
                sys.stdout, sys.stderr = streams_before
            if previous_bind is _MISSING:
                ns.pop(BIND_NAME, None)
            else:
                ns[BIND_NAME] = previous_bind
    trace.first_line = 1
    trace.grad_mode = "no_grad" if no_grad else "enabled"
    trace.grad_off_at_start = not grad_before
    if error is not None:
        trace.error = describe_error(error, filename, trace)
    if earlier is not None and not interventions:
        try:
            earlier.remember(tracer.cell_records(cell_number(shell)))
        except Exception:  # bookkeeping for later cells must never fail this one
            pass
    return CellRun(trace=trace, error=error, filename=filename, stdout=out.getvalue())


def _transform_cell(shell, body: str) -> str:
    """IPython's transform of the cell's text, without transformers that would wrap it in
    `%%autograd` again (`%autograd on`): this text is already the traced cell's body."""
    cleanup = shell.input_transformers_cleanup
    saved = list(cleanup)
    cleanup[:] = [t for t in saved if not getattr(t, "wraps_in_autograd", False)]
    try:
        return shell.transform_cell(body)
    finally:
        cleanup[:] = saved


@contextlib.contextmanager
def _warnings_at_user_lines():
    """A warning torch raises while our mode handles the op is located at the
    user's line, as in a plain run, not at the mode's own line."""
    from ..capture import tracer as _tracer

    _tracer.__dict__.pop("__warningregistry__", None)  # "once per location" starts afresh per cell
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if filename.startswith(_OURS):
            f = sys._getframe(1)
            while f is not None and (
                f.f_code.co_filename.startswith(_OURS) or f.f_code.co_filename.endswith(("warnings.py", _TORCH_DISPATCH))
            ):
                f = f.f_back
            if f is not None:
                filename, lineno, line = f.f_code.co_filename, f.f_lineno, None
        return original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = original


def _capture_warnings(stack: contextlib.ExitStack, out: io.StringIO) -> None:
    """Warnings go to `out` too, whoever installed `showwarning` (a test's recorder, a logging hook)."""
    stack.enter_context(warnings.catch_warnings())  # also forgets the run's "once" bookkeeping after

    def show(message, category, filename, lineno, file=None, line=None):
        out.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def cell_frames(tb: Optional[TracebackType], filename: str) -> Optional[TracebackType]:
    """The traceback from the first frame of the cell on."""
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return tb


def describe_error(error: BaseException, filename: str, trace: Trace) -> TraceError:
    line = None
    tb = cell_frames(error.__traceback__, filename)
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    try:
        message = str(error)
    except Exception:  # an exception class whose __str__ fails must still fail the cell as itself
        message = f"<{type(error).__name__}: str() failed>"
    if isinstance(error, SyntaxError):
        line = error.lineno
    return TraceError(type=type(error).__name__, message=message, line=line, expr=trace.source_line(line).strip() or None)


_OURS = PACKAGE_DIR
_TORCH_DISPATCH = os.path.join("torch", "overrides.py")


def _plain_frames(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """The traceback a plain run shows: without our frames and torch's mode dispatch.

    With a mode active, `Tensor.backward` appears twice (once routing to the
    mode, once running); the routing entry is dropped.
    """
    entries = []
    routing: set[int] = set()  # entries whose callee was torch's dispatch into the mode
    while tb is not None:
        fn = tb.tb_frame.f_code.co_filename
        if not (fn.startswith(_OURS) or fn.endswith(_TORCH_DISPATCH)):
            nxt = tb.tb_next
            if nxt is not None and nxt.tb_frame.f_code.co_filename.endswith(_TORCH_DISPATCH):
                routing.add(len(entries))
            entries.append(tb)
        tb = tb.tb_next
    # The routing call and the real one are two frames of the same function.
    kept = [
        e
        for i, e in enumerate(entries)
        if not (i in routing and i + 1 < len(entries) and entries[i + 1].tb_frame.f_code is e.tb_frame.f_code)
    ]
    new = None
    for e in reversed(kept):
        new = TracebackType(new, e.tb_frame, e.tb_lasti, e.tb_lineno)
    return new


def trim_traceback(shell, error: BaseException, filename: str) -> None:
    """Make the error render as if the cell had raised it with no magic around it."""
    tb = _plain_frames(cell_frames(error.__traceback__, filename))
    if tb is None or isinstance(error, SyntaxError):
        return
    try:
        stb = shell.InteractiveTB.structured_traceback(type(error), error, tb, tb_offset=0)
    except Exception:
        return
    try:
        error._render_traceback_ = lambda: stb  # IPython's hook for custom tracebacks
    except (AttributeError, TypeError):
        pass
