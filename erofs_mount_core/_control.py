"""The daemon's control socket: ``stats`` asks it for its counts, ``restart`` for its device.

Both sides live here. The socket is ``<record>.sock`` in the run directory
(root's alone), and the daemon answers only a peer whose uid is its own.
A request is one JSON line; so is the answer.

- ``{"op": "stats"}``: the daemon's ``DeviceStats`` snapshot, its pid and device.
- ``{"op": "hand-over"}``: the hot upgrade. The daemon stops taking requests
  (each connection ends between two requests; a request the kernel sent
  meanwhile stays unread in its socket), then answers with its record lock
  and its connections' sockets attached (SCM_RIGHTS) and its counts. The
  taker answers ``{"op": "taken"}`` once it holds them, and the daemon
  exits; if the taker goes away instead, the daemon serves on. The kernel
  never sees a connection die, so no read fails or waits for a reattach.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._errors import DeviceStateError
from ._record import control_path

log = logging.getLogger("erofs_mount.control")

#: the most file descriptors one hand-over carries: the lock and 64 connections
MAX_FDS = 65
MAX_LINE = 1 << 20
#: how long ``stats`` waits for a daemon's answer
ASK_TIMEOUT = 5.0
#: how long a hand-over may take: the daemon's requests in flight finish first
HAND_OVER_TIMEOUT = 120.0


class Handover:
    """What a daemon gives away: its lock, its connections, its counts so far."""

    def __init__(self, lock_fd: int, sockets: list[socket.socket], carried: dict[str, Any], conn: socket.socket):
        self.lock_fd, self.sockets, self.carried, self._conn = lock_fd, sockets, carried, conn

    def taken(self) -> None:
        """Tell the old daemon to exit: the sockets are served here from now on."""
        _send_line(self._conn, {"op": "taken"})
        self._conn.close()


# -- the daemon's side -------------------------------------------------------------


class ControlServer:
    """Answers ``stats`` and ``hand-over`` requests on a thread of its own."""

    def __init__(self, record_path: Path, stats: Callable[[], dict[str, Any]],
                 hand_over: Callable[[], tuple[int, list[socket.socket], dict[str, Any]]],
                 resume: Callable[[], None], handed: Callable[[], None]) -> None:
        self._stats, self._hand_over, self._resume, self._handed = stats, hand_over, resume, handed
        self.path = control_path(record_path)
        self.path.unlink(missing_ok=True)  # a dead daemon's: we hold the record's lock
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self._listener.listen(8)
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.settimeout(ASK_TIMEOUT)
                    if peer_uid(conn) != os.geteuid():
                        continue
                    request = _read_line(conn)
                    if request.get("op") == "stats":
                        _send_line(conn, {"ok": True, "stats": self._stats()})
                    elif request.get("op") == "hand-over":
                        if self._give(conn):
                            return  # no more requests: this daemon is leaving
                    else:
                        _send_line(conn, {"ok": False, "error": f"unknown request {request.get('op')!r}"})
                except (OSError, ValueError) as exc:
                    log.warning("control socket: %s", exc)

    def _give(self, conn: socket.socket) -> bool:
        try:
            lock_fd, sockets, carried = self._hand_over()
        except DeviceStateError as exc:
            _send_line(conn, {"ok": False, "error": str(exc)})
            return False
        try:
            conn.settimeout(HAND_OVER_TIMEOUT)
            line = json.dumps({"ok": True, "connections": len(sockets), "carried": carried}).encode() + b"\n"
            socket.send_fds(conn, [line], [lock_fd, *(s.fileno() for s in sockets)])
            answer = _read_line(conn)
        except (OSError, ValueError) as exc:
            answer = {"error": str(exc)}
        if answer.get("op") != "taken":
            log.warning("the new daemon did not take the device (%s); serving on", answer.get("error", "it left"))
            self._resume()
            return False
        self._handed()
        return True


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED): the kernel's word, not the peer's."""
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


# -- the asker's side ---------------------------------------------------------------


def _connect(record_path: Path, timeout: float) -> socket.socket:
    path = control_path(record_path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.settimeout(timeout)
    try:
        conn.connect(str(path))
    except OSError as exc:
        conn.close()
        raise DeviceStateError(f"its daemon does not answer on {path} ({exc.strerror})") from None
    return conn


def ask_stats(record_path: Path, timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """The daemon's counts; DeviceStateError if it does not answer."""
    with _connect(record_path, timeout) as conn:
        _send_line(conn, {"op": "stats"})
        try:
            answer = _read_line(conn)
        except (OSError, ValueError) as exc:
            raise DeviceStateError(f"its daemon did not answer ({exc})") from None
    if not answer.get("ok"):
        raise DeviceStateError(f"its daemon refused: {answer.get('error')}")
    return dict(answer["stats"])


def take_over(record_path: Path, timeout: float = HAND_OVER_TIMEOUT) -> Handover:
    """Ask the daemon for its device; call ``taken()`` on the result once serving it."""
    conn = _connect(record_path, timeout)
    try:
        _send_line(conn, {"op": "hand-over"})
        line, fds = _read_line_with_fds(conn)
        if not line.get("ok"):
            raise DeviceStateError(f"its daemon did not hand the device over: {line.get('error')}")
        if len(fds) != 1 + int(line["connections"]):
            for fd in fds:
                os.close(fd)
            raise DeviceStateError(f"its daemon handed over {len(fds)} descriptors, not 1 + {line['connections']}")
    except (OSError, ValueError, KeyError) as exc:
        conn.close()
        raise DeviceStateError(f"the hand-over failed: {exc}") from None
    except BaseException:
        conn.close()
        raise
    sockets = [socket.socket(fileno=fd) for fd in fds[1:]]
    return Handover(fds[0], sockets, dict(line.get("carried") or {}), conn)


# -- lines --------------------------------------------------------------------------


def _send_line(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _read_line(conn: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("the peer closed the connection")
        data += chunk
        if len(data) > MAX_LINE:
            raise ValueError("an answer of more than 1 MiB")
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def _read_line_with_fds(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The hand-over's answer: the descriptors come with its first bytes."""
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_LINE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    while data and not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data.endswith(b"\n"):
        for fd in fds:
            os.close(fd)
        raise ValueError("the peer closed the connection")
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message, fds
