"""The serving daemon: one process per attached device.

Started by ``mount`` (to connect a new device) and by ``reattach`` (to hand
a device whose daemon died a new set of connections). It rebuilds its
source from the record, so both paths check the source's identity the same
way. It inherits the record's lock, already held, and checks that it
holds it before serving; it reports one line on the ready pipe, serves
until the kernel disconnects, then removes its record (both as
``_daemon_protocol`` says). Killed, it leaves the record for the next
reattach. Every source is served through ``Retrying``, the one retry on
the read path.

    python -m erofs_mount_core._daemon {connect|reattach} RECORD --ready-fd N --lock-fd N
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import attrs

from . import _daemon_protocol as protocol
from . import _logging
from . import _record as rec
from ._errors import DeviceStateError, ErofsMountError, KernelError
from ._filters import Retrying
from ._nbd.link import KernelLink, link_named
from ._nbd.transmission import Disk, transmit
from ._plugins import PluginHost
from ._source import Source

log = logging.getLogger("erofs_mount.daemon")

#: how long a reattach keeps trying while the kernel has not yet noticed the
#: old connections died (it drops a new socket while no connection is dead)
RECONNECT_PATIENCE = 10.0
PR_SET_IO_FLUSHER = 57

SocketPair = tuple[socket.socket, socket.socket]


class Daemon:
    def __init__(self, record_path: Path, ready: protocol.ReadyPipe) -> None:
        self.record_path = record_path
        self.backend = str(record_path)
        self.ready = ready
        self.store = rec.RecordStore(record_path.parent)
        self.reasons: list[str] = []
        self.threads: list[threading.Thread] = []

    def fail(self, exc: ErofsMountError) -> int:
        log.error("%s", exc)
        self.ready.failed(exc)
        return exc.exit_code

    def run(self, mode: str) -> int:
        try:
            record = self.store.read(self.record_path)
            link = link_named(record.device.interface)
            source = Retrying(PluginHost().deserialize_source(record.source.scheme, record.source.state))
            disk = self._disk(source, record)
            pairs = [_pair() for _ in range(record.device.connections)]
            if mode == "connect":
                # serve first: the kernel may read while CONNECT is still running
                for server_end, _k in pairs:
                    self._serve(server_end, disk)
                index = link.connect([k for _s, k in pairs], size=record.device.size,
                                     block_size=record.device.block_size,
                                     dead_timeout=record.device.dead_timeout, backend=self.backend)
                for _s, kernel_end in pairs:
                    kernel_end.close()  # the kernel holds its own reference
            else:
                index = record.device.index
                self._reconnect(link, index, pairs, disk)
        except ErofsMountError as exc:
            return self.fail(exc)
        record = attrs.evolve(record, daemon_pid=os.getpid(), device=attrs.evolve(record.device, index=index))
        self.store.write(self.record_path, record)
        log.info("serving nbd%d from %s:%s (%s)", index, record.source.scheme,
                 record.source.location, source.describe())
        self.ready.ready(index)
        for t in self.threads:
            t.join()
        link.wait()
        source.close()
        if self.reasons and all(r == "disconnect" for r in self.reasons):
            log.info("nbd%d disconnected; removing %s", index, self.record_path)
            self.store.remove(self.record_path)
            return 0
        log.warning("connections ended (%s); keeping %s for reattach", ", ".join(self.reasons), self.record_path)
        return 1

    @staticmethod
    def _disk(source: Source, record: rec.Record) -> Disk:
        disk = Disk(source, record.device.size)
        if source.size > disk.size or disk.size - source.size >= record.device.block_size:
            raise DeviceStateError(
                f"the source is now {source.size} bytes, the device was made for {record.device.size}: refusing it")
        return disk

    def _serve(self, sock: socket.socket, disk: Disk) -> None:
        n = len(self.threads)

        def work() -> None:
            try:
                self.reasons.append(transmit(sock, disk, peer=f"connection {n}"))
            finally:
                sock.close()

        t = threading.Thread(target=work, name=f"nbd-conn-{n}", daemon=True)
        t.start()
        self.threads.append(t)

    def _reconnect(self, link: KernelLink, index: int, pairs: list[SocketPair], disk: Disk) -> None:
        """Hand the kernel new sockets until it has taken all of them.

        The kernel silently drops a new socket while none of the device's
        connections is marked dead; a dropped socket shows as EOF on our end.
        """
        deadline = time.monotonic() + RECONNECT_PATIENCE
        pending = pairs
        while True:
            link.reconnect(index, [k for _s, k in pending], backend=self.backend)
            for _s, k in pending:
                k.close()
            dropped = _dropped([s for s, _k in pending])
            for s, _k in pending:
                if s in dropped:
                    s.close()
                else:
                    self._serve(s, disk)
            if not dropped:
                return
            if time.monotonic() > deadline:
                raise DeviceStateError(
                    f"nbd{index}: the kernel did not take {len(dropped)} new connection(s); "
                    "its old connections are not dead (is another daemon serving it?)")
            time.sleep(0.2)
            pending = [_pair() for _ in dropped]


def _pair() -> SocketPair:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _dropped(server_ends: list[socket.socket], wait: float = 0.3) -> list[socket.socket]:
    """The sockets whose peer the kernel closed at once (EOF without a request)."""
    time.sleep(wait)
    readable, _, _ = select.select(server_ends, [], [], 0)
    dropped = []
    for s in readable:
        try:
            if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                dropped.append(s)
        except OSError:
            dropped.append(s)
    return dropped


def _harden() -> None:
    """Survive memory pressure: the kernel's page reclaim may wait on our device."""
    try:
        Path("/proc/self/oom_score_adj").write_text("-900\n")
    except OSError:
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erofs-mount-daemon")
    parser.add_argument("mode", choices=protocol.MODES)
    parser.add_argument("record", type=Path)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--lock-fd", type=int, required=True)
    args = parser.parse_args(argv)
    protocol.receive_environment(sys.stdin.buffer)  # before any plugin loads: they may read it
    _logging.configure(sys.stderr, "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
                       limit=_logging.LOG_LIMIT)  # stderr is the record's .log file
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _harden()
    daemon = Daemon(args.record, protocol.ReadyPipe(args.ready_fd))
    try:
        protocol.check_lock(args.lock_fd, args.record)  # held until this process ends
        return daemon.run(args.mode)
    except ErofsMountError as exc:
        return daemon.fail(exc)
    except Exception as exc:  # a bug: keep the traceback in the log, a line for the user
        log.exception("daemon failed")
        return daemon.fail(KernelError(f"daemon failed: {type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    sys.exit(main())
