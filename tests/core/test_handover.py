"""Hot upgrade below the kernel: connections handed between serving loops and daemons.

A pipelining client keeps requests in flight while the socket changes hands;
every request must get exactly one right reply. The kernel-side counterpart:
tests/vm/test_operations.py (``restart --all`` under readers).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from erofs_mount_core import _control as control
from erofs_mount_core import _record as rec
from erofs_mount_core._errors import DeviceStateError
from erofs_mount_core._metrics import ConnectionStats, DeviceStats, prometheus
from erofs_mount_core._nbd import protocol as p
from erofs_mount_core._nbd.transmission import HANDED_OVER, Disk, transmit
from tests.core.test_transmission import DATA, BytesSource

REQUESTS = 3000


def _timed(sock: socket.socket, seconds: float = 0.05) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, int(seconds * 1e6)))
    return sock


class Pipeliner:
    """Sends REQUESTS reads, each of 512 bytes somewhere in DATA, while reading replies on another thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wrong: list[int] = []
        self.seen: set[int] = set()
        self.answered = 0
        self.reader = threading.Thread(target=self._read)
        self.reader.start()
        threading.Thread(target=self._send, daemon=True).start()

    def _send(self) -> None:
        for cookie in range(REQUESTS):
            offset = (cookie * 512) % len(DATA)
            self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, cookie, offset, 512))

    def _read(self) -> None:
        f = self.sock.makefile("rb")
        for _ in range(REQUESTS):
            magic, error, cookie = p.REPLY.unpack(f.read(p.REPLY.size))
            offset = (cookie * 512) % len(DATA)
            if magic != p.SIMPLE_REPLY_MAGIC or error or f.read(512) != DATA[offset:offset + 512]:
                self.wrong.append(cookie)
            self.seen.add(cookie)
            self.answered += 1


class Gated(BytesSource):
    """Its reads past the first ``opened`` wait for ``gate``: the hand-over then starts with requests
    unread in the socket and, with several threads, reads in flight."""

    def __init__(self, opened: int) -> None:
        super().__init__(DATA)
        self.opened, self.reads, self.lock = opened, 0, threading.Lock()
        self.reached, self.gate = threading.Event(), threading.Event()

    def pread(self, length: int, offset: int) -> bytes:
        with self.lock:
            self.reads += 1
            if self.reads == self.opened:
                self.reached.set()
            held = self.reads > self.opened
        if held:
            assert self.gate.wait(10)
        return super().pread(length, offset)


@pytest.mark.parametrize("threads", [1, 4])
def test_a_connection_handed_between_loops_mid_stream_loses_and_repeats_nothing(threads: int) -> None:
    """With several threads on the socket, the hand-over waits for each one's reply in flight."""
    client, server = socket.socketpair()
    _timed(server)
    source = Gated(REQUESTS // 3)
    disk = Disk(source)
    pipeliner = Pipeliner(client)
    ends: list[str] = []
    first, second, device = threading.Event(), threading.Event(), DeviceStats()
    stats = device.connection()
    try:
        loop = threading.Thread(target=lambda: ends.append(transmit(server, disk, stats=stats, stop=first,
                                                                    threads=threads)))
        loop.start()
        assert source.reached.wait(10)
        first.set()
        source.gate.set()  # the reads in flight end, are answered, and no thread takes another request
        loop.join(5)
        assert ends == [HANDED_OVER]
        handed_at = source.reads
        after = DeviceStats(carried=device.snapshot({}))
        later = threading.Thread(target=lambda: ends.append(
            transmit(server, disk, stats=after.connection(), stop=second, threads=threads)))
        later.start()
        pipeliner.reader.join(10)
        second.set()
        later.join(5)
        assert pipeliner.answered == REQUESTS and pipeliner.wrong == [] and len(pipeliner.seen) == REQUESTS
        assert REQUESTS // 3 <= handed_at <= REQUESTS // 3 + threads, "a thread took a request after the stop"
        totals = after.snapshot({})
        assert totals["requests"]["read"] == REQUESTS and totals["read_bytes"] == REQUESTS * 512
        assert sum(totals["latency"]["counts"]) == REQUESTS and totals["errors"] == 0
    finally:
        client.close()
        server.close()


def test_an_idle_connection_notices_the_stop_within_its_receive_timeout() -> None:
    client, server = socket.socketpair()
    stop = threading.Event()
    ends: list[str] = []
    loop = threading.Thread(target=lambda: ends.append(transmit(_timed(server), Disk(BytesSource(DATA)), stop=stop)))
    loop.start()
    stop.set()
    loop.join(2)
    assert ends == [HANDED_OVER]
    client.close()
    server.close()


def test_errors_are_counted_and_the_last_one_kept() -> None:
    client, server = socket.socketpair()
    device = DeviceStats()
    loop = threading.Thread(target=transmit, args=(server, Disk(BytesSource(DATA))),
                            kwargs={"stats": device.connection()})
    loop.start()
    client.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 1, len(DATA), 512))
    assert p.REPLY.unpack(client.recv(p.REPLY.size))[1] == p.EINVAL
    client.close()
    loop.join(2)
    server.close()
    snap = device.snapshot({"http_requests": 3})
    assert snap["errors"] == 1 and "outside the device" in snap["last_error"]
    assert snap["requests"]["read"] == 1 and snap["read_bytes"] == 0
    text = prometheus({"nbd0": snap, "nbd1": {}})
    assert 'erofs_mount_errors_total{device="nbd0"} 1' in text
    assert 'erofs_mount_read_bytes_total{device="nbd0"} 0' in text
    assert 'erofs_mount_daemon_up{device="nbd1"} 0' in text
    assert 'erofs_mount_source_http_requests_total{device="nbd0"} 3' in text


