"""The transmission loop against a raw socket: replies, errors, desync guards.

Its integration counterparts: tests/vm/test_local_mount.py (the kernel as client).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from erofs_mount_core import Source, SourceError
from erofs_mount_core._filters import Retrying, RetryPolicy
from erofs_mount_core._nbd import protocol as p
from erofs_mount_core._nbd.transmission import Disk, transmit

DATA = bytes(range(256)) * 64  # 16 KiB


class BytesSource(Source):
    def __init__(self, data: bytes, failures: list[SourceError] | None = None) -> None:
        self.data = data
        self.failures = failures or []
        self.calls = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.data[offset:offset + length]


class Client:
    def __init__(self, disk: Disk, threads: int = 1) -> None:
        self.sock, server = socket.socketpair()
        self.result: list[str] = []
        self.thread = threading.Thread(target=lambda: self.result.append(transmit(server, disk, threads=threads)))
        self.thread.start()
        self._server = server

    def request(self, cmd: int, offset: int = 0, length: int = 0, cookie: int = 7,
                magic: int = p.REQUEST_MAGIC, payload: bytes = b"") -> None:
        self.sock.sendall(p.REQUEST.pack(magic, 0, cmd, cookie, offset, length) + payload)

    def reply(self, length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = p.REPLY.unpack(self.recv(p.REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error, cookie, self.recv(length) if not error and length else b""

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "server closed the connection"
            buf += chunk
        return buf

    def finish(self) -> str:
        self.thread.join(5)
        self.close()
        return self.result[0]

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)
        self._server.close()


@pytest.fixture
def client() -> Iterator[Client]:
    c = Client(Disk(BytesSource(DATA)))
    yield c
    c.close()


def test_read_returns_the_bytes(client: Client) -> None:
    client.request(p.CMD_READ, 1000, 3000, cookie=0xDEADBEEF01)
    assert client.reply(3000) == (0, 0xDEADBEEF01, DATA[1000:4000])
    client.request(p.CMD_DISC)
    assert client.finish() == "disconnect"


def test_bad_requests_get_error_replies_and_the_stream_stays_in_step(client: Client) -> None:
    client.request(p.CMD_READ, len(DATA) - 10, 11, cookie=1)       # past the end
    client.request(p.CMD_READ, 0, 0, cookie=2)                     # zero length
    client.request(p.CMD_READ, 0, p.MAX_READ + 1, cookie=3)        # too large
    client.request(99, cookie=4)                                   # unknown command
    client.request(p.CMD_WRITE, 0, 5, cookie=5, payload=b"hello")  # read-only export
    client.request(p.CMD_TRIM, 0, 4096, cookie=6)
    client.request(p.CMD_FLUSH, cookie=8)
    client.request(p.CMD_READ, 0, 16, cookie=9)
    assert client.reply() == (p.EINVAL, 1, b"")
    assert client.reply() == (p.EINVAL, 2, b"")
    assert client.reply() == (p.EINVAL, 3, b"")
    assert client.reply() == (p.EINVAL, 4, b"")
    assert client.reply() == (p.EPERM, 5, b"")
    assert client.reply() == (p.EPERM, 6, b"")
    assert client.reply() == (0, 8, b"")
    assert client.reply(16) == (0, 9, DATA[:16])


def test_bad_magic_closes_the_connection(client: Client) -> None:
    client.request(p.CMD_READ, 0, 16, magic=0x12345678)
    assert client.finish() == "bad magic 0x12345678"


def test_half_a_request_ends_cleanly(client: Client) -> None:
    client.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 0, 16)[:10])
    client.sock.shutdown(socket.SHUT_WR)
    assert "after 10 of 28 bytes" in client.finish()


def test_eof_between_requests_is_closed(client: Client) -> None:
    client.sock.shutdown(socket.SHUT_WR)
    assert client.finish() == "closed"


class HeldSource(BytesSource):
    """Its reads at offset 0 wait until ``release`` is set, as a read of a span on a slow registry does."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.release, self.waiting = threading.Event(), threading.Event()

    def pread(self, length: int, offset: int) -> bytes:
        if offset == 0:
            self.waiting.set()
            assert self.release.wait(10)
        return super().pread(length, offset)


def test_a_read_that_waits_on_its_source_holds_up_no_other_on_the_same_connection() -> None:
    source = HeldSource(DATA)
    c = Client(Disk(source), threads=4)
    c.request(p.CMD_READ, 0, 512, cookie=1)
    assert source.waiting.wait(5)
    c.request(p.CMD_READ, 4096, 512, cookie=2)
    c.request(p.CMD_FLUSH, cookie=3)
    assert c.reply(512) == (0, 2, DATA[4096:4608]), "the second read waited for the first"
    assert c.reply() == (0, 3, b"")
    source.release.set()
    assert c.reply(512) == (0, 1, DATA[:512])
    c.request(p.CMD_DISC)
    assert c.finish() == "disconnect"


