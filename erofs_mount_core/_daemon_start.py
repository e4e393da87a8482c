"""The daemon protocol: how a command starts a serving daemon and hears from it.

Both sides live here, so they cannot drift apart:

- the record's lock (``<record>.lock``, flock): taken by the command, inherited
  by the daemon, held for the daemon's life. A held lock means a live daemon,
  whatever its pid; ``daemon_alive`` is the probe.
- ``spawn``: the command's side. Starts the daemon (a fork of the command,
  which has its code and plugins loaded, or ``python -I -m
  erofs_mount_core._daemon``) in its own session, in ``/``, with the lock and
  the write end of the ready pipe, and waits for its one line. When systemd runs the machine, the
  daemon is started by systemd instead, as a transient service of its own
  (``_systemd``), so it inherits nothing: it connects to a channel socket
  the command made beside the record, and receives the environment and the
  lock there (SCM_RIGHTS); its one line comes back on the same socket.
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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import attrs

from . import _errors as errors
from . import _record as rec
from . import _systemd as systemd
from ._control import peer_uid
from ._detach import detach
from ._kill_points import kill_point

READY = "READY"
ERROR = "ERROR"
MODES = ("connect", "reattach", "take-over")
DAEMON_MODULE = "erofs_mount_core._daemon"
#: how long a command waits for its daemon's line (imports are slow on small VMs)
READY_TIMEOUT = 120.0
#: the daemon's PATH, whoever started it: root runs no program from a directory the caller chose
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the most a daemon reads from its channel: the caller's environment
MAX_START = 1 << 20


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
            raise errors.AlreadyServing("its daemon is alive and serving: nothing to do") from None
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
        fd = os.open(rec.lock_path(record_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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


class Starter(Protocol):
    """One way to start a daemon for a record, under its lock: it returns the device index the daemon
    reports, or raises what the daemon reported (``_answer``)."""

    def start(self, mode: str, record_path: Path, lock_fd: int | None) -> int: ...


def spawn(mode: str, record_path: Path, starter: Starter | None = None, lock_fd: int | None = None) -> int:
    """Start a daemon for ``record_path`` under its lock; return the device index it reports.

    Raises DeviceStateError if a daemon already holds the lock, or whatever
    the daemon reported (the same class). ``starter``: how (by default a
    service of its own under systemd, else a new interpreter; commands that
    have their plugins loaded fork themselves: ``ForkStarter``). ``lock_fd``: the caller holds the lock already
    (``mount``, from before its record exists).
    """
    starter = starter or default_starter()
    if lock_fd is not None:
        return starter.start(mode, record_path, lock_fd)
    with locked(record_path) as held:
        if not record_path.exists():  # removed (umount) before we took the lock: the lock is one we made
            rec.lock_path(record_path).unlink(missing_ok=True)
            raise errors.DeviceStateError("its record was removed meanwhile (the device was disconnected)")
        return starter.start(mode, record_path, held)


def default_starter(fork: ForkStarter | None = None) -> Starter:
    """A service of its own when systemd runs this machine, else ``fork`` (a command that has its code and
    plugins loaded forks the daemon) or a new interpreter."""
    run = systemd.systemd_run(SYSTEM_PATH)
    if run is not None:
        return ServiceStarter(run)
    return fork or ExecStarter()


@attrs.frozen
class ForkStarter:
    """How ``mount``, ``reattach`` and ``watch`` start daemons outside systemd: as forks of themselves,
    which have the code and plugins loaded, so a reattach's held reads do not wait seconds for an
    interpreter to start and import (on a small machine). The fork keeps none of the command's
    descriptors, environment or import path (``_detach``)."""

    host: Any
    """The loaded ``PluginHost``."""
    serve: Any
    """The daemon: ``serve(mode, record_path, ready_fd, lock_fd, host)`` -> exit code (``_daemon.serve``)."""

    def start(self, mode: str, record_path: Path, lock_fd: int | None) -> int:
        assert lock_fd is not None, "a fork takes the lock its parent holds"
        return _fork(mode, record_path, lock_fd, self)


@attrs.frozen
class ExecStarter:
    """A new interpreter (``-I``, in ``/``, in a session of its own), its log beside the record: how
    ``restart`` brings in the installed code."""

    def start(self, mode: str, record_path: Path, lock_fd: int | None) -> int:
        return _exec(mode, record_path, lock_fd)


@attrs.frozen
class ServiceStarter:
    """A transient systemd service of its own, through ``systemd-run`` (``run``): what a child would
    inherit, it receives on a channel in the run directory."""

    run: str

    def start(self, mode: str, record_path: Path, lock_fd: int | None) -> int:
        return _start_service(self.run, mode, record_path, lock_fd)


def _fork(mode: str, record_path: Path, lock_fd: int, forked: ForkStarter) -> int:
    """The daemon in a grandchild of this process (the child exits at once: no zombie is left behind)."""
    ready_r, ready_w = os.pipe()
    logf = os.open(rec.log_path(record_path),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    for stream in (sys.stdout, sys.stderr):  # what the command has not written yet is not the daemon's
        with contextlib.suppress(Exception):
            stream.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the fork; the kernel tests cover it
        code = 1
        try:
            os.close(ready_r)
            if os.fork() == 0:
                environment = {**passed_environment(), **exec_environment()}  # what an executed one holds
                try:
                    detach(logf, (ready_w, lock_fd), environment, shown=exec_environment())
                except OSError as exc:  # (its one line, not a silent end: the command says it)
                    ReadyPipe(ready_w).failed(errors.KernelError(f"the forked daemon could not detach: {exc}"))
                    raise
                code = forked.serve(mode, record_path, ready_w, lock_fd, forked.host)
            else:
                code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(logf)
    os.waitpid(child, 0)
    kill_point(f"spawn-{mode}:started")
    return _answer(ready_r, ForkedDaemon(record_path))


def spawn_taker(record_path: Path) -> int:
    """Start a daemon that takes the device over from its running one (``restart``); return its index.

    No lock is taken here: the running daemon holds it and hands it over with the connections.
    """
    return default_starter().start("take-over", record_path, None)


def _exec(mode: str, record_path: Path, lock_fd: int | None) -> int:
    ready_r, ready_w = os.pipe()
    lock_args, fds = (["--lock-fd", str(lock_fd)], (ready_w, lock_fd)) if lock_fd is not None else ([], (ready_w,))
    logf = os.open(rec.log_path(record_path),
                   os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        # -I: no PYTHON* variables, no user site, and not the caller's directory on sys.path; cwd /:
        # nothing where root happens to run mount or reattach is imported by the daemon
        proc = subprocess.Popen(
            [*_daemon_command(mode, record_path), "--ready-fd", str(ready_w), *lock_args],
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
    kill_point(f"spawn-{mode}:started")
    return _answer(ready_r, ChildDaemon(record_path, proc))


def _daemon_command(mode: str, record_path: Path) -> list[str]:
    return [sys.executable, "-I", "-m", DAEMON_MODULE, mode, str(record_path)]


def _start_service(run: str, mode: str, record_path: Path, lock_fd: int | None) -> int:
    """The daemon as a transient service: what a child inherits, it receives on the channel."""
    unit = systemd.unit_name(record_path)
    channel = record_path.with_name(unit.removeprefix(systemd.UNIT_PREFIX).removesuffix(".service") + ".start")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(channel))  # in the run directory: root's alone
        listener.listen(1)
        command = systemd.run_command(run, unit, f"erofs-mount daemon for {record_path}", exec_environment(),
                                      [*_daemon_command(mode, record_path), "--channel", str(channel)],
                                      start_timeout=READY_TIMEOUT + 10)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, cwd="/", env=exec_environment(), start_new_session=True)
        conn = _daemon_calls(listener, proc, unit)
    finally:
        listener.close()
        channel.unlink(missing_ok=True)
    payload = json.dumps(passed_environment()).encode()
    try:
        sent = socket.send_fds(conn, [payload], [lock_fd] if lock_fd is not None else [])
        conn.sendall(payload[sent:])
        conn.shutdown(socket.SHUT_WR)
    except OSError:  # it left at once: its line (or its silence) says why
        pass
    return _answer(conn.detach(), ServiceDaemon(unit, proc))


def _daemon_calls(listener: socket.socket, run: subprocess.Popen[bytes], unit: str) -> socket.socket:
    """The daemon's connection to the channel; KernelError if its service ends or never calls."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if select.select([listener], [], [], 0.1)[0]:
            conn, _ = listener.accept()
            if peer_uid(conn) == os.geteuid():
                return conn
            conn.close()
        elif run.poll() is not None:  # systemd-run ended before the daemon called: no service started
            said = run.communicate()[1].decode(errors="replace").strip().splitlines()
            reason = said[-1] if said else f"systemd-run exit status {run.returncode}"
            raise errors.KernelError(f"systemd did not start the daemon's service {unit}: {reason} "
                                     f"({systemd.SETTING}=no starts daemons without systemd)")
    ServiceDaemon(unit, run).stop()
    raise errors.KernelError(f"the daemon's service {unit} did not start within {READY_TIMEOUT:.0f} s")


