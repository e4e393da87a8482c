"""Root acts only on its own files: the run directory, records, locks, and the devices they name.

Each test here failed before its fix. The kernel-side counterparts (umount of
another tool's device, a daemon that outlives its disconnect) need a real
device; these drive the same code with the faults placed by hand.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from erofs_mount_core import _backoff as backoff
from erofs_mount_core import _daemon_start as protocol
from erofs_mount_core import _devices as devices
from erofs_mount_core import _lifecycle as lifecycle
from erofs_mount_core import _listing as listing
from erofs_mount_core import _record as rec
from erofs_mount_core._errors import DeviceStateError, KernelError, RecordError, UsageError
from erofs_mount_core._nbd import link as links
from erofs_mount_core._nbd.sysfs import DeviceInfo
from tests.core.test_daemon_start import lock_held_elsewhere
from tests.core.test_record import make as sample_record


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> rec.RecordStore:
    monkeypatch.setenv(rec.RUN_DIR_ENV, str(tmp_path / "run"))
    s = rec.RecordStore()
    s.ensure()
    return s


def test_a_symlinked_run_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RecordError, match="not a directory"):
        rec.RecordStore(tmp_path / "run").ensure()


def test_a_run_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    with pytest.raises(RecordError, match="belongs to uid 65534"):
        rec.RecordStore(run).ensure()


def test_writing_a_record_follows_no_symlink(store: rec.RecordStore, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = store.new_path()
    (path.parent / f".{path.name}.{os.getpid()}.tmp").symlink_to(victim)  # planted at the temp name
    record = sample_record()
    store.write(path, record)
    assert victim.read_text() == "precious"
    assert store.read(path) == record


def test_a_symlinked_record_or_lock_is_refused(store: rec.RecordStore, tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    store.write(store.new_path(), sample_record())
    real.write_text(rec.dumps(sample_record()))
    real.chmod(0o600)
    link = store.new_path()
    link.symlink_to(real)
    with pytest.raises(RecordError, match="cannot read record"):
        store.read(link)
    rec.lock_path(link).symlink_to(tmp_path / "elsewhere.lock")
    with pytest.raises(RecordError, match="cannot open the lock"):
        with protocol.locked(link):
            pass
    assert not (tmp_path / "elsewhere.lock").exists()


def test_only_records_in_the_run_directory_name_a_device(store: rec.RecordStore, tmp_path: Path) -> None:
    ours = store.new_path()
    outside = tmp_path / "nbd-0123456789ab.toml"  # a record's name, another tool's directory
    odd = store.directory / "notes.toml"
    info = DeviceInfo(index=3, size=4096, pid=1, backend=str(ours))
    assert devices.record_path_of(info) == ours
    for backend in (str(outside), str(odd), "/etc/passwd.toml", "nbd-0123456789ab.toml"):
        assert devices.record_path_of(DeviceInfo(index=3, size=4096, pid=1, backend=backend)) is None


def test_a_lock_removed_while_it_was_taken_is_no_lock(store: rec.RecordStore, monkeypatch: pytest.MonkeyPatch) -> None:
    path = store.new_path()
    store.write(path, sample_record())
    real_flock = fcntl.flock

    def daemon_cleans_up_meanwhile(fd: int, op: int) -> None:
        rec.RecordStore.remove(path)  # what a daemon does as its device is disconnected
        real_flock(fd, op)

    monkeypatch.setattr(protocol.fcntl, "flock", daemon_cleans_up_meanwhile)
    with pytest.raises(DeviceStateError, match="removed meanwhile"):
        with protocol.locked(path):
            pytest.fail("a second daemon could start for a device being disconnected")


def test_files_are_removed_only_under_the_lock(store: rec.RecordStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that outlives its disconnect keeps its record: umount says so instead of deleting it."""
    path = store.new_path()
    store.write(path, sample_record())
    monkeypatch.setattr(lifecycle, "disconnect_any", lambda index: None)
    with lock_held_elsewhere(path):
        with pytest.raises(KernelError, match="did not exit within 0 s; its record .* is kept"):
            lifecycle._disconnect_and_wait(3, path, timeout=0.2)
        assert path.exists() and rec.lock_path(path).exists()
    lifecycle._disconnect_and_wait(3, path, timeout=0.2)  # the daemon is gone: now they go
    assert not path.exists() and not rec.lock_path(path).exists()


def test_a_failed_disconnect_is_not_swallowed() -> None:
    """This machine has no nbd driver: nothing was disconnected, and the caller must hear it."""
    if links.IoctlLink.available():
        pytest.skip("this host has an nbd driver")
    with pytest.raises(KernelError):
        links.disconnect_any(3)


