"""The package's layering, read from the source with `ast` (nothing of tune_app is imported, except by the last
test, in a subprocess):

    tune_app.errors       imports nothing of tune_app
    tune_app.spec.*       tune_app.errors, tune_app.spec.*; never ray, torch, transformers, peft, optuna, datasets
                          or wandb (validate/show/keys stay instant), but for `datasets` where the data is
                          loaded and split (tune_app.spec.data.load_splits and its Hub reader)
    tune_app.train.*      + tune_app.train.*
    tune_app.bundle.*     + tune_app.bundle.* and tune_app itself (its __version__)
    tune_app.study.*      everything but the command line (tune_app.cli, tune_app.__main__)
    tune_app.cli          anything (so does tune_app.__main__)

and no import cycles between modules. Every import counts, those inside functions too, but not those under
`if TYPE_CHECKING:` (they never run). The checker itself is tested first, on hand-written sources and graphs.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "tune_app"
PACKAGE_DIR = REPO / PACKAGE

HEAVY = ("ray", "torch", "transformers", "peft", "optuna", "datasets", "wandb")
"""What spec must not import: each takes seconds to import (validate/show/keys stay instant)."""
HEAVY_ALLOWED = {("tune_app.spec.data", "load_splits"): {"datasets"}, ("tune_app.spec.data", "_as_frame"): {"datasets"}}
"""(spec module, function) -> the heavy packages that function alone may import: a Hub dataset is read, and the
train/validation split drawn (datasets' seeded train_test_split, as the reference experiment does), with `datasets`,
when a study's data is loaded, never by validate. Nothing else in spec."""

LAYER_ORDER = ("errors", "spec", "train", "bundle", "study")
ALLOWED = {
    "root": set(),  # tune_app/__init__.py runs before any tune_app module: what it imported, spec would import
    "errors": set(),
    "spec": {"errors", "spec"},
    "train": {"errors", "spec", "train"},
    "bundle": {"errors", "spec", "train", "bundle", "root"},
    "study": {"errors", "spec", "train", "bundle", "study", "root"},
    "cli": {"root", "errors", "spec", "train", "bundle", "study", "cli"},
}
"""Layer -> the layers its modules may import."""
RULES = {
    "root": "tune_app/__init__.py may import nothing of tune_app (every import of any tune_app module runs it)",
    "errors": "tune_app.errors may import nothing of tune_app",
    "spec": "tune_app.spec may import only tune_app.errors and tune_app.spec.*",
    "train": "tune_app.train may import only tune_app.errors, tune_app.spec.* and tune_app.train.*",
    "bundle": ("tune_app.bundle may import only tune_app.errors, tune_app.spec.*, tune_app.train.*, "
               "tune_app.bundle.* and tune_app itself"),
    "study": "tune_app.study may import every layer but the command line (tune_app.cli, tune_app.__main__)",
    "cli": "tune_app.cli and tune_app.__main__ may import anything",
}


# --------------------------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Import:
    """One import statement's module, resolved: a tune_app module's dotted name, or another package's."""

    module: str
    line: int
    function: str | None
    """The qualified name of the function (or class body) it is in; None at module level."""


def modules_of(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package: dotted name -> source file (a package is its __init__.py)."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(source: str, module: str, *, is_package: bool, known: set[str] | frozenset[str]) -> list[Import]:
    """Every import in `source` (module `module`), inside functions too, but not under `if TYPE_CHECKING:`.

    `from a.b import c` is module a.b.c when that is a module in `known`, else a.b (c is a name in a.b); relative
    imports are resolved against `module`; importlib.import_module("x") and __import__("x") count as imports.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def add(name: str, node: ast.AST, scope: list[str]) -> None:
        found.append(Import(name, node.lineno, ".".join(scope) or None))

    def base_of(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = package.split(".")
        if node.level - 1 >= len(parts):
            raise ValueError(f"{module}: line {node.lineno}: relative import beyond the top-level package")
        anchor = ".".join(parts[:len(parts) - (node.level - 1)])
        return f"{anchor}.{node.module}" if node.module else anchor

    def visit(node: ast.AST, scope: list[str]) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child, scope)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, scope)
        elif isinstance(node, ast.ImportFrom):
            base = base_of(node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if alias.name != "*" and sub in known else base, node, scope)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            add(node.args[0].value, node, scope)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(ast.parse(source), [])
    return found


def layer_of(module: str) -> str | None:
    if module == PACKAGE:
        return "root"
    if module in (f"{PACKAGE}.cli", f"{PACKAGE}.__main__"):
        return "cli"
    for layer in LAYER_ORDER:
        if module == f"{PACKAGE}.{layer}" or module.startswith(f"{PACKAGE}.{layer}."):
            return layer
    return None


def is_ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def layer_violations(edges: list[tuple[str, str, str]], known: set[str] | frozenset[str]) -> list[str]:
    """Each edge (module, imported tune_app module, where) that breaks the layering: 'module -> imported (where):
    the rule it breaks'."""
    problems = []
    for source, target, where in edges:
        edge = f"{source} -> {target} ({where})"
        mine, theirs = layer_of(source), layer_of(target)
        if mine is None:
            problems.append(f"{edge}: {source} belongs to no layer; add it to tests/test_layers.py's contract")
        elif target not in known:
            problems.append(f"{edge}: {target} is no module of tune_app")
        elif theirs is None or theirs not in ALLOWED[mine]:
            problems.append(f"{edge}: {RULES[mine]}")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (and modules importing themselves): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(set(graph) | {n for targets in graph.values() for n in targets}):
        if node not in index:
            connect(node)
    return sorted(cycles)


def heavy_violations(imports: dict[str, list[Import]]) -> list[str]:
    """Spec modules' imports of HEAVY packages outside HEAVY_ALLOWED's (module, function) pairs."""
    problems = []
    for module, found in sorted(imports.items()):
        if layer_of(module) != "spec":
            continue
        for imp in found:
            top = imp.module.split(".")[0]
            if top in HEAVY and top not in HEAVY_ALLOWED.get((module, imp.function), set()):
                where = f"in {imp.function}()" if imp.function else "at module level"
                problems.append(f"{module} -> {imp.module} (line {imp.line}, {where}): tune_app.spec must not import "
                                f"{top} (only {', '.join(f'{m}.{f}()' for m, f in HEAVY_ALLOWED)} may import "
                                f"torch/transformers)")
    return problems


@functools.cache  # parsed once for the tests below (read-only)
def package_imports() -> tuple[dict[str, list[Import]], frozenset[str]]:
    modules = modules_of()
    known = frozenset(modules)
    return {name: imports_of(path.read_text(), name, is_package=path.name == "__init__.py", known=known)
            for name, path in modules.items()}, known


def edges_of(imports: dict[str, list[Import]]) -> list[tuple[str, str, str]]:
    return [(module, imp.module, f"line {imp.line}" + (f", in {imp.function}()" if imp.function else ""))
            for module, found in sorted(imports.items()) for imp in found if is_ours(imp.module)]


# --------------------------------------------------------------------------------------------- the checker's tests

KNOWN = frozenset({"tune_app", "tune_app.errors", "tune_app.spec", "tune_app.spec.config", "tune_app.spec.space",
                   "tune_app.train", "tune_app.train.model", "tune_app.study", "tune_app.study.runner",
                   "tune_app.cli"})

SAMPLE = '''
from __future__ import annotations
import typing
from typing import TYPE_CHECKING
import tune_app.spec.space
from tune_app.spec import config, CONSTANT
from tune_app import __version__
from . import space as space_mod
from .config import StudyConfig
from .. import errors

if TYPE_CHECKING:
    import torch
    from tune_app.study.runner import run_study
else:
    import yaml

if typing.TYPE_CHECKING:
    import ray

class Holder:
    def method(self):
        import importlib
        importlib.import_module("tune_app.train.model")

def load():
    from tune_app.study import runner
    def inner():
        import transformers.pytorch_utils
'''


def test_imports_of_resolves_submodules_relative_imports_and_skips_type_checking():
    found = imports_of(SAMPLE, "tune_app.spec.data", is_package=False, known=KNOWN)
    got = [(i.module, i.function) for i in found if i.module not in ("__future__", "typing")]
    assert got == [
        ("tune_app.spec.space", None),
        ("tune_app.spec.config", None), ("tune_app.spec", None),  # config is a module, CONSTANT a name
        ("tune_app", None),
        ("tune_app.spec.space", None), ("tune_app.spec.config", None), ("tune_app.errors", None),
        ("yaml", None),  # the else branch of `if TYPE_CHECKING` runs; torch, run_study and ray never do
        ("importlib", "Holder.method"), ("tune_app.train.model", "Holder.method"),
        ("tune_app.study.runner", "load"), ("transformers.pytorch_utils", "load.inner"),
    ]
    # In a package's __init__, `from . import x` is the package's own submodule.
    (imp,) = imports_of("from . import config", "tune_app.spec", is_package=True, known=KNOWN)
    assert imp.module == "tune_app.spec.config"


@pytest.mark.parametrize(("edge", "rule"), [
    (("tune_app.spec.config", "tune_app.study.runner"), "tune_app.spec may import only"),
    (("tune_app.spec.config", "tune_app.train.model"), "tune_app.spec may import only"),
    (("tune_app.spec.config", "tune_app"), "tune_app.spec may import only"),
    (("tune_app.errors", "tune_app.spec"), "tune_app.errors may import nothing"),
    (("tune_app", "tune_app.errors"), "tune_app/__init__.py may import nothing"),
    (("tune_app.train.model", "tune_app.bundle.predict"), "tune_app.train may import only"),
    (("tune_app.train.model", "tune_app.study.runner"), "tune_app.train may import only"),
    (("tune_app.bundle.predict", "tune_app.study.runner"), "tune_app.bundle may import only"),
    (("tune_app.bundle.predict", "tune_app.cli"), "tune_app.bundle may import only"),
    (("tune_app.study.runner", "tune_app.cli"), "tune_app.study may import every layer but the command line"),
    (("tune_app.study.runner", "tune_app.__main__"), "tune_app.study may import every layer but the command line"),
    (("tune_app.study.runner", "tune_app.spec.nothing"), "is no module of tune_app"),
    (("tune_app.helpers", "tune_app.errors"), "belongs to no layer"),
])
def test_layer_rules_reject(edge, rule):
    known = KNOWN | {"tune_app.bundle.predict", "tune_app.__main__", "tune_app.helpers"}
    (problem,) = layer_violations([(*edge, "line 1")], known)
    assert problem.startswith(f"{edge[0]} -> {edge[1]} (line 1): ") and rule in problem


def test_layer_rules_allow_the_contract():
    allowed = [("tune_app.spec.config", "tune_app.errors"), ("tune_app.spec.config", "tune_app.spec.space"),
               ("tune_app.spec.config", "tune_app.spec"), ("tune_app.train.model", "tune_app.spec.config"),
               ("tune_app.train.model", "tune_app.train"), ("tune_app.bundle.predict", "tune_app.train.model"),
               ("tune_app.bundle.predict", "tune_app"), ("tune_app.study.runner", "tune_app.bundle.predict"),
               ("tune_app.study.runner", "tune_app"), ("tune_app.cli", "tune_app.study.runner"),
               ("tune_app.__main__", "tune_app.cli")]
    known = KNOWN | {"tune_app.bundle.predict", "tune_app.__main__"}
    assert layer_violations([(a, b, "line 1") for a, b in allowed], known) == []


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"a"}}, [["a"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "a"}}, [["a", "b"], ["c", "d", "e"]]),
    ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, []),  # a diamond is no cycle
])
def test_import_cycles_finds_strongly_connected_components(graph, expected):
    assert import_cycles(graph) == expected


