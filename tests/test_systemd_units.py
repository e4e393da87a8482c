"""The shipped systemd units are valid and run reattach --all."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path: Path) -> None:
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/usr/local/bin/erofs-mount", shutil.which("true") or "/bin/true")
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, tmp_path.iterdir())],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "erofs-mount-" not in result.stderr, result.stderr


def test_service_runs_reattach_all() -> None:
    service = (UNITS / "erofs-mount-reattach.service").read_text()
    assert "ExecStart=/usr/local/bin/erofs-mount reattach --all" in service
    assert "Type=oneshot" in service


def test_watch_service_outlives_nothing_it_started() -> None:
    """The daemons watch forks live in its cgroup until they hand over: stopping or restarting it must leave
    them serving."""
    service = (UNITS / "erofs-mount-watch.service").read_text()
    assert "ExecStart=/usr/local/bin/erofs-mount watch" in service
    assert "KillMode=process" in service and "Restart=always" in service
