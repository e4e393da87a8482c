"""Kill at every step of mount and reattach: the command or the daemon, SIGKILLed at each point.

``EROFS_MOUNT_TEST_KILL_AT=POINT`` (``erofs_mount_core._faults``, set only
here) makes the process that reaches POINT kill itself. After each, at most
one more ``reattach`` leaves either a device that serves the right bytes or
nothing at all (no device, record or daemon); never two daemons for one
device, never a connected device without its record.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from erofs_mount_core._faults import KILL_AT
from tests.imagetree import file_sha256
from tests.vm.conftest import assert_clean, cli, connected_devices, daemon_pids, devices
from tests.vm.test_chaos import assert_files, held_read
from tests.vm.test_local_mount import evict, kill_daemon, mount

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


def assert_consistent() -> None:
    """Once every daemon has settled: never two daemons for one device, never a connected device
    without its record."""
    deadline = time.monotonic() + 30
    while len(daemon_pids()) > len(connected_devices()):  # a daemon that outlived its command, connecting
        assert time.monotonic() < deadline, (daemon_pids(), connected_devices())
        time.sleep(0.1)
    rows = devices()
    assert len(daemon_pids()) <= max(1, len(rows))
    for row in rows:
        assert Path(str(row["record"])).exists(), row
    assert len(rows) == len(connected_devices()), (rows, connected_devices())


def device_sha256(device: str, length: int) -> str:
    h = hashlib.sha256()
    with open(device, "rb") as f:
        h.update(f.read(length))
    return h.hexdigest()


@pytest.mark.parametrize("point", sorted(MOUNT_POINTS))
def test_mount_killed_at_each_point(point: str, sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = sample
    result = cli("mount", "--source", f"local:{image}", str(mountpoint), env={KILL_AT: point}, check=False)
    assert result.code != 0, result
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 1, result
    assert_consistent()
    cli("reattach", "--all", check=False)  # the one more reattach (the timer's)
    assert_consistent()
    left = devices()
    try:
        if MOUNT_POINTS[point] == "nothing":
            assert left == [] and not os.path.ismount(mountpoint)
        else:
            (row,) = left
            device = str(row["device"])
            assert row["daemon_alive"] and len(daemon_pids()) == 1
            assert device_sha256(device, image.stat().st_size) == hashlib.sha256(image.read_bytes()).hexdigest()
            assert os.path.ismount(mountpoint) == (MOUNT_POINTS[point] == "mounted")
            if os.path.ismount(mountpoint):
                assert_files(mountpoint, sums)
    finally:
        for row in devices():
            cli("umount", str(mountpoint) if os.path.ismount(mountpoint) else str(row["device"]))
    assert_clean()


@pytest.mark.parametrize("point", REATTACH_POINTS)
def test_reattach_killed_at_each_point(point: str, sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = sample
    device = mount(image, mountpoint)
    try:
        evict(mountpoint, device)
        kill_daemon(device)
        rel = sorted(sums)[0]
        reader, got = held_read(mountpoint / rel)  # waits in the kernel through all that follows
        result = cli("reattach", device, env={KILL_AT: point}, check=False)
        assert "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 1, result
        assert_consistent()
        again = cli("reattach", device, check=False)
        assert again.code == 0 or "alive" in again.err, again  # the daemon outlived its command
        reader.join(90)
        assert got == [sums[rel]]
        assert len(daemon_pids()) == 1
        assert file_sha256(mountpoint / rel) == sums[rel]
        assert_files(mountpoint, sums)
    finally:
        cli("umount", str(mountpoint))
    assert_clean()
