"""The daemon protocol: a daemon's error reaches the command as its own class; the lock is the liveness probe.

These run a real daemon process on the host: it fails before it needs the
nbd driver (the source refuses), which is exactly the path that carries an
error back. tests/vm/ covers the paths that reach the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from erofs_mount_core import _backoff as backoff
from erofs_mount_core import _daemon_start as protocol
from erofs_mount_core import _errors as errors
from erofs_mount_core import _lifecycle as lifecycle
from erofs_mount_core import _record as rec


@pytest.mark.parametrize("exc", [
    errors.SourceChangedError("/srv/a.erofs is no longer the image that was mounted (inode changed)"),
    errors.DeviceStateError("nbd3: its daemon is alive and serving: nothing to do"),
    errors.NotRootError("mount"),
    errors.KernelError("two\nlines"),
])
def test_an_error_crosses_the_pipe_as_its_own_class(exc: errors.ErofsMountError) -> None:
    again = protocol.decode_error(protocol.encode_error(exc))
    assert type(again) is type(exc)
    assert str(again) == str(exc).replace("\n", " ") and again.exit_code == exc.exit_code


def test_an_unknown_class_becomes_the_base_error() -> None:
    again = protocol.decode_error("NoSuchError 9 something broke")
    assert type(again) is errors.ErofsMountError and again.exit_code == 9 and str(again) == "something broke"


def _record_for(tmp_path: Path, image: Path) -> Path:
    from erofs_mount_core._plugins import PluginHost

    host = PluginHost()
    source = host.open_source("local", str(image), {})
    try:
        state = host.source_state("local", source)
    finally:
        source.close()
    store = rec.RecordStore(tmp_path / "run")
    store.ensure()
    path = store.new_path()
    store.write(path, rec.Record(
        format=rec.FORMAT, created=rec.now(), daemon_pid=0,
        device=rec.DeviceRecord(index=5, size=4096, block_size=512, connections=1, dead_timeout=60),
        source=rec.SourceRecord(scheme="local", location=str(image), description=str(image), plugin="local",
                                distribution="erofs-mount-local", state=state),
    ))
    return path


def test_spawn_raises_the_daemon_s_refusal_as_source_changed_error(tmp_path: Path) -> None:
    image = tmp_path / "app.erofs"
    image.write_bytes(os.urandom(4096))
    path = _record_for(tmp_path, image)
    image.unlink()
    image.write_bytes(os.urandom(4096))  # another file under the same name
    with pytest.raises(errors.SourceChangedError, match="is no longer the image that was mounted"):
        protocol.spawn("reattach", path)
    assert not protocol.daemon_alive(path), "the daemon that refused is gone, and its lock with it"
    assert path.exists(), "a refused reattach keeps the record"


@contextlib.contextmanager
def lock_held_elsewhere(record_path: Path) -> Iterator[None]:
    """Another process holds the record's lock, as a live daemon (or a command starting one) does."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(rec.lock_path(record_path))!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.communicate()


def test_a_held_lock_means_alive_and_spawn_refuses(tmp_path: Path) -> None:
    path = tmp_path / "nbd-x.toml"
    path.write_text("")
    assert not protocol.daemon_alive(path)
    with lock_held_elsewhere(path):
        assert protocol.daemon_alive(path)
        with pytest.raises(errors.DeviceStateError, match="alive and serving"):
            protocol.spawn("reattach", path)
    assert not protocol.daemon_alive(path)


def test_a_reattach_that_loses_to_umount_leaves_nothing_behind(tmp_path: Path) -> None:
    """``reattach --all`` listed the device, then ``umount`` removed its record and lock: the reattach
    starts no daemon, and neither its lock nor a log nor a failure note outlives the record."""
    image = tmp_path / "app.erofs"
    image.write_bytes(os.urandom(4096))
    path = _record_for(tmp_path, image)
    rec.RecordStore.remove(path)  # umount (disconnect, then remove), between the listing and the reattach
    with pytest.raises(errors.DeviceStateError, match="removed meanwhile"):
        protocol.spawn("reattach", path)
    with pytest.raises(errors.RecordError, match="does not exist"):
        lifecycle._attempt(5, path)  # nbd5 names no record here: no failure is noted for the next try
    assert sorted(p.name for p in path.parent.iterdir()) == []


def test_a_failure_is_noted_beside_a_record_that_is_there(tmp_path: Path) -> None:
    path = tmp_path / "nbd-z.toml"
    path.write_text("")
    backoff.note_failure(path, errors.SourceChangedError("changed"), now=100.0)
    failure = backoff.last_failure(path)
    assert failure is not None and failure.count == 1 and failure.why == "changed"


