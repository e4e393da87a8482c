"""Mount, kill, reattach and unmount local images through the real nbd driver."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import stat
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest

from tests.imagetree import file_sha256, make_tree, mkfs
from tests.vm.conftest import assert_clean, cli, connected_devices, daemon_pids, devices, records

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_system")]


def mount(image: Path, mnt: Path, *extra: str) -> str:
    device = cli("mount", "--source", f"local:{image}", str(mnt), *extra).out.strip()
    assert device.startswith("/dev/nbd")
    return device


def daemon_pid(device: str, timeout: float = 30) -> int:
    """The pid of the daemon serving ``device``, found as ``list`` finds it (the record the device's
    backend names, whose lock the daemon holds) without starting a command: each costs seconds here.

    A new daemon serves before it writes its pid into the record: until it has, the record names the
    one it replaced, and this waits for a live one.
    """
    from erofs_mount_core._daemon_start import daemon_alive

    record = Path(Path(f"/sys/block/{device.removeprefix('/dev/')}/backend").read_text().strip())
    deadline = time.monotonic() + timeout
    while True:
        assert daemon_alive(record), f"{device}: no daemon holds {record}"
        pid = int(tomllib.loads(record.read_text())["daemon_pid"])
        if pid in daemon_pids():
            return pid
        assert time.monotonic() < deadline, f"{device}: {record} names daemon {pid}, which is gone"
        time.sleep(0.05)


def kill_daemon(device: str) -> None:
    pid = daemon_pid(device)
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if pid not in daemon_pids():
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon {pid} survived SIGKILL")


BLKFLSBUF = 0x1261


def largest(mountpoint: Path, sums: dict[str, str]) -> str:
    """The largest file: its data is in blocks of its own (a small file's may sit in a metadata block
    that stays cached), so after ``evict`` reading it needs a daemon."""
    return max(sums, key=lambda rel: (mountpoint / rel).stat().st_size)


def evict(mountpoint: Path, device: str) -> None:
    """Drop what the kernel caches of the mount's file data and of its device's blocks, so that the
    next reads reach a daemon; call it while the daemon is alive (opening a file may need a read).

    Not vm.drop_caches: that also drops the guest's cache of the shared root, and every Python that
    starts after it (the next reattach) reads its modules over 9p again, 5-10 s in the emulated guest.
    """
    for directory, _dirs, names in os.walk(mountpoint):
        for name in names:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            except OSError:
                continue  # a link, a device node on a nodev mount
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    fd = os.open(device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A few hundred files, 0 B to 8 MiB, names with spaces, quotes and non-ASCII."""
    base = tmp_path_factory.mktemp("big")
    sums = make_tree(base / "tree", files=300)
    return mkfs(base / "big.erofs", base / "tree"), sums


def test_every_file_of_a_large_tree_reads_back(big_tree: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = big_tree
    device = mount(image, mountpoint)
    try:
        assert len(sums) == 300
        for rel, digest in sums.items():
            assert file_sha256(mountpoint / rel) == digest, rel
        (row,) = devices()
        assert row["device"] == device and row["mountpoints"] == [str(mountpoint)]
        assert row["source"] == f"local:{image}"
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


class Readers:
    """Threads that read and checksum files in a loop, evicting each from the page cache."""

    def __init__(self, root: Path, sums: dict[str, str], count: int = 4, pause: float = 0.0) -> None:
        self.root, self.sums, self.pause = root, sums, pause
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []
        self.mismatches: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(count)]

    def _run(self, n: int) -> None:
        rng = random.Random(n)
        names = sorted(self.sums)
        while not self.stop.is_set():
            rel = rng.choice(names)
            try:
                with open(self.root / rel, "rb") as f:
                    digest = file_sha256(self.root / rel)
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError as exc:
                self.errors.append(f"{rel}: {exc}")
                continue
            if digest != self.sums[rel]:
                self.mismatches.append(rel)
            self.reads += 1
            self.stop.wait(self.pause)

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads), "a reader is stuck"

    def wait_for_reads(self, more: int, timeout: float = 120) -> None:
        target = self.reads + more
        deadline = time.monotonic() + timeout
        while self.reads < target:
            assert time.monotonic() < deadline, f"readers stalled at {self.reads} reads"
            time.sleep(0.1)


@pytest.mark.kernel(newer=True)
def test_reattach_on_a_healthy_device_changes_nothing(sample: tuple[Path, dict[str, str]],
                                                     mountpoint: Path) -> None:
    image, sums = sample
    device = mount(image, mountpoint)
    try:
        pid = daemon_pid(device)
        result = cli("reattach", device, check=False)
        assert (result.code, result.out.strip()) == (0, device), "nothing to do is no error"
        assert result.err.strip() == f"{device[5:]}: its daemon is alive and serving: nothing to do"
        assert daemon_pids() == [pid]
        evict(mountpoint, device)
        rel = next(iter(sums))
        assert file_sha256(mountpoint / rel) == sums[rel]
    finally:
        cli("umount", str(mountpoint))


