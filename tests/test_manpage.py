"""The manual page and shell completion: made from the commands, installed by scripts/setup, working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from erofs_mount_core import _cli as cli
from erofs_mount_core._errors import EXIT_CODES

VENV = Path(sys.prefix)
COMMAND = VENV / "bin" / "erofs-mount"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True,
                          env={**os.environ, "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", **env})


def every_command(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((f"{prefix}{name}", command))
        if isinstance(command, click.Group):
            found += every_command(command, f"{prefix}{name} ")
    return found


def test_the_installed_man_page_is_the_commands_own_and_man_renders_it_cleanly() -> None:
    installed = VENV / "share" / "man" / "man8" / "erofs-mount.8"
    assert installed.is_file(), "scripts/setup installs it"
    page = run(str(COMMAND), "man").stdout
    assert installed.read_text().splitlines()[1:] == page.splitlines()[1:], "not the commands of now: run scripts/setup"
    shown = run("man", "--warnings", "-P", "cat", "erofs-mount", MANWIDTH="200")
    assert shown.stderr == "", shown.stderr  # found through PATH, no roff warning
    text = shown.stdout
    for name, command in every_command(cli.cli):
        assert f"erofs-mount {name}" in text, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.opts[-1] in text, (name, param.opts)
    for code, meaning in EXIT_CODES.items():
        assert meaning.split(":")[0] in text, code
    assert "mount.erofs-mount" in text


def test_bash_completion_is_installed_and_completes_commands_and_options() -> None:
    script = VENV / "share" / "bash-completion" / "completions" / "erofs-mount"
    assert script.read_text() == run(str(COMMAND), _EROFS_MOUNT_COMPLETE="bash_source").stdout

    def complete(*words: str) -> list[str]:
        shell = (f"source {script}; COMP_WORDS=({' '.join(words)}); COMP_CWORD={len(words) - 1}; "
                 "_erofs_mount_completion erofs-mount; printf '%s\\n' \"${COMPREPLY[@]}\"")
        return run("bash", "-c", shell).stdout.split()

    assert complete("erofs-mount", "re") == ["reattach", "restart"]
    assert "--wide" in complete("erofs-mount", "list", "--")
    assert complete("erofs-mount", "cache", "p") == ["prune"]


def test_help_ends_with_the_exit_codes() -> None:
    text = run(str(COMMAND), "--help").stdout
    assert text.rstrip().endswith(f"130 {EXIT_CODES[130]}")
    assert all(f"{code} " in text for code in EXIT_CODES)
