"""No import cycles in proxy/ or loadtests/: dependencies point one way.

Parsed with `ast`, not imported, so the test sees every import, including those inside
functions (a lazy import is still a dependency). Only imports under `if TYPE_CHECKING:`
are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path, base: Path, prefix: str) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts]) if prefix else ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit(orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names)  # `from pkg import module`
            visit(child)

    visit(tree)
    return found


def _graph(files: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        colour[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def _files(base: Path, prefix: str) -> dict[str, Path]:
    return {_module_name(p, base, prefix): p for p in base.rglob("*.py")}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_type_checking_imports_are_left_out_and_lazy_ones_counted() -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n"
                     "def f():\n    from .c import Y\n")
    deps = _imports(tree, "pkg.a", False)
    assert "pkg.c" in deps and "pkg.b" not in deps


def test_no_import_cycle_in_the_package() -> None:
    files = _files(ROOT / "proxy", "proxy")
    assert len(files) > 30  # the walk found the package
    assert _cycle(_graph(files)) is None


def test_no_import_cycle_in_loadtests() -> None:
    files = _files(ROOT / "loadtests", "")
    graph = _graph(files)
    assert graph, "no loadtests modules found"
    assert _cycle(graph) is None


def test_no_bench_section_finds_bench_py_at_run_time() -> None:
    """A cycle the import graph cannot see: a section reaching back into the running
    bench.py through sys.modules or importlib (they share loadtests/targets.py instead)."""
    for path in (ROOT / "loadtests").glob("*.py"):
        text = path.read_text()
        assert "sys.modules" not in text and "import_module(" not in text, path.name