def test_heavy_imports_in_spec_are_caught_outside_the_allowed_function():
    imports = {
        "tune_app.spec.data": [Import("datasets", 3, "load_splits"), Import("datasets", 4, "_as_frame"),
                               Import("torch", 9, "load_splits"), Import("datasets", 10, "check_source")],
        "tune_app.spec.space": [Import("ray", 1, None), Import("numpy", 2, None)],
        "tune_app.train.model": [Import("torch", 1, None)],  # not spec: free to
    }
    problems = heavy_violations(imports)
    assert [p.split(":")[0] for p in problems] == [
        "tune_app.spec.data -> torch (line 9, in load_splits())",
        "tune_app.spec.data -> datasets (line 10, in check_source())",
        "tune_app.spec.space -> ray (line 1, at module level)",
    ]


# --------------------------------------------------------------------------------------------- tune_app itself


def test_every_module_is_in_a_layer():
    modules = modules_of()
    assert {"tune_app", "tune_app.errors", "tune_app.cli", "tune_app.spec.config"} <= set(modules)
    assert [m for m in modules if layer_of(m) is None] == []


def test_imports_follow_the_layers():
    imports, known = package_imports()
    problems = layer_violations(edges_of(imports), known)
    assert not problems, "imports that break the layering:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    imports, _ = package_imports()
    graph = {module: {imp.module for imp in found if is_ours(imp.module)} for module, found in imports.items()}
    cycles = import_cycles(graph)
    detail = [f"{', '.join(cycle)}: " + "; ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & set(cycle)))
              for cycle in cycles]
    assert not cycles, "import cycles (modules: their imports inside the cycle):\n  " + "\n  ".join(detail)


def test_spec_imports_no_heavy_package():
    imports, _ = package_imports()
    problems = heavy_violations(imports)
    assert not problems, "tune_app.spec imports heavy packages:\n  " + "\n  ".join(problems)
    # The allow-list is exact: the allowed function exists and still imports what it is allowed to.
    for (module, function), allowed in HEAVY_ALLOWED.items():
        used = {imp.module.split(".")[0] for imp in imports[module] if imp.function == function}
        assert used & set(HEAVY) == allowed, (module, function, used)


def test_cli_and_spec_import_no_heavy_package():
    """Importing the command line and every spec module, and printing `keys`, loads none of the heavy packages."""
    spec = sorted(m for m in modules_of() if layer_of(m) == "spec")
    code = (f"import contextlib, importlib, io, json, sys\n"
            f"for name in {['tune_app.cli', *spec]!r}:\n"
            f"    importlib.import_module(name)\n"
            f"from tune_app import cli\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert cli.main(['keys']) == 0\n"
            f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [], "imported by tune_app.cli / tune_app.spec.*"
    assert len(spec) > 5 and "tune_app.spec.families" in spec
