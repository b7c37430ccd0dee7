"""See and teach PyTorch autograd in notebooks.

    %load_ext autograd_magic

    %%autograd
    y = 2*x**4 + x**3 + 3*x**2 + 5*x + 1
    y.backward()

Outside IPython (or inside a cell), the same engine::

    import autograd_magic as am
    with am.trace() as t:
        ...
    t.records, str(t), t.to_html(), t.to_dot()

Debugging a training cell: `t.nonfinite` (the first op whose output holds a NaN or an
Inf), `t.backward_nonfinite` (per pass, the first node whose gradient does) and
`t.grad_flow()` (per pass, each parameter's gradient norm, vanishing/exploding flagged) and
`t.training()` (every backward call's loss and total gradient norm, those past `--limit` too).
"""

from __future__ import annotations

# First: in a notebook the Graphviz worker starts while the rest of the package imports.
from .render.layout import warm_in_notebook as _warm_in_notebook

_warm_in_notebook()

from .explain.debug import backward_nonfinite, grad_flow, nonfinite_origin, training
from .data.trace import BackwardPass, BackwardStep, Preview, Record, Trace, TraceError, register_views
from .notebook.display import mimebundle, show
from .notebook.magic import AutogradMagics, load_ipython_extension, unload_ipython_extension
from .render.dot import render_dot
from .render.html import render_html
from .render.layout import render_svg
from .render.text import render_text
from .run.api import trace

register_views(text=render_text, html=render_html, dot=render_dot, svg=render_svg, show=show, mimebundle=mimebundle)
register_views(nonfinite=nonfinite_origin, backward_nonfinite=backward_nonfinite, grad_flow=grad_flow, training=training)

__all__ = [
    "trace",
    "Trace",
    "Record",
    "Preview",
    "BackwardPass",
    "BackwardStep",
    "TraceError",
    "AutogradMagics",
    "load_ipython_extension",
    "unload_ipython_extension",
]
__version__ = "0.1.0"
