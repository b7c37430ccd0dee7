"""The interactive view: an anywidget whose front end is `_widget.js`.

Traffic is deliberately narrow. The page sends record ids and toggle states
(`selected`, `detach_ids`, `flip_ids`, `no_grad`, `step`, `request_check`);
Python re-runs the cell in the sandbox when a toggle changes and answers with
`payload` (the table, from `_payload`), `detail` (the selected row) and
`graph_svg`. Nothing the page sends is evaluated. Every callback catches its
own errors and shows them in `status`: the view never dies with a traceback.

The object also publishes the static HTML snapshot and the text table in the
same mimebundle, so a notebook saved with it reads well where widgets don't
render (GitHub, nbviewer, nbconvert, a reloaded page without the kernel).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional

import anywidget
import traitlets as t

from ._payload import build_detail, build_payload
from ._records import Trace

_HERE = Path(__file__).parent


def _asset(name: str) -> str:
    path = _HERE / name
    return path.read_text(encoding="utf-8") if path.exists() else ""


class AutogradView(anywidget.AnyWidget):
    """One traced cell, its variant under the current toggles, and the views of both."""

    _esm = _asset("_widget.js")
    _css = _asset("_widget.css")

    # Python -> page
    payload = t.Dict().tag(sync=True)
    detail = t.Dict().tag(sync=True)
    graph_svg = t.Unicode("").tag(sync=True)
    status = t.Unicode("").tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
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
        trace: Trace,
        variant: Optional[Trace] = None,
        shell: Any = None,
        source: Optional[str] = None,
        snapshot: Any = None,
        graph: bool = True,
        detail_limit: int = 3,
        layout_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._trace = trace
        self._variant = variant
        self._shell = shell
        self._source = source if source is not None else trace.source
        self._snapshot = snapshot
        self._graph_on = graph
        self._detail_limit = detail_limit
        self._layout_timeout = layout_timeout
        self._set_initial_toggles(variant)
        self._refresh()
        self.observe(self._on_toggle, names=["no_grad", "detach_ids", "flip_ids"])
        self.observe(self._on_select, names=["selected"])
        self.observe(self._on_check, names=["request_check"])

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
    def can_rerun(self) -> bool:
        return self._shell is not None and self._snapshot is not None

    def _set_initial_toggles(self, variant: Optional[Trace]) -> None:
        """Reflect a variant the magic already made (`--no-grad`, `--detach`) in the toggles."""
        if variant is None:
            return
        from ._payload import _match

        to_original = _match(self._trace, variant)
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

    def _rerun(self) -> None:
        detach = self._valid_ids(self.detach_ids)
        flip = self._valid_ids(self.flip_ids, leaves_only=True)
        if not (self.no_grad or detach or flip):
            self._variant = None
        elif not self.can_rerun:
            raise RuntimeError("this view has no kernel state to re-run the cell with")
        else:
            self.busy = True
            from ._sandbox import run_variant

            self._variant = run_variant(
                self._shell,
                self._source,
                self._trace,
                self._snapshot,
                no_grad=self.no_grad,
                detach_records=detach,
                flip_requires_grad=flip,
                detail_limit=self._detail_limit,
            )
        self._refresh()

    def _refresh(self) -> None:
        shown = self.shown
        original = self._trace if self._variant is not None else None
        payload = build_payload(shown, original, can_rerun=self.can_rerun)
        payload["gradcheck"] = _gradcheck_lines(self._trace.gradcheck)
        with self.hold_sync():
            self.payload = payload
            self.graph_svg = self._graph()
            if not 0 <= self.selected < len(shown.records):
                self.selected = -1
            self.detail = build_detail(shown, self.selected, original) if self.selected >= 0 else {}
            if self.step >= 0:
                self.step = -1

    def _graph(self) -> str:
        if not self._graph_on:
            return ""
        try:
            from ._dot import render_dot
            from ._layout import svg_or_fallback_html

            dot = render_dot(self._trace, variant=self._variant)
            return svg_or_fallback_html(dot, self._layout_timeout)
        except Exception as e:  # a graph that can't be drawn must not hide the table
            return f"<p>The graph could not be drawn: {html.escape(type(e).__name__ + ': ' + str(e))}</p>"

    def _gradcheck(self) -> None:
        if not self.can_rerun:
            raise RuntimeError("this view has no kernel state to re-run the cell with")
        self.busy = True
        from ._gradcheck import gradcheck_cell

        self._trace.gradcheck = gradcheck_cell(self._shell, self._source, self._trace, self._snapshot)
        payload = dict(self.payload)
        payload["gradcheck"] = _gradcheck_lines(self._trace.gradcheck)
        self.payload = payload
        self.status = ""

    # ---- one mimebundle: widget, static snapshot, text -------------------------------------
    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs: Any):
        shown = super()._repr_mimebundle_(**kwargs)
        data, meta = shown if isinstance(shown, tuple) else (shown or {}, {})
        data = dict(data)
        data["text/plain"] = str(self.shown)
        try:
            from ._display import snapshot_html

            data["text/html"] = snapshot_html(
                self._trace, variant=self._variant, graph=self._graph_on, timeout=self._layout_timeout
            )
        except Exception as e:  # the widget still shows; the snapshot says why it is missing
            data["text/html"] = f"<pre>{html.escape(str(self.shown))}</pre><!-- {html.escape(type(e).__name__)} -->"
        if include:
            data = {k: v for k, v in data.items() if k in include}
        if exclude:
            data = {k: v for k, v in data.items() if k not in exclude}
        return data, meta


def _gradcheck_lines(result: Any) -> Optional[list[str]]:
    """The gradient check's verdicts as lines of text."""
    if result is None:
        return None
    items = result if isinstance(result, (list, tuple)) else [result]
    if not items:
        return ["Nothing to check: no backward pass reached a leaf that requires grad."]
    return [_verdict(item)[:400] for item in items[:200]]


