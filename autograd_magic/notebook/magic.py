"""`%%autograd`: option parsing, then one call (`cell.trace_cell`)."""

from __future__ import annotations

import argparse
import keyword
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, Integer

from ..capture.tracer import purge_stale_modes
from ..render.layout import warm
from ..run.execute import parse_cell
from ..variants.interventions import Toggles
from .. import limits
from . import auto_trace
from .cell import CellOptions, trace_cell


_SWITCH_USAGE = "usage: %autograd on [OPTIONS] | %autograd off | %autograd"


@magics_class
class AutogradMagics(Magics):
    """Per-user defaults: `%config AutogradMagics.detail_limit = 5` etc."""

    detail_limit = Integer(3, help="Loop iterations of one expression kept in full detail.").tag(config=True)
    layout_timeout = Float(5.0, help="Seconds Graphviz may spend laying out a graph.").tag(config=True)
    static = Bool(False, help="Show the static HTML snapshot instead of the widget.").tag(config=True)
    snapshot_mb = Integer(
        limits.NOTEBOOK_SNAPSHOT_BYTES // 2**20,
        help="MB the notebook's traced cells may keep in copies for the toggles and the gradient check (one budget for all cells).",
    ).tag(config=True)

    @magic_arguments()
    @argument("-o", "--output", metavar="NAME", help="Store the Trace in the variable NAME.")
    @argument("--no-grad", action="store_true", help="Run the cell under torch.no_grad() (a variant; the namespace is untouched).")
    @argument(
        "--detach",
        nargs="+",
        default=[],
        metavar="EXPR_OR_NAME",
        help="Detach the tensor bound to NAME, or made by the expression EXPR (quote it), in a variant run.",
    )
    @argument("--no-graph", action="store_true", help="Do not draw the autograd graph.")
    @argument("--static", action="store_true", help="Show the static snapshot only, no widget.")
    @argument("--text", action="store_true", help="Show the plain-text table only.")
    @argument("--check", action="store_true", help="Check every leaf's gradient by finite differences.")
    @argument("--quiet", action="store_true", help="Show nothing; with -o, just store the Trace.")
    @argument(
        "--copy-device",
        action="store_true",
        help="Let the toggles and the gradient check copy tensors on a GPU (or another device); without it they never do.",
    )
    @argument("--limit", type=int, default=None, metavar="N", help="Loop iterations of one expression kept in detail.")
    @argument("--auto", action="store_true", help=argparse.SUPPRESS)  # written by `%autograd on`, never by a user
    @line_cell_magic
    def autograd(self, line: str, cell: Optional[str] = None):
        """Run the cell as usual, recording every tensor op; then show the trace.

        As a line magic, `%autograd on [OPTIONS]` traces every cell that follows
        (plain cells too, with OPTIONS as if written on each), `%autograd off`
        stops, `%autograd` says which is in force.

        The cell's prints, its displayed last expression, its variables and its
        errors are exactly those of a plain run. Afterwards a view shows each
        intermediate tensor's value, grad_fn, requires_grad and gradient, with
        toggles to re-run the cell under no_grad or with tensors detached.
        `--no-grad` and `--detach` show such a variant right away; the real
        run is always the plain one.

        A re-run (a toggle, the gradient check) runs the cell's Python code
        again in a sandbox, from copies of what it reads, so a file it writes
        is written again; its shell commands (`!cmd`) and magics never run
        again. The copies share one budget for the notebook
        (`%config AutogradMagics.snapshot_mb = 64`); what does not fit is
        checked by version counter instead, and when the real run changed it
        in place the view says so and the toggles are off. Tensors on a GPU
        are never copied unless the cell says `--copy-device`.

        Examples::

            %%autograd
            y = 2*x**4 + x**3
            y.backward()

            %%autograd -o t --detach y
            ...
        """
        __tracebackhide__ = True
        if cell is None:
            return self._switch(line)
        args = self._parse(line)
        mode = "quiet" if args.quiet else "text" if args.text else "static" if (args.static or self.static) else "widget"
        options = CellOptions(
            output=args.output,
            toggles=Toggles(no_grad=args.no_grad, detach_names=tuple(_unquoted(d) for d in args.detach)),
            check=args.check,
            mode=mode,
            graph=not args.no_graph,
            detail_limit=args.limit or self.detail_limit,
            layout_timeout=self.layout_timeout,
            auto=args.auto,
            copy_device=args.copy_device,
            snapshot_bytes=max(0, self.snapshot_mb) * 2**20,
        )
        trace_cell(self.shell, cell, options)

    def _parse(self, line: str):
        """The cell's options, checked as a whole before the cell runs; a UsageError with the usage otherwise."""
        usage = self.autograd.parser.format_usage()
        try:
            args = parse_argstring(self.autograd, line)
        except UsageError as exc:  # argparse's message alone doesn't say what is allowed
            raise UsageError(f"{exc}\n{usage}") from None
        if args.limit is not None and args.limit < 1:
            raise UsageError("--limit takes a whole number of 1 or more\n" + usage)
        if args.output is not None and (not args.output.isidentifier() or keyword.iskeyword(args.output)):
            raise UsageError(f"-o takes a variable name, not {args.output!r}\n" + usage)  # before the cell runs
        empty = [d for d in args.detach if not _unquoted(d).strip()]
        if empty:
            raise UsageError(f"--detach takes a name or an expression of the cell, not {empty[0]!r}\n" + usage)
        return args

    def _switch(self, line: str) -> None:
        word, _, options = line.strip().partition(" ")
        if word == "on":
            try:  # the options are checked now, as every cell will check them, not on the next cell
                self._parse(options)
            except UsageError as exc:
                raise UsageError(f"{exc}\n{_SWITCH_USAGE}, OPTIONS as for a cell") from None
            auto_trace.turn_on(self.shell, options.strip())
            print("%autograd on: every cell from now on is traced" + (f" with {options.strip()}" if options.strip() else ""))
        elif word == "off":
            auto_trace.turn_off(self.shell)
            print("%autograd off: cells run plain again (%%autograd still traces a cell)")
        elif word == "":
            print("%autograd is " + ("on" if auto_trace.is_on(self.shell) else "off"))
        else:
            raise UsageError(_SWITCH_USAGE)