@pytest.mark.kernel(newer=True)
def test_reattach_refuses_a_replaced_image(sample: tuple[Path, dict[str, str]], mountpoint: Path,
                                          tmp_path: Path) -> None:
    image, sums = sample
    mine = tmp_path / "image.erofs"
    shutil.copy(image, mine)
    device = mount(mine, mountpoint)
    rel = largest(mountpoint, sums)
    evict(mountpoint, device)
    kill_daemon(device)
    other = make_tree(tmp_path / "other", files=5, seed=9)
    assert other
    mkfs(tmp_path / "other.erofs", tmp_path / "other")
    os.replace(tmp_path / "other.erofs", mine)
    reader = subprocess.Popen(["sha256sum", str(mountpoint / rel)], stdout=subprocess.PIPE, text=True)
    result = cli("reattach", device, check=False)
    assert result.code != 0
    assert "is no longer the image that was mounted" in result.err
    assert len(result.err.strip().splitlines()) == 1
    time.sleep(1)
    assert reader.poll() is None, "the read must stay blocked, not be served other bytes"
    assert daemon_pids() == []
    # record, lock, log, control socket: kept for a later reattach; and the refusal, for list and the back-off
    assert len(records()) == 5 and any(name.endswith(".retry") for name in records()), records()
    # give up on the device: the blocked read fails instead of returning wrong bytes
    from erofs_mount_core._nbd.netlink import NBDNetlink

    with NBDNetlink() as nl:
        nl.disconnect_device(int(device.removeprefix("/dev/nbd")))
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode != 0 and sums[rel] not in out
    cli("umount", str(mountpoint))
    assert_clean()


