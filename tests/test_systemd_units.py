"""The systemd units ``erofs-mount systemd-units`` writes: valid, running the installed command by its path."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from erofs_mount_core._systemd_units import render

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))
NAMES = {"erofs-mount-watch.service", "erofs-mount-reattach.service", "erofs-mount-reattach.timer"}


def written(tmp_path: Path, *args: str) -> dict[str, str]:
    result = subprocess.run([EROFS_MOUNT, "systemd-units", "--into", str(tmp_path), *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {Path(line).name for line in result.stdout.splitlines()} == NAMES
    return {p.name: p.read_text() for p in tmp_path.iterdir()}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path: Path) -> None:
    written(tmp_path, "--command", shutil.which("true") or "/bin/true")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, tmp_path.iterdir())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "erofs-mount-" not in result.stderr, result.stderr


def test_the_units_run_the_command_that_wrote_them(tmp_path: Path) -> None:
    units = written(tmp_path)
    assert f"ExecStart={EROFS_MOUNT} reattach --all" in units["erofs-mount-reattach.service"]
    assert f"ExecStart={EROFS_MOUNT} watch" in units["erofs-mount-watch.service"]
    assert "/usr/local/bin" not in "".join(units.values()) and "docs/" not in "".join(units.values())
    assert all(oct(p.stat().st_mode & 0o777) == "0o644" for p in tmp_path.iterdir())


def test_service_runs_reattach_all() -> None:
    service = render("/usr/bin/erofs-mount")["erofs-mount-reattach.service"]
    assert "ExecStart=/usr/bin/erofs-mount reattach --all" in service
    assert "Type=oneshot" in service


def test_watch_service_outlives_nothing_it_started() -> None:
    """The daemons watch forks live in its cgroup until they hand over: stopping or restarting it must leave
    them serving."""
    service = render("/usr/bin/erofs-mount")["erofs-mount-watch.service"]
    assert "ExecStart=/usr/bin/erofs-mount watch" in service
    assert "KillMode=process" in service and "Restart=always" in service


def test_a_command_that_is_not_an_absolute_executable_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([EROFS_MOUNT, "systemd-units", "--into", str(tmp_path), "--command", "erofs-mount"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "not an executable given by its absolute path" in result.stderr and not list(tmp_path.iterdir())
