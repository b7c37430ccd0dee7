"""The interactive view: an anywidget whose front end is `widget.js`.

Traffic is deliberately narrow. The page sends record ids and toggle states
(`selected`, `detach_ids`, `flip_ids`, `no_grad`, `step`, `request_check`);
Python re-runs the cell in the sandbox when a toggle changes and answers with
`payload` (the first screen: the table's first rows, each pass with its first
steps) and `detail` (the selected row, built when it is selected). Nothing the
page sends is evaluated. Every callback catches its own errors and shows them
in `status`: the view never dies with a traceback.

What is not on the first screen is not built before the cell returns, and is
not synced state (a saved notebook keeps only the first screen): the page asks
over the comm, with custom messages, and Python answers each the same way —
`{"type": "graph"}` (the graph's SVG: Graphviz runs only once the page wants
it; `graph_svg` holds it, and a new value is pushed to the page),
`{"type": "steps", "pass": i, "start": s}` (more backward steps) and
`{"type": "rows", "start": n}` (more table rows). Each answer carries the
payload's `version`, so the page drops an answer to a question about a table
that a re-run has since replaced.

A traced cell publishes two outputs: this widget (whose own text/plain is
empty) and, next to it, `snapshot()`: the static HTML snapshot and the
text table, marked with this widget's model id. Front ends that cannot draw the
widget (GitHub, nbviewer, nbconvert, a reloaded page whose widget state was not
saved, where Lab only says "model not found") show the snapshot; where the
widget draws, its front end hides the snapshot output next to it.

The explorer's sliders send `{"type": "explore", "values": {"<record id>": x}, "seq": n}`:
Python re-runs the cell with those inputs set (`Toggles.values`, composed with the other
toggles), shows that run, and answers `{"type": "explored", "seq": n, "version": v}` once the
new payload is set; the page keeps at most one such request in flight. Rows whose value or
gradient changed from the run shown before carry `moved` (the page flashes them).

The page also pings (`{"type": "ping", "n": n}` through a custom message) to
learn whether this object still exists in a kernel; it answers with a pong.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional

import anywidget
import traitlets as t

# Paid once when the extension loads, not by the first traced cell (each was ~10-40 ms of
# it): the sandbox's snapshot saves numpy's RNG state (numpy imports numpy.random lazily),
# and a widget's first instance imports `secrets` for its id.
import numpy.random  # noqa: F401
import secrets  # noqa: F401

from ..data.identity import match_records
from ..data.trace import Trace
from ..explain.wording import check_lines
from ..render.dot import render_dot
from ..render.layout import svg_or_fallback_html
from ..render.payload import build_detail, build_payload, build_rows, build_steps
from ..render.snapshot import GraphDots, mimebundle, snapshot_html
from ..variants.interventions import Toggles
from .explorer import Explorer, mark_moved, moved, one_line
from .session import NO_RERUN, CellSession

_HERE = Path(__file__).parent


def _asset(name: str) -> str:
    path = _HERE / name
    return path.read_text(encoding="utf-8") if path.exists() else ""


class AutogradView(anywidget.AnyWidget):
    """One traced cell, its variant under the current toggles, and the views of both."""

    _esm = _asset("widget.js")
    _css = _asset("widget.css")

    # Python -> page
    payload = t.Dict().tag(sync=True)
    detail = t.Dict().tag(sync=True)
    # not synced: made when the page asks for it ({"type": "graph"}), sent as a custom message
    graph_svg = t.Unicode("")
    status = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    snapshot_class = t.Unicode("").tag(sync=True)  # the class marking this view's snapshot output
    # page -> Python: ids and switches only
    selected = t.Int(-1).tag(sync=True)
    detach_ids = t.List(t.Int()).tag(sync=True)
    flip_ids = t.List(t.Int()).tag(sync=True)
    no_grad = t.Bool(False).tag(sync=True)
    step = t.Int(-1).tag(sync=True)
    pass_index = t.Int(0).tag(sync=True)
    request_check = t.Int(0).tag(sync=True)

    def __init__(
        self,
        session: CellSession,
        variant: Optional[Trace] = None,
        graph: bool = True,
        layout_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.snapshot_class = snapshot_marker(self.model_id)
        self._session = session
        self._trace = session.trace
        self._variant = variant
        self._graph_on = graph
        self._layout_timeout = layout_timeout
        self._table_version = 0  # bumped with every run shown; answers to the page carry it
        self._payload_of: Optional[Trace] = None
        self._graph_wanted = False  # the page asked for the graph: new ones are pushed
        self._explorer = Explorer(session, self._trace)  # the sliders' inputs and what they moved
        self._moved: dict[int, list[str]] = {}  # shown record id -> columns changed from the run shown before
        self.snapshot_dots: Optional[GraphDots] = None  # the snapshot graph's DOT, its layout started early (display.show)
        self._set_initial_toggles(variant)
        self._refresh()
        self.observe(self._on_graph, names=["graph_svg"])
        self.observe(self._on_toggle, names=["no_grad", "detach_ids", "flip_ids"])
        self.observe(self._on_select, names=["selected"])
        self.observe(self._on_check, names=["request_check"])
        self.on_msg(self._on_page_msg)
        # the cell runs again: this view's output is replaced, so its model (and its Trace) go
        session.on_replaced(self.close)

    @property
    def session(self) -> CellSession:
        """The cell's controller: re-runs and the gradient check go through it."""
        return self._session

    def close(self) -> None:
        """Closing the view releases the cell's snapshot."""
        self._session.close()
        super().close()

    # ---- what the page may send -------------------------------------------------------------
    def _handle_msg(self, msg: Any) -> None:
        # ipywidgets' own handler shows any error in a message as a traceback in the notebook;
        # a malformed update is the page's fault, not the user's, and is dropped quietly.
        try:
            data = msg["content"]["data"]
            method = data.get("method")
            state = data.get("state") if method == "update" else None
        except Exception:
            return
        if method == "update":
            self.set_state(state)  # no binary buffers: no trait of this view carries one
        else:
            super()._handle_msg(msg)

    def set_state(self, sync_data: Any) -> None:
        """Accept from the page only the ids and switches it may send, each checked; drop the rest.

        A value the traits would refuse (a string for an id, a float, a dict) would otherwise
        raise out of the comm handler into the notebook, and a Python -> page trait set by the
        page (`payload`, `graph_svg`) would be echoed to every other view of this widget.
        """
        if not isinstance(sync_data, dict):
            return
        clean = {name: value for name, value in sync_data.items() if _FROM_PAGE.get(name, _never)(value)}
        if not clean:
            return
        try:
            super().set_state(clean)
        except Exception as e:  # the observers catch their own errors; this is a last guard
            self.status = f"Ignored an update from the page: {type(e).__name__}"

    def _on_page_msg(self, _widget: Any, content: Any, _buffers: Any) -> None:
        """Answer the page's questions: the liveness ping, the graph, more steps, more rows.

        Each field is checked as `set_state` checks a trait; anything else is ignored."""
        try:
            kind = content.get("type") if isinstance(content, dict) else None
            if kind == "ping":
                n = content.get("n")
                self.send({"type": "pong", "n": n if type(n) is int and 0 <= n < _MAX_INT else 0})
            elif kind == "graph":
                self._graph_wanted = True
                self._send_graph(self.graph_svg)  # laid out now, on first read (`_default_graph`)
            elif kind == "steps" and _int_in(0)(content.get("pass")) and _int_in(0)(content.get("start")):
                answer = build_steps(self.shown, content["pass"], content["start"])
                self.send(dict(answer, type="steps", version=self._table_version))
            elif kind == "rows" and _int_in(0)(content.get("start")):
                answer = build_rows(self.shown, self._original, content["start"])
                mark_moved(answer["lines"], self._moved)
                self.send(dict(answer, type="rows", version=self._table_version))
            elif kind == "explore":
                self._on_explore(content)
        except Exception as e:  # a question from the page must never raise into the notebook
            try:
                self.status = f"Could not answer the page: {type(e).__name__}: {e}"
            except Exception:
                pass

    @t.default("graph_svg")
    def _default_graph(self) -> str:
        """The graph is laid out when first read: when the page asks for it, not before."""
        return self._graph()

    def _on_graph(self, change: dict) -> None:
        if self._graph_wanted:
            self._send_graph(change["new"])

    def _send_graph(self, svg: str) -> None:
        self.send({"type": "graph", "svg": svg, "version": self._table_version})

    # ---- what is shown ---------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        """The real run (the user's namespace reflects this one)."""
        return self._trace

    @property
    def variant(self) -> Optional[Trace]:
        """The re-run under the current toggles, or None when every toggle is off."""
        return self._variant

    @property
    def shown(self) -> Trace:
        return self._variant or self._trace

    @property
    def _original(self) -> Optional[Trace]:
        """The real run when a variant is shown (rows are marked against it), else None."""
        return self._trace if self._variant is not None else None

    @property
    def can_rerun(self) -> bool:
        return self._session.can_rerun

    def _set_initial_toggles(self, variant: Optional[Trace]) -> None:
        """Reflect a variant the magic already made (`--no-grad`, `--detach`) in the toggles."""
        if variant is None:
            return
        to_original = {v: o for o, v in match_records(self._trace, variant).items()}
        with self.hold_trait_notifications():
            self.no_grad = variant.grad_mode == "no_grad"
            self.detach_ids = sorted(to_original[r.id] for r in variant.records if r.detached and r.id in to_original)

    # ---- callbacks: each one catches everything and reports it in `status` -----------------
    def _on_toggle(self, change: dict) -> None:
        try:
            self._rerun()
            self.status = ""
        except Exception as e:  # the view must survive any failure of a re-run
            self.status = f"Could not re-run the cell: {type(e).__name__}: {e}"
        finally:
            self.busy = False

    def _on_select(self, change: dict) -> None:
        try:
            self.detail = build_detail(self.shown, self.selected, self._trace if self._variant else None)
        except Exception as e:
            self.detail = {}
            self.status = f"Could not show the details: {type(e).__name__}: {e}"

    def _on_check(self, change: dict) -> None:
        try:
            self._gradcheck()
        except Exception as e:
            self.status = f"Gradient check failed to run: {type(e).__name__}: {e}"
        finally:
            self.busy = False

    # ---- work ------------------------------------------------------------------------------
    def _valid_ids(self, ids: list[int], leaves_only: bool = False) -> tuple[int, ...]:
        """Only ids of records of the real run; anything else from the page is ignored."""
        records = self._trace.records
        ok = [i for i in ids if isinstance(i, int) and 0 <= i < len(records)]
        if leaves_only:
            ok = [i for i in ok if records[i].is_leaf]
        return tuple(sorted(set(ok)))

    def _toggles(self) -> Toggles:
        """Every toggle the page set, and the explorer's inputs where they differ from the cell's."""
        toggles = dict(
            no_grad=self.no_grad,
            detach_ids=self._valid_ids(self.detach_ids),
            flip_ids=self._valid_ids(self.flip_ids, leaves_only=True),
        )
        if self._explorer.values:
            if "values" not in getattr(Toggles, "__dataclass_fields__", {}):
                raise RuntimeError("this version cannot re-run a cell with an input set to another value")
            toggles["values"] = self._explorer.toggles()
        return Toggles(**toggles)

    def _rerun(self, busy: bool = True, graph_now: bool = True) -> None:
        toggles = self._toggles()
        if busy and toggles.any:
            self.busy = True
        self._variant = self._session.rerun(toggles)
        self._refresh(graph_now)

    def _refresh(self, graph_now: bool = True) -> None:
        """Show the run `shown`: a new payload, and the graph pushed if the page shows one.

        A slider step (`graph_now=False`) leaves the graph to be laid out when the page asks
        again, once the slider rests: a Graphviz layout per step would cost more than the step."""
        shown = self.shown
        original = self._original
        if shown is not self._payload_of:  # a new run shown: what the page fetched for the old one is stale
            self._table_version += 1
            self._moved = moved(self._payload_of, shown) if self._payload_of is not None else {}
            self._payload_of = shown
        else:
            self._moved = {}
        payload = build_payload(shown, original, can_rerun=self.can_rerun)
        mark_moved(payload["lines"], self._moved)
        payload["explore"] = self._explorer.payload(self._variant)
        payload["gradcheck"] = check_lines(self._trace.gradcheck)
        payload["version"] = self._table_version
        payload["graph"] = self._graph_on
        with self.hold_sync():
            self.payload = payload
            if self._graph_wanted and graph_now:
                self.graph_svg = self._graph()  # the page shows a graph: the new one is pushed
            else:
                self._trait_values.pop("graph_svg", None)  # laid out again when next asked for
            if not 0 <= self.selected < len(shown.records):
                self.selected = -1
            self.detail = build_detail(shown, self.selected, original) if self.selected >= 0 else {}
            if self.step >= 0:
                self.step = -1

    # ---- the explorer ----------------------------------------------------------------------
    def _on_explore(self, content: dict) -> None:
        """A slider moved: check what the page sent, re-run with it, show that run, then answer."""
        seq = content.get("seq")
        if not _int_in(0)(seq):
            self.status = "Ignored a request from the explorer: it had no sequence number."
            return
        try:
            if not self.can_rerun:  # the sliders are disabled on the page; a stale page may still send
                raise ValueError(self._session.rerun_blocked or NO_RERUN)
            values = self._explorer.check(content.get("values"))
        except ValueError as e:
            self.status = one_line(f"Ignored a request from the explorer: {e}")
            self._answer_explored(seq, ok=False)
            return
        before = self._explorer.values
        self._explorer.values = self._explorer.moved_to(values)
        ok = True
        if self._explorer.values != before:
            try:
                self._rerun(busy=False, graph_now=False)
                self.status = ""
            except Exception as e:  # the view stays on the run it showed, the sliders' values with it
                self._explorer.values = before
                try:
                    self._refresh()  # the controls go back to the values of the run shown
                except Exception:
                    pass
                self.status = one_line(f"Could not re-run the cell with that value: {type(e).__name__}: {e}")
                ok = False
        self._answer_explored(seq, ok=ok)

    def _answer_explored(self, seq: int, ok: bool = True) -> None:
        # graph_stale: the graph shown is of an earlier run; the page asks for it once the slider rests
        stale = self._graph_wanted and "graph_svg" not in self._trait_values
        self.send({"type": "explored", "seq": seq, "version": self._table_version, "ok": ok, "graph_stale": stale})

    def _graph(self) -> str:
        if not self._graph_on:
            return ""
        try:
            dot = render_dot(self._trace, variant=self._variant)
            return svg_or_fallback_html(dot, self._layout_timeout)
        except Exception as e:  # a graph that can't be drawn must not hide the table
            return f"<p>The graph could not be drawn: {html.escape(type(e).__name__ + ': ' + str(e))}</p>"

    def _gradcheck(self) -> None:
        self.busy = True
        self._session.check()
        payload = dict(self.payload)
        payload["gradcheck"] = check_lines(self._trace.gradcheck)
        self.payload = payload  # same version: rows and steps the page fetched still hold
        self.status = ""

    # ---- two outputs: the widget, and the snapshot next to it -----------------------------
    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs: Any):
        """The widget view and an empty text/plain: the snapshot is a separate output (`snapshot()`).

        The text is empty so that front ends without widgets (nbconvert, GitHub) show the
        snapshot once, not a repr of the widget above it.
        """
        shown = super()._repr_mimebundle_(**kwargs)
        data, meta = shown if isinstance(shown, tuple) else (shown or {}, {})
        data = dict(data)
        data["text/plain"] = WIDGET_TEXT
        if include:
            data = {k: v for k, v in data.items() if k in include}
        if exclude:
            data = {k: v for k, v in data.items() if k not in exclude}
        return data, meta

    def snapshot(self) -> "SnapshotOutput":
        """The output published next to the widget: the static snapshot, marked with this model id."""
        text = str(self.shown)  # first: the graph's layout (started early) runs on meanwhile
        try:
            self._explorer.exploration  # asked for now: on the Trace, the snapshot draws the curve too
            dots, self.snapshot_dots = self.snapshot_dots, None
            body = snapshot_html(self._trace, variant=self._variant, graph=self._graph_on, timeout=self._layout_timeout, dots=dots)
        except Exception as e:  # the widget still shows; the snapshot says why it is missing
            body = f"<pre>{html.escape(text)}</pre><!-- {html.escape(type(e).__name__)} -->"
        return SnapshotOutput(body, text, self.model_id)


