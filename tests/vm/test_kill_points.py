"""Kill at every step of mount and reattach: the command or the daemon, SIGKILLed at each point.

``EROFS_MOUNT_TEST_KILL_AT=POINT`` (``erofs_mount_core._kill_points``, set only
here) makes the process that reaches POINT kill itself. After each, at most
one more ``reattach`` leaves either a device that serves the right bytes or
nothing at all (no device, record or daemon); never two daemons for one
device, never a connected device without its record.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from erofs_mount_core._kill_points import KILL_AT
from tests.imagetree import file_sha256
from tests.vm.conftest import assert_clean, cli, connected_devices, daemon_pids, records
from tests.vm.test_chaos import assert_files, held_read
from tests.vm.test_local_mount import evict, mount

# in the newer kernel's guest only, which has room for them beside the stock guest's chaos tests
pytestmark = [pytest.mark.kernel(newer="only"), pytest.mark.usefixtures("clean_system")]

#: where mount is killed, and what one ``reattach --all`` after it leaves
MOUNT_POINTS = {
    "mount:before-record": "nothing",
    "mount:record-written": "nothing",  # the record, whose lock died with the command, is pruned as an orphan
    "daemon:before-connect": "nothing",  # mount says the daemon died and removes the record
    "daemon:after-connect": "nothing",  # ... and disconnects the device that names the record
    "daemon:before-ready": "nothing",
    "spawn-connect:started": "served",  # the daemon outlives its command: the device serves, unmounted
    "mount:daemon-ready": "served",
    "mount:mounted": "mounted",
}
#: where reattach is killed: one more reattach always serves the device
REATTACH_POINTS = ("reattach:before-spawn", "daemon:before-reconfigure", "daemon:after-reconfigure",
                   "daemon:before-ready", "spawn-reattach:started")


def attached() -> dict[str, str]:
    """Connected nbd devices and the backend (record path) each names, read from sysfs: no command starts."""
    from erofs_mount_core._nbd import sysfs

    return {info.path: info.backend for info in sysfs.devices() if info.configured}


def assert_consistent() -> None:
    """Once every daemon has settled: never two daemons for one device, never a connected device
    without its record."""
    deadline = time.monotonic() + 30
    while len(daemon_pids()) > len(connected_devices()):  # a daemon that outlived its command, connecting
        assert time.monotonic() < deadline, (daemon_pids(), connected_devices())
        time.sleep(0.1)
    devices_now = attached()
    assert len(daemon_pids()) <= max(1, len(devices_now))
    for device, backend in devices_now.items():
        assert backend and Path(backend).exists(), (device, backend)


def device_sha256(device: str, length: int) -> str:
    h = hashlib.sha256()
    with open(device, "rb") as f:
        h.update(f.read(length))
    return h.hexdigest()


def kill_the_daemon() -> None:
    (pid,) = daemon_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while daemon_pids():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("point", sorted(MOUNT_POINTS))
def test_mount_killed_at_each_point(point: str, sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = sample
    result = cli("mount", "--source", f"local:{image}", str(mountpoint), env={KILL_AT: point}, check=False)
    assert result.code != 0, result
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 1, result
    assert_consistent()
    cli("reattach", "--all", check=False)  # the one more reattach (the timer's): it also prunes orphans
    assert_consistent()
    left = attached()
    try:
        if MOUNT_POINTS[point] == "nothing":
            assert left == {} and not os.path.ismount(mountpoint) and records() == [] and daemon_pids() == []
        else:
            (device,) = left
            assert len(daemon_pids()) == 1
            assert device_sha256(device, image.stat().st_size) == hashlib.sha256(image.read_bytes()).hexdigest()
            assert os.path.ismount(mountpoint) == (MOUNT_POINTS[point] == "mounted")
            if os.path.ismount(mountpoint):
                assert_files(mountpoint, sums)
    finally:
        for device in attached():
            cli("umount", str(mountpoint) if os.path.ismount(mountpoint) else device)
    assert_clean()


@pytest.mark.parametrize("point", REATTACH_POINTS)
def test_reattach_killed_at_each_point(point: str, sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = sample
    device = mount(image, mountpoint)
    try:
        evict(mountpoint, device)
        kill_the_daemon()
        rel, other = sorted(sums, key=lambda r: -(image.parent / "tree" / r).stat().st_size)[:2]
        reader, got = held_read(mountpoint / rel)  # waits in the kernel through all that follows
        result = cli("reattach", device, env={KILL_AT: point}, check=False)
        assert "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 1, result
        assert_consistent()
        again = cli("reattach", device, check=False)
        assert again.code == 0 or "alive" in again.err, again  # the daemon outlived its command
        reader.join(90)
        assert got == [sums[rel]]
        assert len(daemon_pids()) == 1
        assert file_sha256(mountpoint / other) == sums[other]
    finally:
        cli("umount", str(mountpoint))
    assert_clean()
