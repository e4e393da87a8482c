"""Every code example in docs/ runs: Python blocks execute, TOML blocks parse,
and each erofs-mount command line shown names a real command and options."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from erofs_mount_core._cli import cli

DOCS = sorted((Path(__file__).resolve().parent.parent / "docs").glob("*.md"))
README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(path.read_text()) if kind == lang]


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d, "python")], ids=lambda d: d.name)
def test_python_examples_run(doc: Path) -> None:
    module = types.ModuleType(f"docs_example_{doc.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module
    try:
        for code in blocks(doc, "python"):
            exec(compile(code, str(doc), "exec"), module.__dict__)  # noqa: S102
    finally:
        del sys.modules[module.__name__]


@pytest.mark.parametrize("doc", [d for d in DOCS if blocks(d, "toml")], ids=lambda d: d.name)
def test_toml_examples_parse(doc: Path) -> None:
    for text in blocks(doc, "toml"):
        tomllib.loads(text)


def command_lines() -> list[str]:
    lines = []
    for doc in [*DOCS, README]:
        for body in blocks(doc, "") + blocks(doc, "sh") + blocks(doc, "bash"):
            for line in body.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("erofs-mount "):
                    lines.append(line)
    return lines


@pytest.mark.parametrize("line", command_lines())
def test_command_lines_name_real_commands_and_options(line: str) -> None:
    args = shlex.split(line)[1:]
    words = [a for a in args if a != "..."]
    command, depth = cli, 0  # down through groups: `cache prune` is the command, not `cache`
    while depth < len(words) and isinstance(command, click.Group) and words[depth] in command.commands:
        command, depth = command.commands[words[depth]], depth + 1
    result = CliRunner().invoke(cli, [*words[:max(depth, 1)], "--help"] if words else ["--help"])
    assert result.exit_code == 0, result.output
    help_text = result.output
    for arg in words[max(depth, 1):]:
        if arg.startswith("-"):
            assert arg.split("=")[0] in help_text, f"{line}: {arg} is not an option of {words[0]}"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, click.Command]]:
    group.list_commands(click.Context(group))  # the root: the installed plugins' commands too
    found: list[tuple[str, click.Command]] = [(" ".join(path) or "erofs-mount", group)]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
        else:
            found.append((" ".join((*path, name)), command))
    return found


@pytest.mark.parametrize(("name", "command"), _commands(cli), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_of_every_command_is_in_the_guide_and_the_man_page(name: str, command: click.Command) -> None:
    """The guide and erofs-mount(8) cannot drift from the commands: each option is named in both."""
    from erofs_mount_core._manpage import render

    guide = (README.parent / "docs" / "user-guide.md").read_text()
    man = render(cli).replace("\\-", "-")
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        names = param.opts + param.secondary_opts
        assert any(re.search(re.escape(n) + r"(?![\w-])", guide) for n in names), f"{name}: {names} not in the guide"
        assert any(re.search(re.escape(n) + r"(?![\w-])", man) for n in names), f"{name}: {names} not in the man page"


def test_the_readme_links_the_mount_helper_before_it_uses_it() -> None:
    lines = README.read_text().splitlines()
    link = next(i for i, line in enumerate(lines) if line.startswith("ln -s") and "mount.erofs-mount" in line)
    assert link < next(i for i, line in enumerate(lines) if line.startswith("mount -t erofs-mount"))


def test_the_architecture_table_names_every_module_of_the_tree() -> None:
    """docs/architecture.md has a row for each module of the core and of each plugin, and none for a module
    that is gone."""
    doc = (README.parent / "docs" / "architecture.md").read_text()
    rows = set(re.findall(r"^\| `([\w/.]+\.py)`", doc, re.M))
    core = README.parent / "erofs_mount_core"
    plugins = sorted((README.parent / "plugins").glob("*/erofs_mount_*"))
    modules = {str(p.relative_to(core)) for p in core.rglob("*.py") if p.name != "__init__.py"}
    named = {p.name for top in plugins for p in top.glob("*.py") if p.name != "__init__.py"}
    assert modules - rows == set(), "core modules with no row"
    assert named - rows == set(), "plugin modules with no row"
    assert rows - modules - named == set(), "rows for modules that are gone"
