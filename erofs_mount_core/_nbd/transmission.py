"""The transmission-phase serving loop: requests in, one reply out per request.

Every request gets exactly one reply, and a reply is sent only once its data
is in hand: a failed read becomes an error reply (EIO), never a success
header followed by nothing. A request the loop cannot stay in step with
(bad magic, a truncated header, a write too large to skip) ends the
connection instead of guessing.

Retries are not made here: the source is wrapped in ``Retrying`` (see
``_filters``), so what reaches this loop as an exception is final.

The one exception to read-then-reply is opt-in: a ``Disk(...,
zero_copy=True)`` of a source with a file descriptor sends the header, then
the data with sendfile(2); a failure in between can only close the
connection. ``serve`` opts in for
its clients, which reconnect; the kernel's connections never do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

from .._errors import SourceError
from .._metrics import COMMANDS, ConnectionStats
from .._source import Source
from . import protocol as p

log = logging.getLogger("erofs_mount.transmission")


class Disk:
    """A source as an NBD client sees it: ``size`` may round the source up to
    the block size, and the tail past the source reads as zeros."""

    def __init__(self, source: Source, size: int | None = None, *, zero_copy: bool = False) -> None:
        self.source = source
        self.source_size = source.size
        self.size = self.source_size if size is None else size
        if self.size < self.source_size:
            raise ValueError("a disk cannot be smaller than its source")
        # sendfile sends the header before the data exists, so a failure can only
        # end the connection: fine for serve's clients, not for the kernel's
        # connections (a closed one blocks the device), which read first.
        self.sendfile_fd = source.fileno() if zero_copy else None

    def read(self, offset: int, length: int) -> bytes | memoryview:
        end = offset + length
        if end <= self.source_size:
            return self._pread(length, offset)
        head = self._pread(self.source_size - offset, offset) if offset < self.source_size else b""
        return bytes(head) + bytes(length - len(head))

    def _pread(self, length: int, offset: int) -> bytes | memoryview:
        data = self.source.pread(length, offset)
        if len(data) != length:
            raise SourceError(f"source returned {len(data)} bytes for a {length}-byte read at {offset}")
        return data


class ConnectionClosed(Exception):
    pass


def _recv_exact(sock: socket.socket, buf: bytearray | memoryview, n: int) -> bool:
    """Fill ``buf[:n]``; False on EOF before the first byte, ConnectionClosed on EOF after it."""
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = _recv_patiently(sock, view[got:], n - got)
        if k == 0:
            if got == 0:
                return False
            raise ConnectionClosed(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return True


def _recv_patiently(sock: socket.socket, view: memoryview, n: int) -> int:
    """``recv_into`` inside a request: a receive timeout there is no reason to stop waiting."""
    while True:
        try:
            return sock.recv_into(view, n)
        except BlockingIOError:
            continue


def _send(sock: socket.socket, header: bytes, data: bytes | memoryview = b"") -> None:
    if not data:
        sock.sendall(header)
        return
    sent = sock.sendmsg([header, data])
    if sent != len(header) + len(data):
        _finish_send(sock, header, data, sent)


def _finish_send(sock: socket.socket, header: bytes | bytearray, data: bytes | memoryview, sent: int) -> None:
    """Send what a partial sendmsg left: the rest of the header, then of the data."""
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    sock.sendall(memoryview(data)[sent - len(header):])


#: why ``transmit`` returned when it was asked to stop (``restart``: the sockets go to a new daemon)
HANDED_OVER = "handed over"


class _Connection:
    """One socket that several serving threads share, as nbdkit's parallel thread model does: one
    thread at a time receives a request (its header and any payload), one at a time sends a reply,
    and each serves its own request in between, so a read that waits on the network holds up
    no other. Replies may leave in any order: the kernel and NBD clients match them by cookie."""

    def __init__(self, sock: socket.socket, stop: threading.Event | None) -> None:
        self.sock = sock
        self.receiving = threading.Lock()
        self.sending = threading.Lock()
        self.stopping = stop.is_set if stop is not None else lambda: False
        self.reason: str | None = None  # why the connection ended, set by the thread that saw it

    def end(self, reason: str) -> str:
        if self.reason is None:
            self.reason = reason
        return self.reason


def transmit(sock: socket.socket, disk: Disk, *, peer: str = "kernel", stats: ConnectionStats | None = None,
             stop: threading.Event | None = None, threads: int = 1) -> str:
    """Serve requests on ``sock`` with ``threads`` serving threads until the client disconnects, or
    ``stop`` is set; returns once every thread has sent the reply of the request it took.

    Returns why the loop ended: ``"disconnect"`` (NBD_CMD_DISC), ``"closed"``
    (EOF between requests), ``HANDED_OVER`` (``stop`` was set: the threads ended
    between requests, leaving any unread one in the socket for its next
    reader) or a protocol error text (the connection is then closed by the caller).

    With ``stop``, the socket needs a receive timeout (SO_RCVTIMEO): an idle
    connection notices ``stop`` when its wait for a request times out.
    ``stats`` counts the calling thread's requests; each other thread counts
    in a sibling of it (the same device's).
    """
    stats = stats or ConnectionStats()
    conn = _Connection(sock, stop)
    helpers = [threading.Thread(target=_serve_guarded, args=(conn, disk, peer, stats.sibling()),
                                name=f"{threading.current_thread().name}.{n}", daemon=True)
               for n in range(1, threads)]
    for t in helpers:
        t.start()
    try:
        reason = _serve_guarded(conn, disk, peer, stats)
    finally:
        for t in helpers:
            t.join()
    return conn.reason or reason


def _serve_guarded(conn: _Connection, disk: Disk, peer: str, stats: ConnectionStats) -> str:
    """One serving thread; a fault of its own ends the whole connection (the others then stop)."""
    try:
        return _serve(conn, disk, peer, stats)
    except ConnectionClosed as exc:
        log.warning("%s: %s", peer, exc)
        return conn.end(str(exc))
    except (BrokenPipeError, ConnectionResetError) as exc:
        return conn.end(f"closed ({exc.strerror})")
    except BaseException as exc:  # a fault of ours: wake the thread receiving, and end
        conn.end(f"failed ({exc!r})")
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RD)
        raise
    finally:
        stats.started = 0  # a connection that ended is in no request: the watchdog must not count it stuck


def _serve(conn: _Connection, disk: Disk, peer: str, stats: ConnectionStats) -> str:
    """Take requests one at a time off the shared socket and answer each; returns why it stopped."""
    sock = conn.sock
    counts, took = stats.counts, stats.took
    stopping, receiving, sending = conn.stopping, conn.receiving, conn.sending
    header = bytearray(p.REQUEST.size)
    header_out = bytearray(p.REPLY.size)  # reused: a reply header is sent before the next is packed
    source_size = disk.source_size
    # the hot path (a read inside the source) uses only these locals
    recv_into, sendmsg, unpack, pack_reply = sock.recv_into, sock.sendmsg, p.REQUEST.unpack, p.REPLY.pack_into
    pread, clock = disk.source.pread, time.monotonic_ns
    sendfile_fd, sendall, sock_fd = disk.sendfile_fd, sock.sendall, sock.fileno()
    request_size, request_magic, reply_magic = p.REQUEST.size, p.REQUEST_MAGIC, p.SIMPLE_REPLY_MAGIC
    reply_size, read_slot, bytes_slot = p.REPLY.size, COMMANDS.index("read"), ConnectionStats.READ_BYTES
    while True:
        stats.started = 0
        with receiving:  # the reason a thread ends the connection is set before another may receive
            if conn.reason is not None:
                return conn.reason
            if stopping():
                return conn.end(HANDED_OVER)
            try:
                got = recv_into(header)
            except BlockingIOError:  # no request within the receive timeout: look at ``stop`` again
                continue
            started = stats.started = clock()
            if got != request_size:
                if got == 0:
                    return conn.end("closed")
                _recv_rest(sock, header, got)
            magic, _flags, cmd, cookie, offset, length = unpack(header)
            if magic != request_magic:
                log.warning("%s: bad request magic 0x%08x; closing the connection", peer, magic)
                return conn.end(f"bad magic 0x{magic:08x}")
            if cmd == p.CMD_DISC:
                return conn.end("disconnect")
            if cmd == p.CMD_WRITE:  # its payload is part of the request: read while receiving is held
                if length > p.MAX_READ:
                    log.warning("%s: write of %d bytes cannot be skipped; closing the connection", peer, length)
                    return conn.end(f"oversized write ({length} bytes)")
                _skip(sock, length)
        if cmd == p.CMD_READ:
            counts[read_slot] += 1
            if 0 < length <= p.MAX_READ and offset + length <= source_size:
                if sendfile_fd is not None:
                    pack_reply(header_out, 0, reply_magic, 0, cookie)
                    with sending:
                        sendall(header_out, socket.MSG_MORE)
                        _sendfile(sock_fd, sendfile_fd, offset, length)
                    counts[bytes_slot] += length
                    took(clock() - started)
                    continue
                try:
                    data = pread(length, offset)
                except Exception as exc:
                    _read_slow(conn, disk, cookie, offset, length, peer, stats, exc)
                    took(clock() - started)
                    continue
                if len(data) == length:
                    pack_reply(header_out, 0, reply_magic, 0, cookie)
                    with sending:
                        sent = sendmsg([header_out, data])
                        if sent != reply_size + length:
                            _finish_send(sock, header_out, data, sent)
                    counts[bytes_slot] += length
                    took(clock() - started)
                    continue
            _read_slow(conn, disk, cookie, offset, length, peer, stats)
            took(clock() - started)
        elif cmd == p.CMD_WRITE:
            counts[COMMANDS.index("write")] += 1
            _reply(conn, p.reply_header(cookie, p.EPERM))
        elif cmd == p.CMD_FLUSH:
            counts[COMMANDS.index("flush")] += 1
            _reply(conn, p.reply_header(cookie))
        elif cmd in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            counts[COMMANDS.index("trim")] += 1
            _reply(conn, p.reply_header(cookie, p.EPERM))
        else:
            counts[COMMANDS.index("other")] += 1
            _reply(conn, p.reply_header(cookie, p.EINVAL))


def _reply(conn: _Connection, header: bytes, data: bytes | memoryview = b"") -> None:
    with conn.sending:
        _send(conn.sock, header, data)


def _recv_rest(sock: socket.socket, header: bytearray, got: int) -> None:
    """Complete a header whose first recv returned ``got`` bytes."""
    view = memoryview(header)
    while got < len(header):
        k = _recv_patiently(sock, view[got:], len(header) - got)
        if k == 0:
            raise ConnectionClosed(f"peer closed the connection after {got} of {len(header)} bytes")
        got += k


def _sendfile(out: int, fd: int, offset: int, length: int) -> None:
    """Send ``length`` bytes of ``fd`` from ``offset`` to ``out``; a short file ends the connection."""
    while length:
        try:
            sent = os.sendfile(out, fd, offset, length)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except OSError as exc:  # the header is out: the only honest answer left is to hang up
            raise ConnectionClosed(f"reading the source failed ({exc.strerror}) while sending it: "
                                   "closing the connection") from exc
        if sent == 0:
            raise ConnectionClosed(f"the source ended at {offset} while sending it: closing the connection")
        offset += sent
        length -= sent


def _read_slow(conn: _Connection, disk: Disk, cookie: int, offset: int, length: int,
               peer: str, stats: ConnectionStats, failure: Exception | None = None) -> None:
    """Range checks, zero padding past the source and error replies.

    ``failure`` is what a first, direct read raised (already retried by the source's filter).
    """
    error = _check_range(offset, length, disk.size)
    if error:
        stats.failed(f"{peer}: a read of {length} bytes at {offset} is outside the device")
        _reply(conn, p.reply_header(cookie, error))
        return
    try:
        if failure is not None:
            raise failure
        data = disk.read(offset, length)
    except Exception as exc:
        if isinstance(exc, SourceError):
            log.error("%s: read of %d bytes at %d failed: %s", peer, length, offset, exc)
        else:
            log.exception("%s: read of %d bytes at %d failed", peer, length, offset)
        stats.failed(f"read of {length} bytes at {offset} failed: {exc}")
        _reply(conn, p.reply_header(cookie, p.EIO))
        return
    _reply(conn, p.reply_header(cookie), data)
    stats.counts[ConnectionStats.READ_BYTES] += length


def _check_range(offset: int, length: int, size: int) -> int:
    if length == 0 or length > p.MAX_READ:
        return p.EINVAL
    if offset + length > size:
        return p.EINVAL
    return 0


def _skip(sock: socket.socket, length: int) -> None:
    buf = bytearray(min(length, 1 << 20))
    while length:
        n = min(length, len(buf))
        if not _recv_exact(sock, buf, n):
            raise ConnectionClosed("peer closed the connection inside a write payload")
        length -= n
