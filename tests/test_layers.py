"""The import graph of the package: no circle, and nothing inside imports up to the package root."""

from __future__ import annotations

import ast
from pathlib import Path

import attribindex

PACKAGE = Path(attribindex.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: the attribindex modules it imports}, read with `ast` (imports inside functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("attribindex")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("attribindex"):
                # `from package import submodule` imports the submodule; `from package import name` the package
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
        graph[name] = found & set(modules)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle among modules (package `__init__`s count as the modules they are), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_nothing_inside_the_package_imports_the_package_root():
    offenders = sorted(name for name, targets in _imports().items() if "attribindex" in targets)
    assert offenders == []


def test_the_modules_import_each_other_without_a_circle():
    """Subpackage `__init__`s re-export their private modules, so an edge to a subpackage is an edge to its
    `__init__`, which depends on its modules: a layer importing a layer above it shows up as a circle."""
    assert _cycle(_imports()) is None


def test_the_circle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _imported_by(target: str) -> list[str]:
    """The package's modules that import `target` or anything below it."""
    return sorted(
        name for name, targets in _imports().items() if any(t == target or t.startswith(f"{target}.") for t in targets)
    )


def test_only_the_command_line_imports_the_command_line():
    """The CLI is the outermost layer: the demo, the server and the library render and run without it."""
    outside = [name for name in _imported_by("attribindex.cli") if not name.startswith("attribindex.cli")]
    assert outside == ["attribindex.__main__"]  # `python -m attribindex` is the command line


def test_nothing_in_the_package_imports_the_test_helpers():
    assert _imported_by("attribindex.testing") == []


def test_only_the_store_reads_manifest_keys():
    """The manifest is read and written through the store's typed records; a `manifest["key"]` elsewhere would copy
    its schema by hand (and drift from it)."""
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.parent.name != "store" and 'manifest["' in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_every_module_reads_in_one_sitting():
    """A module over ~550 lines holds more than one concern (STYLE.md); split it where the concerns separate."""
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 560
    }
    assert long == {}