@pytest.mark.kernel(newer=True)
def test_umount_leaves_nothing_behind(sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, _ = sample
    device = mount(image, mountpoint)
    assert connected_devices() == [int(device.removeprefix("/dev/nbd"))]
    assert len(daemon_pids()) == 1 and len(records()) == 4  # record, lock, log, control socket
    cli("umount", str(mountpoint))
    assert_clean()
    assert not os.path.ismount(mountpoint)


def test_umount_by_device_after_the_daemon_died(sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, _ = sample
    device = mount(image, mountpoint)
    kill_daemon(device)
    cli("umount", device)
    assert_clean()


@pytest.mark.kernel(newer=True)
def test_an_image_path_with_space_and_newline_round_trips(sample: tuple[Path, dict[str, str]],
                                                          mountpoint: Path, tmp_path: Path) -> None:
    """...and a read held by the kernel while no daemon runs completes after reattach."""
    image, sums = sample
    odd = tmp_path / "dir with space" / "new\nline ünï.erofs"
    odd.parent.mkdir()
    shutil.copy(image, odd)
    device = mount(odd, mountpoint)
    try:
        (row,) = devices()
        assert row["source"] == f"local:{odd}"
        rel = largest(mountpoint, sums)
        digest = sums[rel]
        evict(mountpoint, device)
        kill_daemon(device)
        held = subprocess.Popen(["sha256sum", str(mountpoint / rel)], stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        assert held.poll() is None, "with the daemon dead, the read waits in the kernel"
        cli("reattach", device)
        out, _ = held.communicate(timeout=120)
        assert held.returncode == 0 and out.split()[0] == digest
        for rel, digest in sums.items():
            assert file_sha256(mountpoint / rel) == digest, rel
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


@pytest.mark.kernel(newer=True)
def test_reattach_all_takes_only_dead_devices(sample: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    image, sums = sample
    mnts = [tmp_path / "a", tmp_path / "b"]
    for m in mnts:
        m.mkdir()
    dev_a, dev_b = mount(image, mnts[0]), mount(image, mnts[1])
    try:
        healthy = daemon_pid(dev_b)
        kill_daemon(dev_a)
        time.sleep(1)
        assert cli("reattach", "--all").out.split() == [dev_a]
        assert healthy in daemon_pids() and len(daemon_pids()) == 2
        evict(mnts[0], dev_a)
        rel = next(iter(sums))
        assert file_sha256(mnts[0] / rel) == sums[rel]
    finally:
        for m in mnts:
            cli("umount", str(m))
    assert_clean()


# -- what a user can get wrong: one line, non-zero, nothing left behind -------

def _refused(*args: str, user: int | None = None) -> str:
    result = cli(*args, check=False, user=user)
    assert result.code != 0
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.err
    assert "Traceback" not in result.err
    assert_clean()
    return lines[0]


@pytest.mark.kernel(newer=True)
def test_bad_inputs(sample: tuple[Path, dict[str, str]], mountpoint: Path, tmp_path: Path) -> None:
    image, _ = sample
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    assert "no such file" in _refused("mount", "--source", f"local:{tmp_path}/missing.erofs", str(mountpoint))
    assert "not an EROFS image" in _refused("mount", "--source", f"local:{junk}", str(mountpoint))
    # passes the superblock check (magic, block size, blocks held), fails in the kernel (its root inode is
    # zeros): the device is attached, then torn down
    corrupt = tmp_path / "corrupt.erofs"
    head = bytearray(1 << 20)
    head[1024:1028] = (0xE0F5E1E2).to_bytes(4, "little")
    head[1024 + 12] = 12  # blkszbits: 4 KiB blocks
    head[1024 + 36:1024 + 40] = (256).to_bytes(4, "little")  # blocks: the 1 MiB it holds
    corrupt.write_bytes(bytes(head))
    truncated = tmp_path / "truncated.erofs"
    truncated.write_bytes(image.read_bytes()[:8192])
    assert "a truncated EROFS image" in _refused("mount", "--source", f"local:{truncated}", str(mountpoint))
    assert "not a valid EROFS filesystem" in _refused("mount", "--source", f"local:{corrupt}", str(mountpoint))
    assert "does not exist" in _refused("mount", "--source", f"local:{image}", str(tmp_path / "nope"))
    assert "no installed plugin provides source type 'nosuch'" in _refused(
        "mount", "--source", f"nosuch:{image}", str(mountpoint))
    assert "needs root" in _refused("mount", "--source", f"local:{image}", str(mountpoint), user=65534)
    assert "needs root" in _refused("reattach", "/dev/nbd0", user=65534)
    assert "not connected" in _refused("reattach", "/dev/nbd0")
    assert "not an erofs-mount mountpoint" in _refused("umount", str(mountpoint))


def test_no_nbd_driver(sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, _ = sample
    modprobe = Path("/proc/sys/kernel/modprobe")
    saved = modprobe.read_text()
    subprocess.run(["rmmod", "nbd"], check=True)
    modprobe.write_text("/bin/false\n")  # no autoloading of the genl family's module
    try:
        line = _refused("mount", "--source", f"local:{image}", str(mountpoint))
        assert "no nbd driver" in line and "modprobe nbd" in line
    finally:
        modprobe.write_text(saved)
        subprocess.run(["modprobe", "nbd", "nbds_max=16", "max_part=0"], check=True)


@pytest.mark.kernel(newer=True)
def test_legacy_ioctl_interface_serves_but_cannot_reattach(sample: tuple[Path, dict[str, str]],
                                                          mountpoint: Path) -> None:
    """Kernels before 4.12 have only the ioctls; forced here on a newer kernel."""
    image, sums = sample
    device = cli("mount", "--source", f"local:{image}", str(mountpoint),
                 env={"EROFS_MOUNT_NBD_INTERFACE": "ioctl"}).out.strip()
    try:
        for rel, digest in sums.items():
            assert file_sha256(mountpoint / rel) == digest, rel
        (row,) = devices()
        assert row["device"] == device and row["state"] == "serving"
        result = cli("reattach", device, check=False)
        assert result.code != 0 and "legacy ioctl interface" in result.err
        assert cli("reattach", "--all").out == ""
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


def test_an_image_s_setuid_files_and_device_nodes_have_no_power_unless_asked(tmp_path: Path,
                                                                              mountpoint: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    shell = tree / "rootshell"
    shell.write_bytes(Path("/bin/true").read_bytes())
    shell.chmod(0o4755)
    os.mknod(tree / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    image = mkfs(tmp_path / "danger.erofs", tree)
    mount(image, mountpoint)
    try:
        assert os.stat(mountpoint / "rootshell").st_mode & stat.S_ISUID, "the image keeps its bits..."
        assert os.statvfs(mountpoint).f_flag & os.ST_NOSUID, "...but the mount ignores them"
        with pytest.raises(PermissionError):
            open(mountpoint / "null", "rb").close()  # nodev
        (row,) = devices()
        assert row["mount_options"] == "ro,nosuid,nodev"
        assert "ro,nosuid,nodev" in cli("list", "--wide").out
    finally:
        cli("umount", str(mountpoint))
    mount(image, mountpoint, "-o", "suid,dev")  # the documented opt-out
    try:
        assert not os.statvfs(mountpoint).f_flag & os.ST_NOSUID
        with open(mountpoint / "null", "rb") as f:
            assert f.read(10) == b""
        (row,) = devices()
        assert row["mount_options"] == "ro"
    finally:
        cli("umount", str(mountpoint))
    assert_clean()