# What the widget's output says where widgets don't draw (GitHub, nbconvert): nothing; the
# snapshot output below it says it all.
WIDGET_TEXT = ""


def snapshot_marker(model_id: str) -> str:
    """The class that ties a snapshot output to its widget (model ids are hex: safe in a class)."""
    return "agm-snapshot-" + "".join(c for c in str(model_id) if c.isalnum())


# Where the widget's model is missing, Lab and Notebook 7 print "Error displaying widget: model not
# found" in the output above the snapshot and mark that output .jupyter-widgets (a drawn widget's
# output is not marked so: the class is on the view inside it). In a trusted notebook
# this rule hides that line; Lab's sanitizer drops <style> from untrusted output, and GitHub and
# nbconvert have no such element, so elsewhere it does nothing.
HIDE_MISSING_MODEL = (
    "<style>.jp-OutputArea-child:has(> .jp-OutputArea-output.jupyter-widgets)"
    ":has(+ .jp-OutputArea-child .agm-snapshot){display:none}</style>"
)


class SnapshotOutput:
    """The static snapshot as its own output: text/html inside a marked div, and text/plain.

    The marker is a class (Lab's HTML sanitizer keeps `class`, trusted or not): the widget's
    front end looks for `.agm-snapshot-<model id>` around itself and hides that output.
    """

    def __init__(self, body_html: str, text: str, model_id: str = "") -> None:
        self.body_html, self.text, self.model_id = body_html, text, model_id

    @property
    def html(self) -> str:
        marker = f" {snapshot_marker(self.model_id)}" if self.model_id else ""
        return f'<div class="agm-snapshot{marker}">{HIDE_MISSING_MODEL}{self.body_html}</div>'

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs: Any) -> dict:
        data = {"text/html": self.html, "text/plain": self.text}
        if include:
            data = {k: v for k, v in data.items() if k in include}
        if exclude:
            data = {k: v for k, v in data.items() if k not in exclude}
        return data


