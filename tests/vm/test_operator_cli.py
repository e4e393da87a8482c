"""The command line as an operator meets it: mount(8) and fstab, and what `list` says of a device.

util-linux's mount and umount are the real ones: mount(8) runs the helper
(``/sbin/mount.erofs-mount``, linked to this tree's console script, as the
user guide says), and a plain umount(8) ends the daemon through the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imagetree import file_sha256, make_tree, mkfs
from tests.vm.conftest import EROFS_MOUNT, assert_clean, cli, connected_devices, daemon_pids, devices, records
from tests.vm.test_chaos import assert_files, held_read
from tests.vm.test_local_mount import daemon_pid, evict, largest, mount

pytestmark = [pytest.mark.usefixtures("clean_system")]

HELPER = Path("/sbin/mount.erofs-mount")
FSTAB = Path("/etc/fstab")


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc
    return proc


def proc_mounts(mountpoint: Path) -> list[tuple[str, str, str]]:
    """(device, fstype, options) of each mount on ``mountpoint``, from the kernel's table."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        source, target, fstype, options, *_ = line.split()
        if target == str(mountpoint):
            found.append((source, fstype, options))
    return found


def wait_until_gone(device: str, timeout: float = 30) -> None:
    """A plain umount(8) disconnects the device in the kernel; its daemon then ends and removes its record."""
    deadline = time.monotonic() + timeout
    while connected_devices() or daemon_pids() or records():
        assert time.monotonic() < deadline, (device, connected_devices(), daemon_pids(), records())
        time.sleep(0.1)


@pytest.fixture
def helper_installed() -> Iterator[None]:
    HELPER.symlink_to(Path(EROFS_MOUNT).with_name("mount.erofs-mount"))
    saved = FSTAB.read_bytes() if FSTAB.exists() else None
    try:
        yield
    finally:
        HELPER.unlink()
        if saved is None:
            FSTAB.unlink(missing_ok=True)
        else:
            FSTAB.write_bytes(saved)


