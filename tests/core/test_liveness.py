"""The liveness probe and ending a hung daemon (``reattach --force``, ``watch``), below the kernel.

The kernel-side counterparts: tests/vm/test_chaos.py (a SIGSTOPped daemon, a daemon stuck on a
registry that stopped mid-body, each with reads held across the replacement).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erofs_mount_core import _liveness as liveness
from erofs_mount_core import _record as rec
from erofs_mount_core._control import ControlServer
from erofs_mount_core._errors import DeviceStateError


@pytest.fixture
def record_path(tmp_path: Path) -> Path:
    path = tmp_path / "nbd-test.toml"
    path.write_text("")
    return path


def serving(record_path: Path, oldest: float) -> ControlServer:
    return ControlServer(record_path, stats=lambda: {"pid": 1, "oldest_request_seconds": oldest},
                         hand_over=lambda: (0, [], {}), resume=lambda: None, handed=lambda: None)


def test_a_daemon_that_answers_with_no_old_request_passes(record_path: Path) -> None:
    server = serving(record_path, 0.5)
    try:
        assert liveness.probe(record_path, stuck_after=10) is None
    finally:
        server.close()


def test_a_request_in_a_daemon_s_hands_past_the_threshold_fails_it(record_path: Path) -> None:
    server = serving(record_path, 42.0)
    try:
        why = liveness.probe(record_path, stuck_after=10)
    finally:
        server.close()
    assert why == "has had a request in its hands for 42 s (more than 10 s)"


def test_a_daemon_that_does_not_answer_fails_within_the_probe_timeout(record_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "PROBE_TIMEOUT", 0.3)
    stopped = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, as a stopped daemon's socket does
    stopped.bind(str(rec.control_path(record_path)))
    stopped.listen(1)
    try:
        started = time.monotonic()
        why = liveness.probe(record_path)
        assert time.monotonic() - started < 2
    finally:
        stopped.close()
    assert why is not None and why.startswith("does not answer its control socket")
    rec.control_path(record_path).unlink()
    assert "does not answer" in (liveness.probe(record_path) or ""), "no socket at all: no answer either"


def holder(record_path: Path) -> subprocess.Popen[bytes]:
    """A process that holds the record's lock, as a daemon does, and then does nothing."""
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(rec.lock_path(record_path))!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
    proc.stdout.close()
    return proc


def test_end_kills_the_lock_holder_and_returns_once_the_lock_is_free(record_path: Path) -> None:
    proc = holder(record_path)
    from erofs_mount_core._daemon_start import daemon_alive

    assert daemon_alive(record_path)
    liveness.end(record_path, proc.pid)
    assert proc.wait(5) == -9 and not daemon_alive(record_path)


def test_end_refuses_a_process_that_does_not_hold_the_lock(record_path: Path) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    proc = holder(record_path)
    try:
        with pytest.raises(DeviceStateError, match=f"process {bystander.pid} does not hold"):
            liveness.end(record_path, bystander.pid)
        assert bystander.poll() is None, "a process that is not the daemon is never killed"
    finally:
        for p in (bystander, proc):
            p.kill()
            p.wait()