# Bounds for numbers from the page: JavaScript's exact integers, and far more records than
# a payload can list. Python ints are unbounded, so without them a page could hand the kernel
# a thousand-digit number to sort and compare.
_MAX_INT = 2**53
_MAX_IDS = 1_000_000


def _int_in(low: int, high: int = _MAX_INT):
    return lambda v: type(v) is int and low <= v < high  # not bool, not float: exactly an int


def _id_list(v: Any) -> bool:
    return type(v) is list and len(v) <= _MAX_IDS and all(type(i) is int and 0 <= i < _MAX_INT for i in v)


def _never(v: Any) -> bool:
    return False


# The traits the page sets (`widget.js` calls model.set on these names only), and what each may hold.
_FROM_PAGE = {
    "selected": _int_in(-1),
    "step": _int_in(-1),
    "pass_index": _int_in(0),
    "request_check": _int_in(0),
    "detach_ids": _id_list,
    "flip_ids": _id_list,
    "no_grad": lambda v: type(v) is bool,
}


def make_view(
    session: CellSession,
    variant: Optional[Trace] = None,
    graph: bool = True,
    layout_timeout: float = 5.0,
) -> "AutogradView | StaticView":
    """The widget for one traced cell (what `%%autograd` displays).

    If the widget cannot be built, the static snapshot is shown instead, with
    the reason: a view must never turn a working cell into a traceback.
    """
    try:
        return AutogradView(session, variant=variant, graph=graph, layout_timeout=layout_timeout)
    except Exception as e:
        return StaticView(session.trace, variant, f"The interactive view failed ({type(e).__name__}: {e}); showing the snapshot.")


class StaticView:
    """The snapshot and the text table in one mimebundle, with a note on why there is no widget."""

    def __init__(self, trace: Trace, variant: Optional[Trace], note: str = "") -> None:
        self.trace, self.variant, self.note = trace, variant, note

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs: Any) -> dict:
        data = mimebundle(self.trace, include=include, exclude=exclude, variant=self.variant)
        if self.note and "text/html" in data:
            data["text/html"] = f"<p><em>{html.escape(self.note)}</em></p>" + data["text/html"]
        return data
