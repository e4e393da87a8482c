"""The systemd side of a daemon, on the host: its service's settings, the channel it starts from, sd_notify.

The kernel test with systemd as PID 1 (tests/vm/test_systemd.py) runs the
real thing; these check each piece alone, against real sockets, a real lock
and a real daemon process.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from erofs_mount_core import _daemon_start as protocol
from erofs_mount_core import _errors as errors
from erofs_mount_core import _logging
from erofs_mount_core import _systemd as systemd
from erofs_mount_core._daemon import Daemon
from tests.core.test_daemon_start import _record_for

#: stands in for systemd-run: keeps its arguments, then runs the command with only the --setenv variables
FAKE_SYSTEMD_RUN = """#!/bin/sh
printf '%s\\n' "$@" > "$0.args"
env=""
while [ "$1" != "--" ]; do
    case $1 in --setenv=*) env="$env ${1#--setenv=}" ;; esac
    shift
done
shift
exec env -i $env "$@"
"""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_service_settings_are_valid_unit_settings(tmp_path: Path) -> None:
    argv = systemd.run_command("/usr/bin/systemd-run", "erofs-mountd-nbd-0a1b-c2d3.service", "d",
                               {"PATH": protocol.SYSTEM_PATH}, [sys.executable, "-V"], start_timeout=130)
    properties = [a.removeprefix("--property=") for a in argv if a.startswith("--property=")]
    unit = tmp_path / "erofs-mountd-nbd-0a1b-c2d3.service"
    unit.write_text("[Service]\n" + "\n".join(p for p in properties if not p.startswith("DefaultDependencies"))
                    + f"\nExecStart={sys.executable} -V\n[Unit]\nDefaultDependencies=no\n")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and "erofs-mountd" not in result.stderr, result.stderr
    assert {"Type=notify", "NotifyAccess=main", "WatchdogSec=30"} <= set(properties)


def test_no_systemd_when_it_does_not_run_the_machine_or_is_declined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(systemd.SETTING, "no")
    assert systemd.systemd_run(protocol.SYSTEM_PATH) is None
    monkeypatch.delenv(systemd.SETTING)
    assert (systemd.systemd_run(protocol.SYSTEM_PATH) is None) == (not os.path.isdir("/run/systemd/system"))


def test_a_service_daemon_refuses_through_its_channel_and_leaves_nothing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole start of a service daemon, with a stand-in for systemd-run: the daemon is a real process that
    receives the lock and the environment on the channel and reports its refusal there."""
    fake = tmp_path / "systemd-run"
    fake.write_text(FAKE_SYSTEMD_RUN)
    fake.chmod(0o755)
    monkeypatch.setattr(systemd, "systemd_run", lambda path: str(fake))
    monkeypatch.setenv("EROFS_MOUNT_OCI_PASSWORD", "s3cret")
    image = tmp_path / "app.erofs"
    image.write_bytes(os.urandom(4096))
    path = _record_for(tmp_path, image)
    image.unlink()
    image.write_bytes(os.urandom(4096))  # another file under the same name
    with pytest.raises(errors.SourceChangedError, match="is no longer the image that was mounted"):
        protocol.spawn("reattach", path)
    assert not protocol.daemon_alive(path), "the daemon that refused is gone, and its lock with it"
    assert sorted(p.suffix for p in path.parent.iterdir()) == [".lock", ".toml"], "no channel, no log file"
    args = Path(f"{fake}.args").read_text().splitlines()
    assert "--property=Type=notify" in args and f"--setenv=PATH={protocol.SYSTEM_PATH}" in args
    assert any(a.startswith("--unit=erofs-mountd-" + path.stem) for a in args)
    assert not any("s3cret" in a for a in args), "a secret would be in the unit's settings"


