"""Commands handed to a warm process over a unix socket that only root may use.

A command started as a new interpreter pays for its imports before it does
anything: seconds for a plugin that imports gRPC and httpx on a small or
emulated machine. A long-running plugin process (the containerd snapshotter)
keeps a ``CommandServer`` with those libraries imported, and listens here.
The command, started as usual, hands itself over (``run_through``): it sends
its arguments, environment and working directory, with its own stdout and
stderr and the write end of a status pipe (SCM_RIGHTS), and waits. The
command runs in a fork of the warm server, writes straight to the caller's
descriptors, and the caller exits with its status. A signal the caller gets
(Ctrl-C) is passed on to the command. When nothing listens, the caller runs
the command itself, as it does when the listener turns it away (its log
says why): the result is the same, only slower.

Only root may connect: the socket's mode is 0600 and each peer's uid is
checked (SO_PEERCRED), because the commands mount and run as root. The
listener runs only the commands under its ``prefix``, whatever the peer
sends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from ._forkserver import CommandServer

log = logging.getLogger("erofs_mount")

MAX_REQUEST = 1 << 16  # the fork server's bound: a larger environment runs the command in the caller
RECEIVE_TIMEOUT = 5.0  # seconds a peer may take to send its request once connected


class CommandSocket:
    """Listens at ``path`` (root's alone) and runs each request's arguments after ``prefix`` in ``commands``."""

    def __init__(self, path: Path, commands: CommandServer, prefix: Sequence[str]) -> None:
        self.path, self._commands, self._prefix = path, commands, list(prefix)
        path.unlink(missing_ok=True)  # a socket left by a process that was killed
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self._listener.bind(str(path))
        finally:
            os.umask(old)
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept, name="command-socket", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._thread.join()
        self._listener.close()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # shut down
                return
            with conn:
                self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        from ._control import peer_uid

        fds: list[int] = []
        try:
            conn.settimeout(RECEIVE_TIMEOUT)
            if peer_uid(conn) != 0:
                log.warning("command socket %s: a peer that is not root was turned away", self.path)
                return
            message, fds, _flags, _address = socket.recv_fds(conn, MAX_REQUEST, 3)
            request = json.loads(message) if message else None
            args = request.get("args") if isinstance(request, dict) else None
            if len(fds) != 3 or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                log.warning("command socket %s: a request that is not one was turned away", self.path)
                return
            command = [*self._prefix, *args]
            log.info("erofs-mount %s: handed over by a new process", " ".join(command))
            self._commands.start(command, request.get("env"), request.get("cwd"), fds)
        except (OSError, ValueError) as exc:
            log.warning("command socket %s: %s", self.path, exc)
        finally:
            for fd in fds:  # the fork server holds its own copies now
                os.close(fd)


def run_through(path: Path, args: Sequence[str]) -> int | None:
    """``args`` run by the process listening at ``path``, with this process's stdout, stderr, environment and
    directory: its exit status (128 + N for signal N), or None when nothing there took it."""
    request = json.dumps({"args": list(args), "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    if len(request) > MAX_REQUEST:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.connect(str(path))
    except OSError:  # none there, or a socket left by a process that died
        conn.close()
        return None
    status_read, status_write = os.pipe()
    try:
        with conn:
            socket.send_fds(conn, [request], [1, 2, status_write])
    except OSError:
        os.close(status_read)
        return None
    finally:
        os.close(status_write)
    with open(status_read, "rb") as status:
        return _wait(status, path)


def _wait(status: BinaryIO, path: Path) -> int | None:
    """The command's pid, then its exit status, read from the status pipe; signals passed on meanwhile."""
    pid: list[int] = []

    def pass_on(signum: int, _frame: object) -> None:
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid[0], signum)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        lines = []
        for line in status:
            lines.append(line)
            if len(lines) == 1:
                pid.append(int(line))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not lines:  # turned away: nothing ran
        return None
    if len(lines) < 2:
        print(f"erofs-mount: the command handed to {path} ended without an exit status", file=sys.stderr)
        return 1
    code = int(lines[1])
    return 128 - code if code < 0 else code
