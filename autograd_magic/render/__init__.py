"""Views of a Trace: text, static HTML, Graphviz DOT and its out-of-process layout, the widget's payload.

Imports no torch.
"""