def test_a_disconnect_ends_the_connection_once_each_read_in_flight_is_answered() -> None:
    source = HeldSource(DATA)
    c = Client(Disk(source), threads=4)
    c.request(p.CMD_READ, 0, 512, cookie=1)
    assert source.waiting.wait(5)
    c.request(p.CMD_DISC)
    c.thread.join(0.5)
    assert c.thread.is_alive(), "transmit returned with a read in flight"
    source.release.set()
    assert c.reply(512) == (0, 1, DATA[:512])
    assert c.finish() == "disconnect"


@pytest.mark.parametrize("threads", [1, 4])
def test_many_threads_answer_every_request_once_and_rightly(threads: int) -> None:
    c = Client(Disk(BytesSource(DATA)), threads=threads)
    offsets = {cookie: (cookie * 97) % (len(DATA) - 300) for cookie in range(2000)}
    sender = threading.Thread(target=lambda: [c.request(p.CMD_READ, o, 300, cookie=k) for k, o in offsets.items()])
    sender.start()
    answers = {}
    for _ in offsets:
        error, cookie, data = c.reply(300)
        assert error == 0 and cookie not in answers
        answers[cookie] = data
    sender.join()
    assert answers == {k: DATA[o:o + 300] for k, o in offsets.items()}
    c.request(p.CMD_DISC)
    assert c.finish() == "disconnect"


NO_WAIT = RetryPolicy(base_delay=0.0)


def test_transient_failures_are_retried_then_served() -> None:
    source = BytesSource(DATA, [SourceError("blip", transient=True)] * 2)
    c = Client(Disk(Retrying(source, NO_WAIT)))
    c.request(p.CMD_READ, 0, 100)
    assert c.reply(100) == (0, 7, DATA[:100])
    assert source.calls == 3
    c.request(p.CMD_DISC)
    assert c.finish() == "disconnect"


def test_a_read_that_keeps_failing_costs_the_policy_s_attempts_then_eio() -> None:
    source = BytesSource(DATA, [SourceError("blip", transient=True)] * 100)
    c = Client(Disk(Retrying(source, NO_WAIT)))
    c.request(p.CMD_READ, 0, 100, cookie=1)
    assert c.reply() == (p.EIO, 1, b"")
    assert source.calls == NO_WAIT.attempts
    c.request(p.CMD_DISC)
    assert c.finish() == "disconnect"


def test_a_failed_read_is_one_error_reply_never_a_header_then_nothing() -> None:
    source = BytesSource(DATA, [SourceError("gone")])
    c = Client(Disk(source))
    c.request(p.CMD_READ, 0, 100, cookie=1)
    c.request(p.CMD_READ, 100, 100, cookie=2)
    assert c.reply() == (p.EIO, 1, b"")
    assert c.reply(100) == (0, 2, DATA[100:200])
    c.request(p.CMD_DISC)
    assert c.finish() == "disconnect"


def test_a_disk_rounded_up_reads_zeros_past_the_source() -> None:
    c = Client(Disk(BytesSource(DATA[:1000]), size=1024))
    c.request(p.CMD_READ, 512, 512)
    assert c.reply(512) == (0, 7, DATA[512:1000] + bytes(24))
    c.request(p.CMD_DISC)
    assert c.finish() == "disconnect"


class ViewSource(BytesSource):
    """Answers with views of the bytes it holds, as a caching source may."""

    def pread(self, length: int, offset: int) -> memoryview:  # type: ignore[override]
        return memoryview(super().pread(length, offset))


def test_a_source_may_answer_with_memoryviews() -> None:
    c = Client(Disk(ViewSource(DATA[:1000]), size=1024))
    c.request(p.CMD_READ, 0, 512, cookie=1)
    c.request(p.CMD_READ, 512, 512, cookie=2)                    # past the source: padded with zeros
    assert c.reply(512) == (0, 1, DATA[:512])
    assert c.reply(512) == (0, 2, DATA[512:1000] + bytes(24))
    c.request(p.CMD_DISC)
    assert c.finish() == "disconnect"


def test_header_layout() -> None:
    assert p.REQUEST.size == 28 and p.REPLY.size == 16
    raw = p.reply_header(0x0102030405060708, p.EIO)
    assert raw == struct.pack(">IIQ", 0x67446698, 5, 0x0102030405060708)


class FileSource(BytesSource):
    def __init__(self, path: str) -> None:
        import os

        self.fd = os.open(path, os.O_RDONLY)
        with open(path, "rb") as f:
            super().__init__(f.read())

    def fileno(self) -> int:
        return self.fd


def test_zero_copy_reads_from_a_file(tmp_path: object) -> None:
    import os
    from pathlib import Path

    path = Path(str(tmp_path)) / "img"
    path.write_bytes(DATA)
    source = FileSource(str(path))
    c = Client(Disk(source, zero_copy=True))
    c.request(p.CMD_READ, 100, 5000, cookie=3)
    c.request(p.CMD_READ, len(DATA) - 1, 2, cookie=4)           # still range-checked
    assert c.reply(5000) == (0, 3, DATA[100:5100])
    assert c.reply() == (p.EINVAL, 4, b"")
    assert source.calls == 0, "served by sendfile, not pread"
    os.truncate(path, 1000)                                       # the file shrinks under us
    c.request(p.CMD_READ, 4096, 4096, cookie=5)
    assert "the source ended" in c.finish()
    os.close(source.fd)