@attrs.frozen
class ForkedDaemon:
    """A daemon started, as a fork or a child, while its line is awaited: where its log is, how to end it."""

    record_path: Path

    def where(self) -> str:
        return str(rec.log_path(self.record_path))

    def settled(self) -> None:
        pass

    def failed(self, silent: bool) -> str:
        """After its error line (or none): the daemon is gone when this returns; its exit status."""
        return ""


@attrs.frozen
class ChildDaemon(ForkedDaemon):
    """A daemon in a new interpreter, a child of this process."""

    proc: subprocess.Popen[bytes]

    def failed(self, silent: bool) -> str:
        if silent and self.proc.poll() is None:
            self.proc.kill()
        return f" (status {self.proc.wait()})"


@attrs.frozen
class ServiceDaemon:
    """A daemon in a service of its own: ``systemd-run`` is the process to wait for."""

    unit: str
    run: subprocess.Popen[bytes]

    def where(self) -> str:
        return f"journalctl -u {self.unit}"

    def settled(self) -> None:
        """systemd-run returns once systemd has the daemon's READY=1, or the service has failed."""
        try:
            self.run.communicate(timeout=READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.run.kill()
            self.run.communicate()

    def failed(self, silent: bool) -> str:
        if silent:
            self.stop()
        else:
            self.settled()
        return ""

    def stop(self) -> None:
        self.run.kill()
        self.run.communicate()
        systemctl = Path(self.run.args[0]).with_name("systemctl")  # beside systemd-run, in the system PATH
        subprocess.run([str(systemctl), "kill", "--signal=SIGKILL", self.unit],
                       capture_output=True, timeout=30, check=False)


def _answer(ready_r: int, daemon: ForkedDaemon | ServiceDaemon) -> int:
    """The index the daemon's line reports, or its error raised; a silent daemon is ended."""
    try:
        line = _read_line(ready_r, READY_TIMEOUT)
    finally:
        os.close(ready_r)
    word, _, rest = line.partition(" ")
    if word == READY:
        daemon.settled()
        return int(rest)
    status = daemon.failed(silent=not line)
    if word == ERROR:
        raise decode_error(rest)
    raise errors.KernelError(f"the serving daemon exited without a word{status}; see {daemon.where()}")


def exec_environment() -> dict[str, str]:
    """What the daemon is executed with: nothing secret, nothing that changes what runs."""
    env = {"PATH": SYSTEM_PATH}
    for name in ("LANG", "LC_ALL", "TZ"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _passes(name: str) -> bool:
    """Not PATH, LD_* or PYTHON* (they change what runs), nor what systemd told the caller's own service."""
    return name != "PATH" and not name.startswith(("LD_", "PYTHON")) and name not in systemd.SERVICE_VARIABLES


def passed_environment() -> dict[str, str]:
    """The caller's variables that reach the daemon's memory (``os.environ``) through its stdin or channel."""
    return {k: v for k, v in os.environ.items() if _passes(k)}


def receive_environment(data: bytes) -> None:
    """The daemon's side: take the caller's variables into ``os.environ``, not into /proc/PID/environ."""
    try:
        passed = json.loads(data or b"{}")
    except ValueError:
        return
    if isinstance(passed, dict):
        os.environ.update({k: v for k, v in passed.items()
                           if isinstance(k, str) and isinstance(v, str) and _passes(k)})


def receive_start(channel: Path) -> tuple[int, int | None]:
    """A service daemon's start: the caller's environment and the lock from ``channel``.

    Returns the descriptor for the daemon's line (the same connection) and the lock's, if one came.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(READY_TIMEOUT)
        conn.connect(str(channel))
        if peer_uid(conn) != os.geteuid():
            raise OSError(f"{channel} is not held by our uid")
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_START, 1, socket.MSG_CMSG_CLOEXEC)
        while data and len(data) <= MAX_START:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        conn.close()
        raise errors.KernelError(f"daemon started without its channel {channel}: {exc}") from None
    receive_environment(data[:MAX_START])
    conn.settimeout(None)
    return conn.detach(), (fds[0] if fds else None)


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