FORKING_COMMAND = """
import fcntl, json, os, sys
from pathlib import Path
from erofs_mount_core import _daemon_start as protocol

record, report, held = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
mountpoint = os.open(held, os.O_RDONLY | os.O_CLOEXEC)  # as mount holds the mountpoint's flock while it spawns
fcntl.flock(mountpoint, fcntl.LOCK_EX)
stray = os.open(held, os.O_RDONLY)  # a descriptor the command inherited (not close-on-exec)
os.set_inheritable(stray, True)

def serve(mode, record_path, ready_fd, lock_fd, host):
    fds = {n: os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{n}")}
    report.write_text(json.dumps({"environ": Path("/proc/self/environ").read_bytes().decode(errors="replace"),
                                  "os_environ": dict(os.environ), "path": sys.path, "fds": fds,
                                  "cwd": os.getcwd(), "lock_fd": lock_fd}))
    protocol.ReadyPipe(ready_fd).ready(3)
    return 0

with protocol.locked(record) as lock:
    print(protocol.ForkStarter(None, serve).start("connect", record, lock))
"""


def test_a_forked_daemon_keeps_none_of_the_command_s_descriptors_environment_or_import_path(tmp_path: Path) -> None:
    """mount and reattach fork their daemon: it must hold what an executed one holds, and no more."""
    secret = "pw-" + os.urandom(6).hex()
    record, report, held = tmp_path / "nbd-f.toml", tmp_path / "report.json", tmp_path / "mountpoint"
    record.write_text("")
    held.mkdir()
    evil = tmp_path / "evil"
    evil.mkdir()
    env = {**os.environ, "EROFS_MOUNT_OCI_PASSWORD": secret, "PYTHONPATH": str(evil)}
    out = subprocess.run([sys.executable, "-c", FORKING_COMMAND, str(record), str(report), str(held)],
                         capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "3", out
    seen = json.loads(report.read_text())
    assert secret not in seen["environ"], "/proc/PID/environ shows the command's credentials"
    shown = [f"PATH={protocol.SYSTEM_PATH}", *(f"{n}={env[n]}" for n in ("LANG", "LC_ALL", "TZ") if n in env)]
    assert seen["environ"].rstrip("\0").split("\0") == shown, "what an executed daemon's shows"
    assert seen["os_environ"]["EROFS_MOUNT_OCI_PASSWORD"] == secret, "the source needs them, in memory"
    assert "PYTHONPATH" not in seen["os_environ"] and seen["os_environ"]["PATH"] == protocol.SYSTEM_PATH
    assert str(evil) not in seen["path"] and "" not in seen["path"] and str(tmp_path) not in seen["path"]
    assert seen["cwd"] == "/"
    assert str(held) not in seen["fds"].values(), "the mountpoint's flock and the stray descriptor went along"
    assert seen["fds"][str(seen["lock_fd"])] == str(rec.lock_path(record))
    fd = os.open(held, os.O_RDONLY)
    try:  # the command has exited: nothing holds the mountpoint's flock any more
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_forked_daemon_that_cannot_hide_the_environment_says_so_and_never_serves(tmp_path: Path) -> None:
    """/proc/self/mem refused (a hardened kernel, a seccomp profile): the daemon must not serve with the
    caller's credentials showing, and the command must say why in one line, not 'exited without a word'."""
    record, report, held = tmp_path / "nbd-g.toml", tmp_path / "report.json", tmp_path / "mountpoint"
    record.write_text("")
    held.mkdir()
    command = FORKING_COMMAND.replace("with protocol.locked(record)", """
from erofs_mount_core import _detach
def refused(shown):
    raise PermissionError(13, "Permission denied", "/proc/self/mem")
_detach.rewrite_initial_environment = refused
from erofs_mount_core._errors import ErofsMountError
try:
    with protocol.locked(record) as lock:
        protocol.ForkStarter(None, serve).start("connect", record, lock)
except ErofsMountError as exc:
    sys.exit(str(exc))
with protocol.locked(record)""", 1)
    out = subprocess.run([sys.executable, "-c", command, str(record), str(report), str(held)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and not report.exists(), out
    assert out.stderr.strip().splitlines() == [
        "the forked daemon could not detach: [Errno 13] Permission denied: '/proc/self/mem'"], out


def test_a_daemon_given_another_lock_refuses_to_serve(tmp_path: Path) -> None:
    path = tmp_path / "nbd-y.toml"
    rec.lock_path(path).write_text("")
    other = os.open(tmp_path / "other.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(errors.KernelError, match="with a lock that is not"):
            protocol.check_lock(other, path)
    finally:
        os.close(other)


def _plant_a_plugin(where: Path, marker: Path) -> None:
    """A *.dist-info with an erofs_mount entry point, and its module, as an attacker would leave them."""
    info = where / "evil-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[erofs_mount]\nevil = evil_plugin\n")
    (where / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('ran as root')\n")


def test_the_daemon_runs_no_code_from_the_caller_s_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "app.erofs"
    image.write_bytes(os.urandom(4096))
    path = _record_for(tmp_path, image)
    image.write_bytes(os.urandom(4096))  # the daemon will refuse: it gets as far as loading plugins
    planted, marker = tmp_path / "cwd", tmp_path / "marker"
    planted.mkdir()
    _plant_a_plugin(planted, marker)
    monkeypatch.chdir(planted)
    with pytest.raises(errors.SourceChangedError):
        protocol.spawn("reattach", path)
    assert not marker.exists(), "the daemon imported a module from the directory it was started in"


def test_the_plugin_host_ignores_the_working_directory(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _plant_a_plugin(tmp_path, marker)
    code = "from erofs_mount_core._plugins import PluginHost; print(sorted(i.name for i in PluginHost().plugins))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "evil" not in out.stdout and "local" in out.stdout
    assert not marker.exists()


def test_the_daemon_s_environment(monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setenv("PATH", "/home/user/bin:/usr/bin")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("PYTHONPATH", "/tmp")
    monkeypatch.setenv("EROFS_MOUNT_OCI_PASSWORD", "s3cret")
    executed = protocol.exec_environment()
    assert executed["PATH"] == protocol.SYSTEM_PATH and "s3cret" not in executed.values()
    assert not {"LD_PRELOAD", "PYTHONPATH", "EROFS_MOUNT_OCI_PASSWORD"} & set(executed)
    passed = protocol.passed_environment()
    assert passed["EROFS_MOUNT_OCI_PASSWORD"] == "s3cret"
    assert not {"PATH", "LD_PRELOAD", "PYTHONPATH"} & set(passed)
    monkeypatch.delenv("EROFS_MOUNT_OCI_PASSWORD")
    protocol.receive_environment(json.dumps({**passed, "LD_AUDIT": "x", "PATH": "/tmp"}).encode())
    assert os.environ["EROFS_MOUNT_OCI_PASSWORD"] == "s3cret"
    assert "LD_AUDIT" not in os.environ and os.environ["PATH"] == "/home/user/bin:/usr/bin"


ENDING_DAEMON = r"""
import fcntl, os, signal, sys, time
from pathlib import Path
record, lock = Path(sys.argv[1]), Path(sys.argv[2])
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
ending = []
signal.signal(signal.SIGUSR1, lambda *_: ending.append(1))
print("holding", flush=True)
while not ending:
    time.sleep(0.01)
record.unlink()  # as the daemon ends: its files removed, its lock freed...
lock.unlink()
os.close(fd)
time.sleep(1.5)  # ...and its process still there a while (an interpreter's exit, on a slow machine)
"""


def test_umount_returns_once_the_daemon_s_process_is_gone_not_only_its_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon frees its lock and removes its files before its process ends: ``umount`` waits for the
    process, so nothing is left running when it returns. (The disconnect, the kernel's part, is the signal
    that starts the daemon's end here; the kernel tests check that no daemon is left after each test.)"""
    import attrs

    from erofs_mount_core import _lifecycle

    image = tmp_path / "app.erofs"
    image.write_bytes(os.urandom(4096))
    path = _record_for(tmp_path, image)
    daemon = subprocess.Popen([sys.executable, "-c", ENDING_DAEMON, str(path), str(rec.lock_path(path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().strip() == "holding"
        store = rec.RecordStore(path.parent)
        store.write(path, attrs.evolve(store.read(path), daemon_pid=daemon.pid))
        monkeypatch.setattr(_lifecycle, "disconnect_any", lambda index: daemon.send_signal(signal.SIGUSR1))
        _lifecycle._disconnect_and_wait(5, path)
        assert daemon.poll() is not None, "umount returned while the daemon's process was still there"
        assert not path.exists() and not rec.lock_path(path).exists()
    finally:
        daemon.kill()
        daemon.communicate()
