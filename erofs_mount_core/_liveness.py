"""Liveness: whether a device's daemon still serves, and ending one that does not.

A daemon that holds its record's lock but does not serve (stopped, deadlocked,
stuck on a source that stopped answering mid-body) keeps its device's reads
waiting, and a plain ``reattach`` leaves it alone. The probe asks it over its
control socket: a daemon that does not answer within ``PROBE_TIMEOUT``, or
that has had one request in its hands for longer than ``stuck_after``
seconds, fails it. ``reattach --force`` and ``watch`` then end it with
SIGKILL (after checking that the process is the one holding the record's
lock), and the kernel's held reads go to the daemon that replaces it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from . import _record as rec
from ._control import ask_stats
from ._daemon_start import daemon_alive
from ._errors import DeviceStateError
from ._systemd import STUCK_REQUEST

#: how long a daemon has to answer the probe
PROBE_TIMEOUT = 5.0
#: the default threshold for a request in a daemon's hands (what systemd's watchdog uses too)
STUCK_AFTER = STUCK_REQUEST
#: how long a killed daemon has to let go of its lock
END_TIMEOUT = 5.0


def probe(record_path: Path, stuck_after: float = STUCK_AFTER) -> str | None:
    """Why the daemon of ``record_path`` fails its liveness probe, or None if it passes."""
    try:
        stats = ask_stats(record_path, timeout=PROBE_TIMEOUT)
    except DeviceStateError as exc:
        return f"does not answer its control socket within {PROBE_TIMEOUT:.0f} s ({exc})"
    oldest = float(stats.get("oldest_request_seconds") or 0.0)
    if oldest > stuck_after:
        return f"has had a request in its hands for {oldest:.0f} s (more than {stuck_after:g} s)"
    return None


def end(record_path: Path, pid: int) -> None:
    """SIGKILL ``pid``, which must hold the record's lock, and wait until the lock is free."""
    if not holds_lock(pid, record_path):
        raise DeviceStateError(f"process {pid} does not hold {rec.lock_path(record_path)}: not ending it")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + END_TIMEOUT
    while daemon_alive(record_path):
        if time.monotonic() > deadline:
            raise DeviceStateError(f"its daemon {pid} was killed but its lock is still held after "
                                   f"{END_TIMEOUT:.0f} s")
        time.sleep(0.02)


def holds_lock(pid: int, record_path: Path) -> bool:
    """Whether process ``pid`` has the record's lock file open (the daemon keeps it open to hold the lock)."""
    lock = str(rec.lock_path(record_path))
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == lock:
                return True
        except OSError:
            continue
    return False
