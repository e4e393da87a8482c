"""What a daemon forked from a command keeps of it: nothing but what an executed daemon would get.

A fork inherits the command's descriptors (the mountpoint's flock, a
caller's pipe), its environment (credentials a source needs, ``PYTHONPATH``)
and its import path (the caller's directory). ``detach`` gives the fork what
``python -I`` in ``/`` with a clean environment gives an executed daemon: its
own session, ``/``, the log on stdout and stderr, ``/dev/null`` in place of
every other descriptor (their numbers stay taken: an object of the command
may hold one and close it one day), ``-I``'s import path, the environment
the daemon is meant to have in ``os.environ``, and the environment block the
command was executed with (``/proc/PID/environ``, for the life of the
process) overwritten.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path


def detach(logf: int, keep: tuple[int | None, ...], environment: Mapping[str, str],
           shown: Mapping[str, str]) -> None:  # pragma: no cover - in the fork; tests/core/test_daemon_start.py
    """Make this fork a daemon that keeps ``keep`` and the log ``logf`` of its command, with ``environment``
    in ``os.environ`` and ``shown`` in ``/proc/PID/environ``."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in _open_descriptors():
        if fd > 2 and fd not in (*keep, logf, null):
            os.dup2(null, fd, inheritable=False)
    os.dup2(null, 0)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    sys.path[:] = isolated_import_path(sys.path, os.environ.get("PYTHONPATH", ""))
    os.environ.clear()
    os.environ.update(environment)
    rewrite_initial_environment(shown)


def _open_descriptors() -> list[int]:
    fds = [int(name) for name in os.listdir("/proc/self/fd")]
    return [fd for fd in fds if _is_open(fd)]  # (the listing's own descriptor is closed by now)


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def isolated_import_path(path: list[str], pythonpath: str) -> list[str]:
    """``path`` as ``python -I`` would have it: not the script's directory nor the working directory
    (the first entry of a command's path), nor ``PYTHONPATH``'s, nor relative entries."""
    from_env = {os.path.abspath(p) for p in pythonpath.split(os.pathsep) if p}
    return [p for p in path[1:] if p and os.path.isabs(p) and os.path.abspath(p) not in from_env]


def rewrite_initial_environment(shown: Mapping[str, str]) -> None:
    """Overwrite the environment the command was executed with, which ``/proc/PID/environ`` shows for the
    life of the process (a fork's too), with ``shown`` and NULs: the caller's credentials live in
    ``os.environ`` only. The daemon ends if it cannot: it would otherwise show them."""
    stat = Path("/proc/self/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    start, end = int(fields[47]), int(fields[48])  # env_start and env_end, proc(5)'s fields 50 and 51
    text = b"".join(f"{name}={value}".encode() + b"\0" for name, value in shown.items())
    if len(text) > end - start:
        text = b""  # (a command executed with less than that: NULs alone)
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(text + b"\0" * (end - start - len(text)))