def _unquoted(text: str) -> str:
    """`"3*x + 2"` as written on the magic's line, without its quotes: IPython splits the line
    keeping them (`--detach "3*x + 2"` and `--detach '3*x + 2'` both name the expression `3*x + 2`)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


class SyntaxCheck:
    """An input transformer: a `%%autograd` cell whose body does not parse fails before it runs, as a plain cell does.

    IPython parses a plain cell before running it and shows a SyntaxError
    with no frames (the cell's `error_before_exec`). A cell magic's body is
    only parsed when the magic runs, so its SyntaxError would come out of
    running code, with IPython's and our frames above it. This transformer
    parses the body the way the magic will (`parse_cell`, same line numbers,
    same `Cell In[n]`) while IPython transforms the cell, so the error takes
    the plain cell's path. Anything else it leaves to the magic.
    """

    has_side_effects = True  # not run by check_complete (the terminal's "is this cell finished?")

    def __init__(self, shell):
        self.shell = shell

    def __call__(self, lines: list[str]) -> list[str]:
        if not lines or lines[0].split(None, 1)[:1] != ["%%autograd"]:
            return lines
        try:
            # before run_cell takes the cell's number, the shell's counter is that number
            first_line = 1 if "--auto" in lines[0].split() else 2  # `%autograd on` wrote the first line
            parse_cell(self.shell, "".join(lines[1:]), first_line=first_line, number=self.shell.execution_count)
        except SyntaxError:
            raise
        except Exception:  # e.g. a transform of the body failed: the magic reports it as it runs
            pass
        return lines


def _remove_syntax_check(ipython) -> None:
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None:
        cleanup[:] = [t for t in cleanup if not isinstance(t, SyntaxCheck)]


def load_ipython_extension(ipython) -> None:
    ipython.register_magics(AutogradMagics)
    _remove_syntax_check(ipython)
    if getattr(ipython, "input_transformers_cleanup", None) is not None:
        ipython.input_transformers_cleanup.append(SyntaxCheck(ipython))
    _unregister_purge(ipython)
    for event in _PURGE_EVENTS:
        ipython.events.register(event, _purge_around_cell)
    try:
        warm()  # the Graphviz worker starts now, not on the first drawing
    except Exception:
        pass


def unload_ipython_extension(ipython) -> None:
    _remove_syntax_check(ipython)
    _unregister_purge(ipython)
    auto_trace.turn_off(ipython)


_PURGE_EVENTS = ("pre_run_cell", "post_run_cell")


def _purge_around_cell(*args) -> None:
    """Before and after every cell, plain ones too: a traced run's mode never
    outlives it (see `purge_stale_modes`), so the next cell runs at plain speed."""
    try:
        purge_stale_modes()
    except Exception:
        pass


def _unregister_purge(ipython) -> None:
    for event in _PURGE_EVENTS:
        try:
            ipython.events.unregister(event, _purge_around_cell)
        except ValueError:  # not registered
            pass
