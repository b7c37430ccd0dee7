"""Executing code under the recorder: a cell as IPython runs it (`execute`), or a block (`am.trace()`).
"""
