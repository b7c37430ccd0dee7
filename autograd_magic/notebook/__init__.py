"""IPython: the `%%autograd` magic, the per-cell controller (CellSession), the display and the widget.
"""
