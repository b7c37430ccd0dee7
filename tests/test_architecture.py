"""The package's shape: imports point down the layers, no cycles, the pure layers need no torch.

Layers, bottom to top (a module may import its own layer and those below):
data -> capture -> run -> variants -> explain -> render -> notebook.
`explain` and `render` read only `data`; `limits` and the package's
`__init__` (the public API, which wires views to `Trace`) stand outside.
Lazy imports inside functions count: they make cycles just the same.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


PKG = Path(__file__).resolve().parent.parent / "autograd_magic"
LAYERS = ["data", "capture", "run", "variants", "explain", "render", "notebook"]
PURE = ["data", "explain", "render"]
# what each layer may import besides itself (the pure layers read only data)
ALLOWED = {
    "data": set(),
    "capture": {"data"},
    "run": {"data", "capture"},
    "variants": {"data", "capture", "run"},
    "explain": {"data"},
    "render": {"data", "explain"},
    "notebook": {"data", "capture", "run", "variants", "explain", "render"},
}
SHARED = {"autograd_magic.limits"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules `name` imports anywhere in its body (lazy imports too)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import module` imports the module; `from module import name`, the module
            subs = [f"{mod}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in known] or [mod]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {n: _imports(n, p, known) for n, p in mods.items()}
    # importing a.b.c runs a/__init__ and a/b/__init__: those are edges too, but
    # package __init__ files here hold only docstrings (the top one is exempt)
    return graph


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_layout_has_the_layers():
    for layer in LAYERS:
        assert (PKG / layer / "__init__.py").is_file(), layer
    flat = [p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "limits.py")]
    assert flat == [], f"modules outside the layers: {flat}"


def test_imports_point_down_the_layers():
    wrong = []
    for name, deps in _graph().items():
        mine = _layer(name)
        if mine is None:
            continue
        for dep in deps:
            theirs = _layer(dep)
            if dep in SHARED or theirs == mine:
                continue
            if theirs is None or theirs not in ALLOWED[mine]:
                wrong.append(f"{name} -> {dep}")
    assert wrong == []


def test_no_import_cycles():
    graph = {n: {d for d in deps if d != "autograd_magic"} for n, deps in _graph().items() if n != "autograd_magic"}
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_a_cycle(tmp_path):
    """The cycle test above could pass by seeing no imports at all: show it finds lazy ones."""
    graph = _graph()
    assert "autograd_magic.data.trace" in graph["autograd_magic.run.execute"]
    lazy = [n for n, p in _modules().items() if "    from ." in p.read_text(encoding="utf-8")]
    for name in lazy:
        p = _modules()[name]
        lazy_targets = _imports(name, p, set(_modules()))
        assert lazy_targets, name


def test_pure_layers_import_without_torch():
    """data/, explain/ and render/ load and render a Trace with torch blocked."""
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, pkgutil, sys, types
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, Block())
        # the package's __init__ wires the engine in (it needs torch): stand in for it
        pkg = types.ModuleType("autograd_magic")
        pkg.__path__ = [{str(PKG)!r}]
        sys.modules["autograd_magic"] = pkg
        loaded = []
        for layer in {PURE!r}:
            base = importlib.import_module("autograd_magic." + layer)
            for info in pkgutil.iter_modules(base.__path__):
                loaded.append(importlib.import_module(f"autograd_magic.{{layer}}.{{info.name}}").__name__)
        from autograd_magic.data.trace import Trace, Record, register_views
        from autograd_magic.render.text import render_text
        from autograd_magic.render.html import render_html
        from autograd_magic.render.dot import render_dot
        from autograd_magic.render.payload import build_payload
        t = Trace(source="y = x * 2", records=[Record(id=0, name="y", expr="x * 2", line=1, op="mul")])
        assert "y" in render_text(t) and "<table" in render_html(t) and "digraph" in render_dot(t)
        build_payload(t)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
        print(len(loaded))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 10  # every module of the pure layers was loaded


PRIVATE_TENSOR_ATTRS = {"_version", "_sequence_nr", "_backward_hooks"}


def _private_torch_uses(path: Path) -> list[str]:
    """`torch._x...` attribute chains and private tensor/node attributes read in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "torch" and chain[-1].startswith("_"):
                found.append(f"{path.name}:{node.lineno} torch.{'.'.join(reversed(chain))}")
            elif node.attr in PRIVATE_TENSOR_ATTRS:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch._"):
            found.append(f"{path.name}:{node.lineno} from {node.module}")
    return found


def test_private_torch_calls_live_in_one_module():
    compat = PKG / "capture" / "torch_compat.py"
    outside = [use for p in PKG.rglob("*.py") if p != compat for use in _private_torch_uses(p)]
    assert outside == []
    assert len(_private_torch_uses(compat)) >= 8  # the check sees them where they are
