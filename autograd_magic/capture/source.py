"""Where an op came from: source spans of running frames, and name binding.

`SourceMap` turns a frame's current instruction into the exact text of the
sub-expression it evaluates (`x**4`, `2*x**4`, ...) using `co_positions()`,
cached per code object. `bind_names` rewrites `name = expr` so the tracer
learns which record a name was bound to, without changing what runs.
"""

from __future__ import annotations

import ast
import linecache
from types import CodeType, FrameType
from typing import Optional

BIND_NAME = "__autograd_magic_bind__"


# filename -> (linecache's list, its lines without newlines, them joined, span -> text):
# `with trace()` reads its file once, not at each run (linecache hands back the same list
# until the file changes, and the entry keeps that list alive, so its id is not reused)
_FILES: dict[str, tuple] = {}
# id(code) -> (code, its positions): shared by every map (the code is kept, so no id is reused)
_POSITIONS: dict[int, tuple[CodeType, list]] = {}
_CACHED_MAX = 512


def _file_lines(filename: str) -> tuple:
    raw = linecache.getlines(filename)
    hit = _FILES.get(filename)
    if hit is not None and hit[0] is raw:
        return hit
    lines = [l.rstrip("\n") for l in raw]
    hit = (raw, lines, "\n".join(lines), {})
    if len(_FILES) >= _CACHED_MAX:
        _FILES.clear()
    _FILES[filename] = hit
    return hit


class SourceMap:
    """Source text and spans for the code objects of one traced region."""

    def __init__(self, filename: str, source: Optional[str] = None):
        self.filename = filename
        if source is None:
            _, self.lines, self.source, self._text = _file_lines(filename)
        else:
            self.lines = source.split("\n")
            self.source = source
            self._text: dict[tuple, Optional[str]] = {}
        # Keyed by id(code): hashing a code object hashes its bytecode and
        # constants (~0.6 us), and this runs for every op. The code is kept
        # in the value, so its id cannot be reused while the map lives.
        self._positions: dict[int, tuple[CodeType, list]] = _POSITIONS

    def span(self, frame: FrameType) -> Optional[tuple[int, int, int, int]]:
        code = frame.f_code
        entry = self._positions.get(id(code))
        if entry is None:
            if len(self._positions) >= _CACHED_MAX:
                self._positions.clear()
            entry = self._positions[id(code)] = (code, list(code.co_positions()))
        positions = entry[1]
        i = frame.f_lasti // 2
        if not 0 <= i < len(positions):
            return None
        line, end_line, col, end_col = positions[i]
        if line is None:
            return None
        return (line, col or 0, end_line or line, end_col if end_col is not None else 0)

    def text(self, span: Optional[tuple[int, int, int, int]]) -> Optional[str]:
        if span is None:
            return None
        cached = self._text.get(span, False)
        if cached is not False:
            return cached
        line, col, end_line, end_col = span
        if not 1 <= line <= len(self.lines):
            text = None
        elif line == end_line:
            text = self.lines[line - 1].encode()[col:end_col].decode(errors="replace")
        else:
            first = self.lines[line - 1].encode()[col:].decode(errors="replace")
            middle = self.lines[line : end_line - 1]
            last = self.lines[end_line - 1].encode()[:end_col].decode(errors="replace") if end_line <= len(self.lines) else ""
            text = "\n".join([first, *middle, last])
        self._text[span] = text
        return text


def _target_names(target: ast.expr) -> Optional[list[Optional[str]]]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        names: list[Optional[str]] = []
        for elt in target.elts:
            if isinstance(elt, ast.Starred):
                return None
            names.append(elt.id if isinstance(elt, ast.Name) else None)
        return names
    return None


class _Binder(ast.NodeTransformer):
    """`a = expr` -> `a = __bind__(('a',), expr)`; function bodies are left alone."""

    def visit(self, node: ast.AST) -> ast.AST:
        # Expressions hold no statements to bind; not walking them keeps a
        # deeply nested expression (`x + x + ... + x`) from hitting the
        # recursion limit where a plain run compiles fine.
        if isinstance(node, ast.expr):
            return node
        return super().visit(node)

    def _wrap(self, names: list[Optional[str]], value: ast.expr) -> ast.expr:
        # The call spans exactly what the value spans, so tracebacks still
        # point at the user's own expression (located node by node: the
        # recursive ast.fix_missing_locations would walk the whole value).
        def at(node):
            return ast.copy_location(node, value)

        names_tuple = at(ast.Tuple(elts=[at(ast.Constant(n)) for n in names], ctx=ast.Load()))
        return at(ast.Call(func=at(ast.Name(id=BIND_NAME, ctx=ast.Load())), args=[names_tuple, value], keywords=[]))

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        self.generic_visit(node)
        if len(node.targets) == 1:
            names = _target_names(node.targets[0])
            if names and any(names):
                node.value = self._wrap(names, node.value)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        self.generic_visit(node)
        if node.value is not None and isinstance(node.target, ast.Name):
            node.value = self._wrap([node.target.id], node.value)
        return node

    # Names inside functions, lambdas and classes are locals of later calls:
    # binding them would need the helper to outlive the cell.
    def visit_FunctionDef(self, node):
        return node

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_ClassDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef


def bind_names(tree: ast.Module) -> ast.Module:
    return _Binder().visit(tree)
