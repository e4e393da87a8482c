"""The import graph of the core and of each plugin, read from the code (every import, lazy and type-only ones
too): no circle anywhere, the core never imports a plugin, and a plugin reaches another plugin only through
that plugin's face (its package and ``__all__``), as docs/architecture.md says."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = "erofs_mount_core"


def packages() -> dict[str, Path]:
    """Each top-level package of the project: the core and every bundled plugin."""
    found = {CORE: ROOT / CORE}
    for init in sorted((ROOT / "plugins").glob("*/erofs_mount_*/__init__.py")):
        found[init.parent.name] = init.parent
    return found


def modules(top: str, directory: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(directory.rglob("*.py")):
        parts = path.relative_to(directory.parent).with_suffix("").parts
        found[".".join(p for p in parts if p != "__init__")] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that ``name`` imports: ``from X import y`` names X.y when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    every: dict[str, Path] = {}
    for top, directory in packages().items():
        every.update(modules(top, directory))
    known = set(every)
    return {name: imports_of(name, path, known) for name, path in every.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_itself_back_through_others() -> None:
    assert circles(graph()) == []


def test_a_planted_circle_is_found() -> None:
    edges = graph()
    edges[f"{CORE}._source"] = edges[f"{CORE}._source"] | {f"{CORE}._cli"}  # _cli reaches _source already
    assert any(f"{CORE}._cli" in c and f"{CORE}._source" in c for c in circles(edges))


def test_the_core_never_imports_a_plugin() -> None:
    for name, targets in graph().items():
        if name.split(".")[0] == CORE:
            assert all(t.split(".")[0] == CORE for t in targets), (name, targets)


@pytest.mark.parametrize("plugin", [p for p in packages() if p != CORE])
def test_a_plugin_reaches_another_only_through_its_face(plugin: str) -> None:
    for name, targets in graph().items():
        if name.split(".")[0] != plugin:
            continue
        for target in targets:
            top = target.split(".")[0]
            if top not in (plugin, CORE):
                assert target == top, f"{name} imports {target}: use {top}'s face (its package)"
                face = (packages()[top] / "__init__.py").read_text()
                assert "__all__" in face, f"{top} has no __all__"


@pytest.mark.parametrize("plugin", [p for p in packages() if p != CORE])
def test_every_plugin_declares_its_face(plugin: str) -> None:
    import importlib

    module = importlib.import_module(plugin)
    assert isinstance(module.__all__, list) and module.__all__ == sorted(module.__all__)
    assert all(getattr(module, name) is not None for name in module.__all__)
