"""Fixtures for the kernel tests (they run as root inside the test VM)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from erofs_mount_core import CommandServer
from tests.imagetree import make_tree, mkfs

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))
RUN_DIR = Path("/run/erofs-mount")
#: the guest session's commands run in forks of a warm process (the core's CommandServer, as the containerd
#: snapshotter runs them): an interpreter's start and imports take seconds per command in the emulated VM.
#: tests/core/test_forkserver.py shows a fork gives what the executable gives; ``cli(user=)``, the tests that
#: start commands themselves and the benchmarks run the executable.
_commands: CommandServer | None = None


@pytest.fixture(scope="session", autouse=True)
def command_server() -> Iterator[None]:
    """Started before any other fixture (autouse), while the session has no thread to fork with."""
    global _commands
    if os.environ.get("VMTEST_GUEST") != "1":  # the host only holds the kernel tests' stand-ins
        yield
        return
    _commands = CommandServer()
    try:
        yield
    finally:
        _commands.close()
        _commands = None


@pytest.fixture(scope="session")
def nbd_driver() -> None:
    subprocess.run(["modprobe", "nbd", "nbds_max=16", "max_part=0"], check=True)


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A small EROFS image and the sha256 of each of its files."""
    base = tmp_path_factory.mktemp("sample")
    sums = make_tree(base / "tree", files=40, max_size=1 << 20)
    return mkfs(base / "sample.erofs", base / "tree"), sums


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


def cli(*args: str, check: bool = True, user: int | None = None, env: dict[str, str] | None = None) -> Result:
    """Run the erofs-mount command as a user would (in the guest's session, as a fork of a warm one)."""
    cmd = [EROFS_MOUNT, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    if user is None and _commands is not None:
        proc = _commands.run(args, timeout=300, env={**os.environ, **(env or {})})
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **(env or {})})
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"erofs-mount {' '.join(args)} failed: {result}")
    return result


def devices() -> list[dict[str, object]]:
    return json.loads(cli("list", "--json").out)["result"]


def daemon_pids() -> list[int]:
    """Live daemons: started as ``python -m erofs_mount_core._daemon`` (``restart``), or forked by
    ``mount``, ``reattach`` or ``watch`` (named erofs-mountd, with the command's command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (proc / "stat").read_text()
                if stat[stat.rindex(")") + 2] == "Z":
                    continue
                if (b"erofs_mount_core._daemon" in (proc / "cmdline").read_bytes()
                        or (proc / "comm").read_text().strip() == "erofs-mountd"):
                    pids.append(int(proc.name))
    return pids


def connected_devices() -> list[int]:
    return sorted(int(re.sub(r"\D", "", p.parent.name)) for p in Path("/sys/block").glob("nbd*/pid"))


def records() -> list[str]:
    return sorted(p.name for p in RUN_DIR.iterdir()) if RUN_DIR.exists() else []


def assert_clean() -> None:
    assert connected_devices() == [], "an nbd device is still connected"
    assert daemon_pids() == [], "a daemon is still running"
    assert records() == [], "a record is left in /run/erofs-mount"


def force_clean() -> None:
    """Tear down whatever a failed test left, so the next test starts clean."""
    from erofs_mount_core._nbd.netlink import NBDNetlink

    for src, mp, _fstype, _options in _mounts():
        if src.startswith("/dev/nbd"):
            subprocess.run(["umount", "-l", mp], check=False)
    with NBDNetlink() as nl:
        for index in connected_devices():
            with contextlib.suppress(Exception):
                nl.disconnect_device(index)
    for pid in daemon_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    for name in records():
        (RUN_DIR / name).unlink()


def _mounts() -> list[tuple[str, str, str, str]]:
    from erofs_mount_core._mounts import mount_table

    return mount_table()


@pytest.fixture
def clean_system(nbd_driver: None) -> Iterator[None]:
    """The test starts with no device, daemon or record, and leaves none."""
    force_clean()
    yield
    leftovers = (connected_devices(), daemon_pids(), records())
    force_clean()
    assert leftovers == ([], [], []), f"left behind (devices, daemons, records): {leftovers}"


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return mnt