def _verdict(item: Any) -> str:
    ok = getattr(item, "ok", "?")
    if ok == "?":
        return str(item)
    word = {True: "ok", False: "MISMATCH", None: "not checked"}.get(ok, str(ok))
    text = f"{getattr(item, 'name', '?')}: {word}"
    if getattr(item, "max_abs_err", None) is not None:
        text += f" (max abs error {item.max_abs_err:.2e}, rel {item.max_rel_err:.2e}, {item.elements_checked} elements)"
    if getattr(item, "note", ""):
        text += f" — {item.note}"
    return text


def make_view(
    trace: Trace,
    variant: Optional[Trace] = None,
    shell: Any = None,
    source: Optional[str] = None,
    snapshot: Any = None,
    graph: bool = True,
    detail_limit: int = 3,
    layout_timeout: float = 5.0,
) -> "AutogradView | StaticView":
    """The widget for one traced cell (what `%%autograd` displays).

    If the widget cannot be built, the static snapshot is shown instead, with
    the reason: a view must never turn a working cell into a traceback.
    """
    try:
        return _build(trace, variant, shell, source, snapshot, graph, detail_limit, layout_timeout)
    except Exception as e:
        return StaticView(trace, variant, f"The interactive view failed ({type(e).__name__}: {e}); showing the snapshot.")


class StaticView:
    """The snapshot and the text table in one mimebundle, with a note on why there is no widget."""

    def __init__(self, trace: Trace, variant: Optional[Trace], note: str = "") -> None:
        self.trace, self.variant, self.note = trace, variant, note

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs: Any) -> dict:
        from ._display import mimebundle

        data = mimebundle(self.trace, include=include, exclude=exclude, variant=self.variant)
        if self.note and "text/html" in data:
            data["text/html"] = f"<p><em>{html.escape(self.note)}</em></p>" + data["text/html"]
        return data


def _build(trace, variant, shell, source, snapshot, graph, detail_limit, layout_timeout) -> AutogradView:
    return AutogradView(
        trace,
        variant=variant,
        shell=shell,
        source=source,
        snapshot=snapshot,
        graph=graph,
        detail_limit=detail_limit,
        layout_timeout=layout_timeout,
    )