def test_a_mount_whose_last_step_fails_stays_mounted(store: rec.RecordStore, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Setting disconnect-on-close after mount(2) failed: the mount works, so it is kept, with a warning."""
    from tests.imagetree import make_tree, mkfs

    make_tree(tmp_path / "tree", files=3, max_size=4096)
    image = mkfs(tmp_path / "app.erofs", tmp_path / "tree")
    (tmp_path / "mnt").mkdir()

    class Link(links.NetlinkLink):
        def disconnect_on_close(self, index: int, *, backend: str) -> None:
            raise KernelError("nbd reconfigure nbd7: the kernel refused the request")

    torn_down: list[int] = []
    monkeypatch.setattr(lifecycle, "choose_link", Link)
    monkeypatch.setattr(lifecycle, "spawn", lambda mode, path, starter=None, lock_fd=None: 7)
    monkeypatch.setattr(lifecycle.mounts, "mount_erofs", lambda device, mountpoint, flags: None)
    monkeypatch.setattr(lifecycle, "_disconnect_and_wait", lambda index, path: torn_down.append(index))
    assert lifecycle.mount(f"local:{image}", str(tmp_path / "mnt")) == "/dev/nbd7"
    assert torn_down == []
    assert "warning: /dev/nbd7: nbd reconfigure nbd7" in capsys.readouterr().err


def test_reattach_all_backs_off_a_device_that_keeps_failing(store: rec.RecordStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """As a timer runs it every 10 s: a refused device is tried after 10, 20, 40 s..., a good one every time."""
    bad, good = store.new_path(), store.new_path()
    for path in (bad, good):
        store.write(path, sample_record())
    attempts: list[int] = []

    def reattach(index: int, record_path: Path, *_args: object) -> int:
        attempts.append(index)
        if index == 1:
            raise KernelError("nbd1: no credentials in this environment")
        return index

    monkeypatch.setattr(lifecycle, "dead_devices", lambda: [(1, bad), (2, good)])
    monkeypatch.setattr(lifecycle, "prune_orphans", lambda: [])  # no device in sysfs names these records here
    monkeypatch.setattr(lifecycle, "_reattach", reattach)
    for now in range(0, 70, 10):  # seven runs of the timer
        lifecycle.reattach_all(now=float(now))
    assert attempts.count(2) == 7
    assert attempts.count(1) == 3, "tried at 0, 10 and 30 s; next at 70 s... backed off"
    outcome = lifecycle.reattach_all(now=69.0)[0]
    assert outcome.index == 1 and outcome.error is None and outcome.due_in == pytest.approx(1.0)
    lifecycle.reattach_all(now=70.0)
    assert attempts.count(1) == 4
    failure = backoff.last_failure(bad)
    assert failure is not None and failure.count == 4 and failure.why == "nbd1: no credentials in this environment"
    assert backoff.last_failure(good) is None, "a reattach that worked leaves no failure behind"
    rec.RecordStore.remove(bad)
    assert not rec.retry_path(bad).exists()


def test_orphaned_files_are_listed_and_pruned_but_not_a_mount_in_progress(store: rec.RecordStore) -> None:
    """No nbd device is attached on this host: every record is an orphan, except one whose lock is held."""
    stale, starting = store.new_path(), store.new_path()
    for path in (stale, starting):
        store.write(path, sample_record())
        rec.log_path(path).write_text("old log\n")
    lonely_lock = rec.lock_path(store.new_path())  # a lock whose record is long gone
    lonely_lock.write_text("")
    with lock_held_elsewhere(starting):
        rows = listing.list_devices()
        assert sorted(r["record"] for r in rows) == sorted([str(stale), str(lonely_lock.with_suffix(".toml"))])
        assert all(r["state"] == "detached" for r in rows)
        by_record = {r["record"]: r for r in rows}
        assert by_record[str(lonely_lock.with_suffix(".toml"))]["device"] is None, "no record: no device named"
        assert by_record[str(stale)]["device"] == f"/dev/nbd{sample_record().device.index}", "its last device"
        devices.prune_orphans()
        assert sorted(p.name for p in store.directory.iterdir()) == sorted(
            [starting.name, rec.lock_path(starting).name, rec.log_path(starting).name])


def test_a_mount_onto_a_mountpoint_is_refused_before_anything_is_opened() -> None:
    with pytest.raises(UsageError, match="/proc is already a mountpoint: unmount it first"):
        lifecycle.mount("local:/nonexistent.erofs", "/proc")