def test_a_systemd_that_cannot_be_reached_is_one_line_that_says_how_to_do_without(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a container that sees /run/systemd/system but not systemd's socket."""
    fake = tmp_path / "systemd-run"
    fake.write_text("#!/bin/sh\necho 'Failed to connect to bus: No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(systemd, "systemd_run", lambda path: str(fake))
    image = tmp_path / "app.erofs"
    image.write_bytes(os.urandom(4096))
    path = _record_for(tmp_path, image)
    with pytest.raises(errors.KernelError) as caught:
        protocol.spawn("reattach", path)
    assert re.fullmatch(rf"systemd did not start the daemon's service erofs-mountd-{path.stem}-[0-9a-f]{{4}}\.service: "
                        rf"Failed to connect to bus: No such file or directory \({systemd.SETTING}=no starts daemons "
                        r"without systemd\)", str(caught.value)), str(caught.value)
    assert not protocol.daemon_alive(path) and sorted(p.suffix for p in path.parent.iterdir()) == [".lock", ".toml"]


def test_the_channel_gives_the_lock_and_environment_and_takes_the_line(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    channel = tmp_path / "x.start"
    lock = os.open(tmp_path / "x.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(channel))
    listener.listen(1)
    line: list[str] = []

    def command() -> None:
        conn, _ = listener.accept()
        passed = {"EROFS_MOUNT_TOKEN": "t0ken", "NOTIFY_SOCKET": "/run/caller-service", "LD_PRELOAD": "x.so"}
        socket.send_fds(conn, [json.dumps(passed).encode()], [lock])
        conn.shutdown(socket.SHUT_WR)
        with conn, conn.makefile() as answer:
            line.append(answer.readline())

    monkeypatch.delenv("EROFS_MOUNT_TOKEN", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    thread = threading.Thread(target=command)
    thread.start()
    ready_fd, lock_fd = protocol.receive_start(channel)
    assert lock_fd is not None and os.fstat(lock_fd).st_ino == os.fstat(lock).st_ino
    assert os.environ["EROFS_MOUNT_TOKEN"] == "t0ken"
    assert "NOTIFY_SOCKET" not in os.environ and "LD_PRELOAD" not in os.environ
    protocol.ReadyPipe(ready_fd).ready(7)
    thread.join(10)
    listener.close()
    os.close(lock)
    os.close(lock_fd)
    assert line == ["READY 7\n"]
    monkeypatch.delenv("EROFS_MOUNT_TOKEN")


def test_systemd_s_variables_never_reach_a_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mount`` run from a Type=notify service: its daemon must not speak for that service."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "INVOCATION_ID", "JOURNAL_STREAM"):
        monkeypatch.setenv(name, "1")
    assert not set(systemd.SERVICE_VARIABLES) & set(protocol.passed_environment())


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"erofs-mount-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with sock:
        yield sock


def test_the_watchdog_is_pinged_while_serving_is_healthy_and_not_while_a_request_is_stuck(
        notify_socket: socket.socket, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    service = systemd.Service()
    assert service.watchdog == 0.2 and "NOTIFY_SOCKET" not in os.environ, "read once, passed on to no one"
    r, w = os.pipe()
    daemon = Daemon(tmp_path / "nbd-00.toml", protocol.ReadyPipe(w), service=service)
    connection = daemon.stats.connection()
    service.notify("READY=1")
    assert notify_socket.recv(100) == b"READY=1"
    pinger = threading.Thread(target=daemon._watchdog, args=(0.02,))
    pinger.start()
    assert notify_socket.recv(100) == b"WATCHDOG=1"
    connection.started = time.monotonic_ns() - int((systemd.STUCK_REQUEST + 1) * 1e9)  # one request, stuck
    with caplog.at_level(logging.ERROR, logger="erofs_mount.daemon"):
        time.sleep(0.1)
        while select.select([notify_socket], [], [], 0)[0]:  # what was sent before it noticed
            notify_socket.recv(100)
        time.sleep(0.2)
        assert not select.select([notify_socket], [], [], 0)[0], "a ping while a request is stuck"
    assert daemon.stuck() == 1
    assert [r.message for r in caplog.records].count(
        f"1 request(s) stuck for more than {systemd.STUCK_REQUEST:.0f} s: no watchdog ping, "
        "systemd will end this daemon") == 1
    connection.started = 0  # it finished: the pings come back
    assert notify_socket.recv(100) == b"WATCHDOG=1"
    daemon.finished.set()
    pinger.join(5)
    assert not pinger.is_alive()
    daemon.ready.ready(0)  # closes its end
    os.close(r)


def test_journal_lines_carry_their_priority() -> None:
    stream = io.StringIO()
    root, ours = logging.getLogger(), logging.getLogger(_logging.OUR_LOGGERS)
    saved = root.handlers[:], root.level, ours.level
    try:
        _logging.configure(stream, "%(levelname)s %(name)s: %(message)s", journal=True)
        log = logging.getLogger("erofs_mount.daemon")
        log.info("serving nbd0 from https://h/p?X-Amz-Signature=abc")
        log.warning("slow")
        log.error("failed")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        ours.setLevel(saved[2])
    assert stream.getvalue().splitlines() == [
        "<6>INFO erofs_mount.daemon: serving nbd0 from https://h/p?…",
        "<4>WARNING erofs_mount.daemon: slow",
        "<3>ERROR erofs_mount.daemon: failed",
    ]


def test_a_daemon_names_its_own_service_from_its_cgroup() -> None:
    assert systemd.unit_of_this_process() is None  # a test is in no erofs-mountd service
    name = systemd.unit_name(Path("/run/erofs-mount/nbd-0a1b2c3d4e5f.toml"))
    assert name.startswith("erofs-mountd-nbd-0a1b2c3d4e5f-") and name.endswith(".service")


def test_a_connection_that_ended_is_never_counted_stuck() -> None:
    """A connection the kernel closed (EOF where a request would start) leaves no request open behind it:
    a daemon serving on with its other connections must not miss its watchdog pings for it."""
    from erofs_mount_core._metrics import ConnectionStats
    from erofs_mount_core._nbd.transmission import Disk, transmit
    from tests.core.test_transmission import DATA, BytesSource

    ours, theirs = socket.socketpair()
    theirs.close()
    stats = ConnectionStats()
    with ours:
        assert transmit(ours, Disk(BytesSource(DATA)), stats=stats) == "closed"
    assert stats.started == 0
