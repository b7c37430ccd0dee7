"""pyproject.toml tells the truth: the Python the code needs, every package it imports, one version."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "autograd_magic"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

# top-level module -> the distribution that provides it
DISTRIBUTIONS = {
    "IPython": "ipython",
    "anywidget": "anywidget",
    "ipywidgets": "ipywidgets",
    "numpy": "numpy",
    "torch": "torch",
    "traitlets": "traitlets",
    "pygraphviz": "pygraphviz",
}


def _declared(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def _top_level_imports() -> dict[str, list[str]]:
    """Every absolute import in the package, top-level name -> where ("file:line")."""
    found: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_requires_python_is_the_311_the_code_needs():
    spec = PROJECT["requires-python"]
    assert spec == ">=3.11", spec
    # what needs it: source positions of each bytecode instruction (new in 3.11)
    assert "co_positions()" in (PKG / "capture" / "source.py").read_text(encoding="utf-8")
    assert sys.version_info >= (3, 11)


def test_every_third_party_import_is_a_declared_dependency():
    declared = _declared(PROJECT["dependencies"])
    third_party = {
        top: where for top, where in _top_level_imports().items()
        if top not in sys.stdlib_module_names and top not in ("autograd_magic", "__future__")
    }
    unknown = {top: where for top, where in third_party.items() if top not in DISTRIBUTIONS}
    assert not unknown, f"imports with no known distribution (add them to DISTRIBUTIONS and pyproject): {unknown}"
    undeclared = {top: where for top, where in third_party.items() if DISTRIBUTIONS[top] not in declared}
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    assert {"torch", "numpy", "IPython", "traitlets"} <= set(third_party)  # the walk sees them


def test_the_installed_torch_is_in_the_declared_range():
    import torch

    (torch_req,) = [r for r in PROJECT["dependencies"] if _declared([r]) == {"torch"}]
    bounds = re.findall(r"(>=|<)\s*([0-9.]+)", torch_req)
    assert bounds, torch_req
    have = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    for op, version in bounds:
        want = tuple(int(x) for x in version.split(".")[:2])
        assert have >= want if op == ">=" else have < want, (torch.__version__, torch_req)


def test_browser_dependencies_have_their_own_extra():
    extras = PROJECT["optional-dependencies"]
    assert _declared(extras["browser"]) >= {"jupyterlab", "notebook", "playwright"}
    assert not _declared(extras["test"]) & _declared(extras["browser"])
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "'.[test,browser]'" in makefile and "'.[test]'" in makefile


def test_one_version_read_statically_from_the_package():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "autograd_magic.__version__"}
    tree = ast.parse((PKG / "__init__.py").read_text(encoding="utf-8"))
    assigned = [
        n.value for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__" for t in n.targets)
    ]
    # a plain string literal: setuptools reads it from the AST, so a build never imports torch
    assert len(assigned) == 1 and isinstance(assigned[0], ast.Constant) and isinstance(assigned[0].value, str)
    import autograd_magic

    assert autograd_magic.__version__ == assigned[0].value


def test_license_file_and_package_data_exist():
    assert PROJECT["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "autograd_magic contributors" in text
    for pattern in PYPROJECT["tool"]["setuptools"]["package-data"]["autograd_magic"]:
        assert list(PKG.glob(pattern)), pattern
