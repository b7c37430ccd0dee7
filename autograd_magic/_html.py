"""Placeholder static HTML (replaced by the full snapshot renderer)."""
from __future__ import annotations
import html as _html
from ._records import Trace


def render_html(trace: Trace, variant=None) -> str:
    return "<pre>" + _html.escape(str(variant or trace)) + "</pre>"