@pytest.mark.kernel
@pytest.mark.usefixtures("helper_installed")
def test_fstab_lines_mount_with_mount_8_and_umount_8_ends_everything(
        sample: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    image, sums = sample
    spaced = tmp_path / "app images" / "app.erofs"  # fstab(5) writes the space as \040
    spaced.parent.mkdir()
    shutil.copy(image, spaced)
    mnt, other = tmp_path / "mnt", tmp_path / "other"
    mnt.mkdir()
    other.mkdir()
    source = f"local:{spaced}".replace(" ", "\\040")
    with FSTAB.open("a") as f:
        f.write(f"{source} {mnt} erofs-mount ro,nosuid,nodev,_netdev,nofail,x-systemd.device-timeout=30,"
                "dead-timeout=600,connections=2 0 0\n")

    run("mount", str(mnt))
    ((device, fstype, options),) = proc_mounts(mnt)
    assert fstype == "erofs" and {"ro", "nosuid", "nodev"} <= set(options.split(",")), options
    (row,) = devices()
    assert (row["device"], row["state"], row["source"]) == (device, "serving", f"local:{spaced}")
    assert (row["dead_timeout"], row["connections"]) == (600, 2), "the line's device settings"
    assert_files(mnt, sums)
    run("mount", "-a")  # the line is mounted: nothing to do
    assert len(proc_mounts(mnt)) == 1 and len(daemon_pids()) == 1
    run("umount", str(mnt))  # umount(8), not erofs-mount's
    wait_until_gone(device)
    assert proc_mounts(mnt) == []

    run("mount", "-a")  # the same line, mounted by mount -a
    ((device, _fstype, _options),) = proc_mounts(mnt)
    assert_files(mnt, sums)
    run("umount", str(mnt))
    wait_until_gone(device)

    # mount -t with flags on the command line; -o passes both kinds, as to erofs-mount mount
    run("mount", "-t", "erofs-mount", f"local:{image}", str(other), "-o", "nosuid,nodev,noexec")
    ((device, _fstype, options),) = proc_mounts(other)
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(options.split(",")), options
    wrong = subprocess.run(["mount", "-t", "erofs-mount", f"local:{image}", str(mnt), "-o", "layer=0"],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0, wrong
    assert wrong.stderr.strip() == "Error: local: unknown option(s) layer (it takes none)", wrong
    assert proc_mounts(mnt) == [] and len(daemon_pids()) == 1, "the refused mount left nothing"

    # a bind mount holds the device: erofs-mount umount of one mountpoint says so, and the device serves on
    run("mount", "--bind", str(other), str(mnt))
    result = cli("umount", str(other))
    assert result.err.strip() == (f"{device} is still mounted on {mnt} and serves on "
                                  f"('erofs-mount umount {device}' unmounts it everywhere)")
    assert_files(mnt, sums)
    # umount -l with a file open: detached at once, the device and daemon end when the file is closed
    held = open(mnt / largest(mnt, sums), "rb")  # noqa: SIM115 (closed below, after the lazy umount)
    cli("umount", "-l", str(mnt))
    assert proc_mounts(mnt) == [] and daemon_pids() and held.read(4096)
    held.close()
    wait_until_gone(device)
    assert_clean()


def mounted_json(image: Path, mnt: Path) -> str:
    """``mount --json``: the device as ``list --json`` shows it, in the versioned envelope."""
    document = json.loads(cli("mount", f"local:{image}", str(mnt), "--connections", "1", "--json").out)
    assert (document["schema_version"], document["command"]) == (1, "mount")
    row = document["result"]
    assert (row["state"], row["source"], row["pins"]["path"], row["connections"]) == (
        "serving", f"local:{image}", str(image), 1), row
    assert Path(row["record"]).is_file() and row["mountpoints"] == [str(mnt)]
    return str(row["device"])


@pytest.mark.kernel(newer=True)
def test_each_dead_state_shows_as_itself_in_list_and_list_json(
        sample: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Four devices whose daemons were killed: one left (dead), one whose image changed and whose
    reattach was refused (refused), one past its dead timeout (expired), one disconnected (detached)."""
    image, sums = sample
    names = ("dead", "refused", "expired", "detached")
    mnts = {n: tmp_path / n for n in names}
    found: dict[str, str] = {}
    for name, mnt in mnts.items():
        mnt.mkdir()
        shutil.copy(image, tmp_path / f"{name}.erofs")
        if name == "dead":
            found[name] = mounted_json(tmp_path / f"{name}.erofs", mnt)
        else:
            extra = ("--dead-timeout", "3") if name == "expired" else ()
            found[name] = mount(tmp_path / f"{name}.erofs", mnt, "--connections", "1", *extra)
    try:
        evict(mnts["expired"], found["expired"])
        for name in names:  # the dead one by SIGTERM: its log then says which command brings it back
            pid = daemon_pid(found[name])
            os.kill(pid, signal.SIGTERM if name == "dead" else signal.SIGKILL)
            while pid in daemon_pids():
                time.sleep(0.05)
        backend = Path(f"/sys/block/{found['dead'][5:]}/backend").read_text().strip()
        log = Path(backend).with_suffix(".log").read_text()
        assert f"ending on SIGTERM: {found['dead'][5:]}'s reads wait until 'erofs-mount reattach {found['dead']}'" \
            in log, log
        make_tree(tmp_path / "other", files=3, seed=5)
        os.replace(mkfs(tmp_path / "other.erofs", tmp_path / "other"), tmp_path / "refused.erofs")
        assert cli("reattach", found["refused"], check=False).code == 4, "the bytes changed: refused"
        _thread, got = held_read(mnts["expired"] / largest(mnts["expired"], sums))
        _thread.join(60)
        assert got and "Input/output error" in got[0], got
        from erofs_mount_core._nbd.netlink import NBDNetlink

        with NBDNetlink() as nl:
            nl.disconnect_device(int(found["detached"].removeprefix("/dev/nbd")))

        rows = {row["device"]: row for row in devices()}
        states = {name: rows[device]["state"] for name, device in found.items()}
        assert states == {n: n for n in names}, rows
        assert "no longer the image that was mounted" in rows[found["refused"]]["why"]
        assert rows[found["dead"]]["reattach_command"] == f"erofs-mount reattach {found['dead']}"
        assert rows[found["detached"]]["mountpoints"] == [str(mnts["detached"])]
        assert rows[found["dead"]]["daemon_pid"] is None, "a dead daemon's pid is shown as if it ran"
        wide_lines = cli("list", "--wide").out.splitlines()
        pid_at = wide_lines[0].index("PID")  # columns are padded: a row's PID starts where its header does
        wide = {line.split()[0]: line for line in wide_lines if line.startswith("/dev/")}
        assert wide[found["dead"]][pid_at:].split()[0] == "-", wide[found["dead"]]
        text = cli("list").out.splitlines()
        table = {line.split()[0]: line.split()[1] for line in text[1:] if line.startswith("/dev/nbd")}
        assert {name: table[device] for name, device in found.items()} == {n: n for n in names}, text
        for name, device in found.items():  # and a line under the table: why, and the command that helps
            assert any(line.startswith(f"{device}: {name}: ") for line in text), text
        assert f"{found['dead']}: dead: its daemon is gone: reads wait (up to 86400 s) until a reattach " \
               f"(run: erofs-mount reattach {found['dead']})" in text

        # dead and expired come back with a reattach
        document = json.loads(cli("reattach", found["dead"], "--json").out)
        assert (document["command"], document["result"]["state"]) == ("reattach", "serving"), document
        cli("reattach", found["expired"])
        for name in ("dead", "expired"):
            rel = largest(mnts[name], sums)
            assert file_sha256(mnts[name] / rel) == sums[rel], name
        assert {row["device"]: row["state"] for row in devices()} == {
            found["dead"]: "serving", found["refused"]: "refused", found["expired"]: "serving",
            found["detached"]: "detached"}
    finally:
        for name in names:
            cli("umount", str(mnts[name]), check=False)
    assert_clean()
