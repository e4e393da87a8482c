"""erofs-mount's commands run as forks of one warm process: a fork server.

A command started as a new process starts an interpreter and imports the
core, click, the plugins and what they use before it does anything: a
second or more on a small machine, several in an emulated one, for every
command. A plugin that runs many (the containerd snapshotter mounts each
layer of each image it is given) starts this server once, before it starts
any thread (a fork of a threaded process may inherit a lock that another
thread held), and each command then runs in a fork of it, as the
``erofs-mount`` executable would run it: a waiter forked per request forks
the command and writes how it ended. Its output and exit status come back
on pipes the caller passed with the request (SCM_RIGHTS), so calls from
many threads at once need no bookkeeping here. Should the server die (the
OOM killer, a stray kill), each command from then on runs as a new
interpreter, as the executable would, and one line says so: slower, never
lost (a new server would have to fork the caller, which has threads by then).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pkgutil
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence

log = logging.getLogger("erofs_mount")

#: what a mount and the daemon it forks import on top of the command line: imported once, in the server
PRELOAD = ("erofs_mount_core._cli", "erofs_mount_core._lifecycle", "erofs_mount_core._daemon",
           "erofs_mount_core._nbd.netlink", "erofs_mount_core._listing", "erofs_mount_core._mount_helper")
MAX_REQUEST = 1 << 16
MAX_OUTPUT = 1 << 20  # what a command's stdout or stderr may bring back; the rest is dropped


class CommandServer:
    """Runs ``erofs-mount`` commands in forks of a process forked here, at construction."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the server: it never returns
            ours.close()
            _serve(theirs)
        theirs.close()
        self._socket, self._pid = ours, pid
        self._closed, self._gone = False, False

    def run(self, args: Sequence[str], timeout: float,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``erofs-mount ARGS`` in a fork of the server, with ``env`` as its environment (the server's by
        default): what ``subprocess.run`` would return for it, a signal's end a negative status included
        (status 1 with a line on stderr when it cannot be run or takes longer than ``timeout``)."""
        command = ["erofs-mount", *args]
        if self._closed:
            return subprocess.CompletedProcess(command, 1, "", "erofs-mount's fork server is gone: it was closed")
        if self._gone:
            return _run_new(command, timeout, env)
        pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, status
        sent = self.start(args, env, None, [w for _, w in pipes])
        for r, w in pipes:
            os.close(w)
            if not sent:
                os.close(r)
        if not sent:
            return _run_new(command, timeout, env)
        return _collect(command, [r for r, _ in pipes], timeout)

    def start(self, args: Sequence[str], env: Mapping[str, str] | None, cwd: str | None,
              fds: Sequence[int]) -> bool:
        """``erofs-mount ARGS`` in a fork of the server, in directory ``cwd`` (the server's by default), its
        stdout and stderr the first two of ``fds``, its pid and then its exit status written to the third
        (a line each): a command whose caller holds those descriptors itself (``CommandSocket``). The caller
        keeps its ``fds``; False when the server is closed or gone."""
        if self._closed or self._gone:
            return False
        request = {"args": list(args), "env": dict(env) if env is not None else None, "cwd": cwd}
        try:
            socket.send_fds(self._socket, [json.dumps(request).encode()], list(fds))
        except OSError as exc:
            if not self._gone:
                self._gone = True
                log.warning("erofs-mount's fork server ended (%s): each command now starts an interpreter", exc)
            return False
        return True

    def close(self) -> None:
        """End the server (commands under way finish on their own)."""
        self._closed = True
        self._socket.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._pid, 0)


def _run_new(command: list[str], timeout: float, env: Mapping[str, str] | None) -> subprocess.CompletedProcess[str]:
    """The command in a new interpreter (``-I``: nothing from the caller's directory or PYTHON* variables)."""
    try:
        return subprocess.run([sys.executable, "-I", "-m", "erofs_mount_core._main", *command[1:]], capture_output=True,
                              text=True, errors="replace", timeout=timeout, env=env, cwd="/",
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return subprocess.CompletedProcess(command, 1, out, f"erofs-mount {command[1] if len(command) > 1 else ''} "
                                           f"took more than {timeout:.0f} s")
    except OSError as exc:
        return subprocess.CompletedProcess(command, 1, "", f"erofs-mount could not be started: {exc}")


def _collect(command: list[str], fds: list[int], timeout: float) -> subprocess.CompletedProcess[str]:
    """Read a command's stdout, stderr and status to their ends; kill it when ``timeout`` passes."""
    out, err, status = bytearray(), bytearray(), bytearray()
    into = dict(zip(fds, (out, err, status), strict=True))
    deadline, pidfd = time.monotonic() + timeout, None
    try:
        while into:
            left = deadline - time.monotonic()
            ready = select.select(list(into), [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                return subprocess.CompletedProcess(
                    command, 1, out.decode(errors="replace"),
                    f"erofs-mount {command[1] if len(command) > 1 else ''} took more than {timeout:.0f} s")
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del into[fd]
                    os.close(fd)
                elif len(into[fd]) < MAX_OUTPUT:
                    into[fd] += chunk
            if pidfd is None and b"\n" in status:
                with contextlib.suppress(OSError, ValueError):
                    pidfd = os.pidfd_open(int(status.split(b"\n")[0]))
    finally:
        for fd in into:
            os.close(fd)
        if pidfd is not None:
            os.close(pidfd)
    lines = status.decode(errors="replace").split()
    if len(lines) < 2:  # its waiter was killed
        return subprocess.CompletedProcess(command, 1, out.decode(errors="replace"),
                                           err.decode(errors="replace") + "erofs-mount ended without a status\n")
    return subprocess.CompletedProcess(command, int(lines[1]), out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def _serve(sock: socket.socket) -> None:
    """The server's loop: a waiter forked per request, which forks the command and tells how it ended;
    the loop ends when the caller's end closes."""
    code = 0
    try:
        keep = sock.fileno()  # none of the caller's other descriptors reaches a command, as with subprocess
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        _as_a_new_interpreter()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the waiters
        _preload()
        while True:
            try:
                message, fds, _flags, _address = socket.recv_fds(sock, MAX_REQUEST, 3)
            except InterruptedError:
                continue
            if not message:
                break
            request = _request(message, fds)
            if request is None or os.fork() != 0:
                for fd in fds:
                    os.close(fd)
                continue
            sock.close()
            _wait_for(*request, *fds)
    except BaseException:  # noqa: BLE001 (nothing of the caller's may run on in this fork)
        code = 1
    os._exit(code)


def _as_a_new_interpreter() -> None:
    """The signal dispositions an interpreter starts with, whatever the caller set (a test runner's alarm,
    a server's SIGTERM handler)."""
    for signum in signal.valid_signals():
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_IGN)


def _request(message: bytes, fds: list[int]) -> tuple[list[str], dict[str, str] | None, str | None] | None:
    try:
        request = json.loads(message)
    except ValueError:
        return None
    if len(fds) != 3 or not isinstance(request, dict):
        return None
    args, env, cwd = request.get("args"), request.get("env"), request.get("cwd")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        return None
    if cwd is not None and not (isinstance(cwd, str) and os.path.isabs(cwd)):
        return None
    if env is not None and not (isinstance(env, dict)
                                and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        return None
    return args, env, cwd


def _wait_for(args: list[str], env: dict[str, str] | None, cwd: str | None, out: int, err: int,
              status: int) -> None:
    """The waiter: the command in a fork of its own, its pid and then its exit status on ``status``."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            os.close(status)
            _run(args, env, cwd, out, err)
        os.close(out)
        os.close(err)
        os.write(status, f"{pid}\n".encode())
        while True:
            try:
                _pid, wait_status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os.write(status, f"{os.waitstatus_to_exitcode(wait_status)}\n".encode())
        code = 0
    finally:
        os._exit(code)


def _preload() -> None:
    """Do, once, what every command's fork would do again: import the modules a mount and its daemon use
    and every module of the installed plugins' packages, make the record converter, and warm each plugin
    up (``erofs_mount_warm_up``: the libraries it imports lazily)."""
    from . import _record
    from ._plugins import PluginHost, plugin_packages

    for name in PRELOAD:
        importlib.import_module(name)
    _record.converter()
    for module in plugin_packages():
        package = importlib.import_module(module)
        for found in pkgutil.walk_packages(getattr(package, "__path__", []), f"{module}."):
            if not any(part.startswith("_") for part in found.name.split(".")):
                with contextlib.suppress(Exception):
                    importlib.import_module(found.name)
    PluginHost().warm_up()


def _run(args: list[str], env: dict[str, str] | None, cwd: str | None, out: int, err: int) -> None:
    """One command: as the executable would run it, with the caller's pipes as its output."""
    from ._main import main

    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (null, out, err):
            os.close(fd)
        # the caller's sys.stdout may be no file on fd 1 (a test runner's capture, a logging wrapper)
        sys.stdin, sys.stdout, sys.stderr = (open(fd, mode, closefd=False, encoding="utf-8",  # noqa: SIM115
                                                  errors="backslashreplace" if fd == 2 else "strict")
                                             for fd, mode in ((0, "r"), (1, "w"), (2, "w")))
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger):  # a fresh process has none of the server's handlers
                logger.handlers.clear()
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        sys.argv = ["erofs-mount", *args]
        try:
            if cwd is not None:
                try:
                    os.chdir(cwd)
                except OSError as exc:
                    raise SystemExit(f"erofs-mount: cannot work in {cwd}: {exc.strerror}") from None
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 (said on stderr, as the interpreter would)
            traceback.print_exc()
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)
