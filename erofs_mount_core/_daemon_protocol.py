"""The daemon protocol: how a command starts a serving daemon and hears from it.

Both sides live here, so they cannot drift apart:

- the record's lock (``<record>.lock``, flock): taken by the command, inherited
  by the daemon, held for the daemon's life. A held lock means a live daemon,
  whatever its pid; ``daemon_alive`` is the probe.
- ``spawn``: the command's side. Starts ``python -I -m erofs_mount_core._daemon``
  in its own session, in ``/``, with the lock and the write end of the ready
  pipe, and waits for its one line.
- the environment: the daemon is executed with a fixed, minimal one (a
  system ``PATH``, the locale) and receives the caller's variables, which a
  source may need (credentials named in its record, proxies, CA files),
  through its standard input. They live in its memory only, never in
  ``/proc/PID/environ``, and no ``PATH``, ``LD_*`` or ``PYTHON*`` of the
  caller's reaches a program the daemon runs.
- ``ReadyPipe``: the daemon's side. Writes that line once: ``READY <index>``,
  or ``ERROR <class> <exit code> <message>``. ``spawn`` raises the same
  ``ErofsMountError`` subclass again, so a caller can catch
  ``SourceChangedError`` whichever process raised it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from . import _errors as errors
from . import _record as rec

READY = "READY"
ERROR = "ERROR"
MODES = ("connect", "reattach", "take-over")
DAEMON_MODULE = "erofs_mount_core._daemon"
#: how long a command waits for its daemon's line (imports are slow on small VMs)
READY_TIMEOUT = 120.0
#: the daemon's PATH, whoever started it: root runs no program from a directory the caller chose
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- the lock ----------------------------------------------------------------------


@contextlib.contextmanager
def locked(record_path: Path) -> Iterator[int]:
    """Take the record's daemon lock for a daemon about to start; DeviceStateError if one lives.

    The command closes its descriptor on leaving; the daemon keeps its inherited copy, and with it the lock.
    A lock file removed while we waited (its record went with it) is no lock: DeviceStateError.
    """
    path = rec.lock_path(record_path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # ELOOP: a symlink where our lock should be
        raise errors.RecordError(f"cannot open the lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.DeviceStateError("its daemon is alive and serving: nothing to do") from None
        if not _same_file(fd, path):
            raise errors.DeviceStateError("its record was removed meanwhile (the device was disconnected)")
        yield fd
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def daemon_alive(record_path: Path) -> bool:
    """True while some process holds the record's lock (its daemon, or a command starting one)."""
    try:
        fd = os.open(rec.lock_path(record_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # missing, or not ours to follow: no daemon holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def check_lock(lock_fd: int, record_path: Path) -> None:
    """The daemon's check that ``lock_fd`` is its record's lock, and held: else it must not serve."""
    try:
        held, named = os.fstat(lock_fd), os.stat(rec.lock_path(record_path))
    except OSError as exc:
        raise errors.KernelError(f"daemon started without its lock ({exc.strerror})") from None
    if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
        raise errors.KernelError(f"daemon started with a lock that is not {rec.lock_path(record_path)}")
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op for the holder's own descriptor
    except BlockingIOError:
        raise errors.DeviceStateError("another daemon holds this record's lock") from None


# -- the command's side ----------------------------------------------------------


def spawn(mode: str, record_path: Path, forked: Forked | None = None) -> int:
    """Start a daemon for ``record_path`` under its lock; return the device index it reports.

    Raises DeviceStateError if a daemon already holds the lock, or whatever
    the daemon reported (the same class). With ``forked``, the daemon is a
    fork of this process instead of a new interpreter (``watch``).
    """
    with locked(record_path) as lock_fd:
        if forked is not None:
            return _fork(mode, record_path, lock_fd, forked)
        return _start(mode, record_path, lock_fd)


@attrs.frozen
class Forked:
    """How ``watch`` starts daemons: as forks of itself, which has the code and plugins loaded,
    so a reattach does not wait seconds for an interpreter to start and import (on a slow machine)."""

    host: Any
    """The loaded ``PluginHost``."""
    hidden_fds: tuple[int, ...] = ()
    """This process's descriptors the daemon must not keep (the event socket): /dev/null takes their place."""


def _fork(mode: str, record_path: Path, lock_fd: int, forked: Forked) -> int:
    """The daemon in a grandchild of this process (the child exits at once: no zombie is left behind)."""
    ready_r, ready_w = os.pipe()
    logf = os.open(rec.log_path(record_path),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the fork; the kernel tests cover it
        code = 1
        try:
            os.close(ready_r)
            if os.fork() == 0:
                _become_daemon(logf, forked.hidden_fds)
                from . import _daemon

                code = _daemon.serve(mode, record_path, ready_w, lock_fd, forked.host)
            else:
                code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(logf)
    os.waitpid(child, 0)
    return _answer(ready_r, record_path)


def _become_daemon(logf: int, hidden_fds: tuple[int, ...]) -> None:  # pragma: no cover - in the fork
    """What ``_start`` gives a new daemon, given to a fork: own session, ``/``, the log, a clean environment."""
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in hidden_fds:
        os.dup2(null, fd)
    os.dup2(null, 0)
    os.dup2(logf, 1)
    os.dup2(logf, 2)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    environment = {**passed_environment(), **exec_environment()}  # what a spawned daemon's memory holds
    os.environ.clear()
    os.environ.update(environment)


def spawn_taker(record_path: Path) -> int:
    """Start a daemon that takes the device over from its running one (``restart``); return its index.

    No lock is taken here: the running daemon holds it and hands it over with the connections.
    """
    return _start("take-over", record_path, None)


def _start(mode: str, record_path: Path, lock_fd: int | None) -> int:
    ready_r, ready_w = os.pipe()
    lock_args, fds = (["--lock-fd", str(lock_fd)], (ready_w, lock_fd)) if lock_fd is not None else ([], (ready_w,))
    logf = os.open(rec.log_path(record_path),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # -I: no PYTHON* variables, no user site, and not the caller's directory on sys.path; cwd /:
        # nothing where root happens to run mount or reattach is imported by the daemon
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", DAEMON_MODULE, mode, str(record_path),
             "--ready-fd", str(ready_w), *lock_args],
            stdin=subprocess.PIPE, stdout=logf, stderr=logf, cwd="/", env=exec_environment(),
            pass_fds=fds, start_new_session=True, close_fds=True,
        )
    finally:
        os.close(ready_w)
        os.close(logf)
    assert proc.stdin is not None
    try:
        proc.stdin.write(json.dumps(passed_environment()).encode())
        proc.stdin.close()
    except BrokenPipeError:  # it died at once: its line (or its silence) says why
        pass
    return _answer(ready_r, record_path, proc)


def _answer(ready_r: int, record_path: Path, proc: subprocess.Popen[bytes] | None = None) -> int:
    """The index the daemon's line reports, or its error raised; a silent daemon ``proc`` is ended."""
    try:
        line = _read_line(ready_r, READY_TIMEOUT)
    finally:
        os.close(ready_r)
    word, _, rest = line.partition(" ")
    if word == READY:
        return int(rest)
    status = ""
    if proc is not None:
        if proc.poll() is None and not line:
            proc.kill()
        status = f" (status {proc.wait()})"
    if word == ERROR:
        raise decode_error(rest)
    raise errors.KernelError(f"the serving daemon exited without a word{status}; see {rec.log_path(record_path)}")


def exec_environment() -> dict[str, str]:
    """What the daemon is executed with: nothing secret, nothing that changes what runs."""
    env = {"PATH": SYSTEM_PATH}
    for name in ("LANG", "LC_ALL", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def passed_environment() -> dict[str, str]:
    """The caller's variables that reach the daemon's memory (``os.environ``) through its stdin."""
    return {k: v for k, v in os.environ.items()
            if k != "PATH" and not k.startswith(("LD_", "PYTHON"))}


def receive_environment(stream: BinaryIO) -> None:
    """The daemon's side: take the caller's variables into ``os.environ``, not into /proc/PID/environ."""
    try:
        passed = json.loads(stream.read() or b"{}")
    except ValueError:
        return
    if isinstance(passed, dict):
        os.environ.update({k: v for k, v in passed.items() if isinstance(k, str) and isinstance(v, str)
                           and k != "PATH" and not k.startswith(("LD_", "PYTHON"))})


def _read_line(fd: int, timeout: float) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def encode_error(exc: errors.ErofsMountError) -> str:
    message = str(exc).replace("\n", " ")
    return f"{type(exc).__name__} {exc.exit_code} {message}"


def decode_error(text: str) -> errors.ErofsMountError:
    """The exception ``encode_error`` described: its class if the core defines it, its code and message."""
    name, _, rest = text.partition(" ")
    code, _, message = rest.partition(" ")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ErofsMountError)):
        cls = errors.ErofsMountError
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if code.isdigit():
        exc.exit_code = int(code)
    return exc


# -- the daemon's side --------------------------------------------------------------


class ReadyPipe:
    """The daemon's one line to the command that started it."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "w")

    def ready(self, index: int) -> None:
        self._write(f"{READY} {index}")

    def failed(self, exc: errors.ErofsMountError) -> None:
        self._write(f"{ERROR} {encode_error(exc)}")

    def _write(self, line: str) -> None:
        if self._file.closed:
            return
        try:
            self._file.write(line + "\n")
            self._file.close()
        except BrokenPipeError:  # the command gave up waiting
            pass
