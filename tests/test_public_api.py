"""The public surface is declared, and it is all a plugin and the contract kit's users need.

Public: ``erofs_mount_core`` (its ``__all__``), ``erofs_mount_core.hookspecs``
and ``erofs_mount_core.testing`` (its ``__all__``). Every other module's
name starts with ``_``. The bundled plugins, their contract tests and the
plugin guide's examples are checked to import nothing else.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import erofs_mount_core
import erofs_mount_core.testing

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = {"erofs_mount_core", "erofs_mount_core.hookspecs", "erofs_mount_core.testing"}


def test_every_module_but_the_public_ones_is_private() -> None:
    for path in (ROOT / "erofs_mount_core").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        if name in PUBLIC_MODULES:
            continue
        assert any(p.startswith("_") and p != "__init__" for p in parts[1:]), f"{name} is not marked private"


@pytest.mark.parametrize("module", [erofs_mount_core, erofs_mount_core.testing])
def test_all_names_exist(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(names)
    for name in names:
        assert getattr(module, name) is not None


def _python_of(path: Path) -> Iterator[tuple[str, str]]:
    """(where, code) for a .py file, or for each ```python block of a markdown file."""
    text = path.read_text()
    if path.suffix == ".py":
        yield str(path.relative_to(ROOT)), text
        return
    for n, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
        yield f"{path.relative_to(ROOT)} block {n}", block


def _plugin_side_code() -> list[Path]:
    paths = sorted((ROOT / "plugins").rglob("*.py"))
    paths += [ROOT / "tests" / src / "test_contract.py" for src in ("local", "oci")]
    paths += [ROOT / "docs" / "plugin-guide.md"]
    return paths


def _imports(code: str) -> Iterator[tuple[str, str | None]]:
    """(module, name or None) for every import of erofs_mount_core."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("erofs_mount_core"):
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("erofs_mount_core"):
                    yield alias.name, None


@pytest.mark.parametrize("path", _plugin_side_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_and_their_tests_use_only_public_names(path: Path) -> None:
    for where, code in _python_of(path):
        for module, name in _imports(code):
            assert module in PUBLIC_MODULES, f"{where} imports the private module {module}"
            if name is None:
                continue
            public = importlib.import_module(module)
            allowed = getattr(public, "__all__", None)
            if allowed is not None:
                assert name in allowed, f"{where} imports {name} from {module}, which does not export it"
            else:
                assert hasattr(public, name), f"{where} imports {name}, which {module} lacks"


def test_the_plugins_need_no_more_than_all() -> None:
    """What the three bundled plugins import from the core, together, is inside ``__all__``."""
    used = set()
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        used |= {name for module, name in _imports(path.read_text()) if module == "erofs_mount_core"}
    assert used <= set(erofs_mount_core.__all__)
    assert {"Source", "SourceError", "SourceChangedError", "UsageError", "hookimpl", "CacheSettings"} <= used
