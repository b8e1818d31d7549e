"""The code's shape: no import cycle, no private name imported across packages, no long function.

These hold the floor the marker modules stand on: a cycle hidden inside functions, a private
helper reached into from another package, or a function of several screens is how a second way
of doing something starts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Package roots: `src/smoulder` is `smoulder`; `pipelines` installs as `smoulder.pipelines`.
PACKAGES = {ROOT / "src" / "smoulder": "smoulder", ROOT / "pipelines": "smoulder.pipelines"}
#: The longest function allowed in the library and the workflows, in lines (docstring included).
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, Path]:
    """Return ``{dotted module name: file}`` of every module of the library and workflows."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, str]]:
    """Return ``(module, imported name)`` of every import in ``path``, in functions too."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found += [(module, alias.name) for alias in node.names]
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Return ``{module: modules of the project it imports}``."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for module, imported in _imports(name, path):
            for target in (module, f"{module}.{imported}"):
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert _cycles(_graph(_modules())) == []


def _package_of(module: str) -> str:
    """Return the first-level package of a smoulder module (``smoulder.registration``)."""
    parts = module.split(".")
    return ".".join(parts[:3] if parts[1] == "pipelines" else parts[:2])


def test_no_private_name_imported_across_packages() -> None:
    modules = _modules()
    reached_into = [
        f"{name} imports {imported} from {module}"
        for name, path in modules.items()
        for module, imported in _imports(name, path)
        if module.startswith("smoulder")
        and imported.startswith("_")
        and not imported.startswith("__")
        and _package_of(module) != _package_of(name)
    ]
    assert reached_into == []


@pytest.mark.parametrize("folder", sorted(PACKAGES, key=str), ids=lambda p: p.name)
def test_no_function_longer_than_the_limit(folder: Path) -> None:
    long = []
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_every_package_is_installed() -> None:
    # a folder missing from pyproject's list works in an editable install and is absent from a
    # wheel (the container's install): every folder holding a file, code or data, is listed
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                found.add(".".join((package, *path.parent.relative_to(ROOT / folder).parts)))
    assert found - set(setuptools["packages"]) == set()