def test_the_prometheus_text_parses() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    stats = ConnectionStats()
    stats.counts[0] = 5
    stats.took(2_000_000)
    device = DeviceStats()
    device.connections.append(stats)
    families = {f.name: f for f in parser.text_string_to_metric_families(
        prometheus({"nbd0": device.snapshot({"cache-hits": 2}), "nbd3": {}}))}
    assert {"erofs_mount_daemon_up", "erofs_mount_requests", "erofs_mount_request_duration_seconds",
            "erofs_mount_source_cache_hits"} <= set(families)
    buckets = [s for s in families["erofs_mount_request_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert [s.value for s in buckets if s.labels["le"] in ("0.001", "0.005", "+Inf")] == [0, 1, 1]


# -- the control socket, between two processes' worth of objects -----------------


class FakeDaemon:
    """The daemon's side of the control socket, over real sockets and a real lock file."""

    def __init__(self, record: Path, sockets: list[socket.socket]) -> None:
        self.lock_fd = os.open(rec.lock_path(record), os.O_RDWR | os.O_CREAT, 0o600)
        self.sockets = sockets
        self.handed = threading.Event()
        self.resumed = 0
        self.refuse = False
        self.server = control.ControlServer(record, stats=lambda: {"read_bytes": 42}, hand_over=self.hand_over,
                                            resume=self.resume, handed=self.handed.set)

    def close(self) -> None:
        self.server.close()
        os.close(self.lock_fd)
        for s in self.sockets:
            s.close()

    def hand_over(self) -> tuple[int, list[socket.socket], dict[str, object]]:
        if self.refuse:
            raise DeviceStateError("a request took too long")
        return self.lock_fd, self.sockets, {"read_bytes": 42}

    def resume(self) -> None:
        self.resumed += 1


def test_stats_and_a_hand_over_through_the_control_socket(tmp_path: Path) -> None:
    record = tmp_path / "nbd-0123456789ab.toml"
    kernel_end, server_end = socket.socketpair()
    daemon = FakeDaemon(record, [server_end])
    assert control.ask_stats(record) == {"read_bytes": 42}
    daemon.refuse = True
    with pytest.raises(DeviceStateError, match="took too long"):
        control.take_over(record)
    daemon.refuse = False
    handover = control.take_over(record)
    assert handover.carried == {"read_bytes": 42} and len(handover.sockets) == 1
    assert os.path.samestat(os.fstat(handover.lock_fd), os.fstat(daemon.lock_fd))
    handover.sockets[0].sendall(b"through the new descriptor")
    assert kernel_end.recv(100) == b"through the new descriptor"
    assert not daemon.handed.is_set()
    handover.taken()
    assert daemon.handed.wait(5) and daemon.resumed == 0
    os.close(handover.lock_fd)
    handover.sockets[0].close()
    kernel_end.close()
    daemon.close()


def test_a_taker_that_leaves_without_taking_lets_the_daemon_serve_on(tmp_path: Path) -> None:
    record = tmp_path / "nbd-0123456789ab.toml"
    kernel_end, server_end = socket.socketpair()
    daemon = FakeDaemon(record, [server_end])
    handover = control.take_over(record)
    handover._conn.close()
    os.close(handover.lock_fd)
    handover.sockets[0].close()
    for _ in range(100):
        if daemon.resumed:
            break
        threading.Event().wait(0.02)
    assert daemon.resumed == 1 and not daemon.handed.is_set()
    assert control.ask_stats(record) == {"read_bytes": 42}, "it still answers"
    kernel_end.close()
    daemon.close()


def test_no_daemon_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceStateError, match="does not answer"):
        control.ask_stats(tmp_path / "nbd-0123456789ab.toml")


def test_a_peer_that_is_not_root_gets_neither_counts_nor_the_device() -> None:
    """Even were the run directory and the socket open to all, the daemon answers its own uid only."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as open_dir:
        os.chmod(open_dir, 0o755)
        record = Path(open_dir) / "nbd-0123456789ab.toml"
        kernel_end, server_end = socket.socketpair()
        daemon = FakeDaemon(record, [server_end])
        os.chmod(rec.control_path(record), 0o666)
        ask = ("import socket, sys\n"
               "s = socket.socket(socket.AF_UNIX)\n"
               "s.connect(sys.argv[1])\n"
               "try:\n"
               "    s.sendall(sys.argv[2].encode() + b'\\n')\n"
               "    print(repr(s.recv(4096)))\n"
               "except OSError:\n"
               "    print(repr(b''))\n")
        for op in ('{"op": "hand-over"}', '{"op": "stats"}'):
            out = subprocess.run(["/usr/bin/python3", "-c", ask, str(rec.control_path(record)), op],
                                 user=65534, capture_output=True, text=True, timeout=30)
            assert out.stdout.strip() == "b''", (op, out)  # closed without a word
        assert daemon.resumed == 0 and not daemon.handed.is_set()
        kernel_end.close()
        daemon.close()
