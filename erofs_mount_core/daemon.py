"""The serving daemon: one process per attached device.

Started by ``mount`` (to connect a new device) and by ``reattach`` (to hand
a device whose daemon died a new set of connections). It rebuilds its
source from the record, so both paths check the source's identity the same
way. It inherits the record's lock, already held: a held lock means a live
daemon. It reports one line on the ready pipe (``READY <index>`` or
``ERROR <exit code> <message>``), serves until the kernel disconnects, then
removes its record. Killed, it leaves the record for the next reattach.

    python -m erofs_mount_core.daemon {connect|reattach} RECORD --ready-fd N --lock-fd N
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

from . import record as rec
from .errors import DeviceStateError, ErofsMountError, KernelError
from .nbd import protocol as p
from .nbd.server import Export, serve
from .plugins import PluginHost

log = logging.getLogger("erofs_mount.daemon")

#: how long a reattach keeps trying while the kernel has not yet noticed the
#: old connections died (it drops a new socket while no connection is dead)
RECONNECT_PATIENCE = 10.0
PR_SET_IO_FLUSHER = 57


class Daemon:
    def __init__(self, record_path: Path, ready_fd: int) -> None:
        self.record_path = record_path
        self.ready = os.fdopen(ready_fd, "w")
        self.store = rec.RecordStore(record_path.parent)
        self.reasons: list[str] = []

    # -- reporting to the parent -----------------------------------------

    def _report(self, line: str) -> None:
        if self.ready.closed:
            return
        try:
            self.ready.write(line + "\n")
            self.ready.close()
        except BrokenPipeError:  # the parent gave up waiting
            pass

    def fail(self, exc: ErofsMountError) -> int:
        log.error("%s", exc)
        self._report(f"ERROR {exc.exit_code} {exc}".replace("\n", " "))
        return exc.exit_code

    # -- the two ways in -----------------------------------------------

    def run(self, mode: str) -> int:
        try:
            record = self.store.read(self.record_path)
            source = PluginHost().deserialize_source(record.source.scheme, record.source.state)
            export = Export(source, record.device.size)
            if export.size != record.device.size or source.size > export.size:
                raise DeviceStateError(
                    f"the source is now {source.size} bytes, the device was made for {record.device.size}: refusing it"
                )
            pairs = [self._pair() for _ in range(record.device.connections)]
            threads: list[threading.Thread] = []
            if mode == "connect":
                # serve first: the kernel may read while CONNECT is still running
                threads += [self._start(s, export, n) for n, (s, _k) in enumerate(pairs)]
                if record.device.interface == "ioctl":
                    index, kernel_thread = self._connect_ioctl(record, pairs[0][1])
                    threads.append(kernel_thread)
                else:
                    index = self._connect(record, [k for _s, k in pairs])
            else:
                index = self._reconnect(record, pairs, export, threads)
        except ErofsMountError as exc:
            return self.fail(exc)
        record = attrs.evolve(record, daemon_pid=os.getpid(),
                              device=attrs.evolve(record.device, index=index))
        self.store.write(self.record_path, record)
        log.info("serving nbd%d from %s:%s (%s)", index, record.source.scheme,
                 record.source.location, source.describe())
        self._report(f"READY {index}")
        for t in threads:
            t.join()
        source.close()
        if self.reasons and all(r == "disconnect" for r in self.reasons):
            log.info("nbd%d disconnected; removing %s", index, self.record_path)
            self.store.remove(self.record_path)
            return 0
        log.warning("connections ended (%s); keeping %s for reattach", ", ".join(self.reasons), self.record_path)
        return 1

    @staticmethod
    def _pair() -> tuple[socket.socket, socket.socket]:
        server, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return server, kernel

    def _start(self, sock: socket.socket, export: Export, n: int) -> threading.Thread:
        def work() -> None:
            try:
                self.reasons.append(serve(sock, export, peer=f"connection {n}"))
            finally:
                sock.close()

        t = threading.Thread(target=work, name=f"nbd-conn-{n}", daemon=True)
        t.start()
        return t

    def _connect(self, record: rec.Record, kernel_ends: list[socket.socket]) -> int:
        from .nbd.netlink import NBDNetlink

        flags = p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY
        if len(kernel_ends) > 1:
            flags |= p.FLAG_CAN_MULTI_CONN
        with NBDNetlink() as nl:
            index = nl.connect_device(
                [k.fileno() for k in kernel_ends], size=record.device.size,
                block_size=record.device.block_size, server_flags=flags,
                dead_timeout=record.device.dead_timeout, backend=str(self.record_path))
        for k in kernel_ends:
            k.close()  # the kernel holds its own reference
        return index

    def _connect_ioctl(self, record: rec.Record, kernel_end: socket.socket) -> tuple[int, threading.Thread]:
        """Attach through the legacy ioctls; a thread sits in NBD_DO_IT while the device lives."""
        from .nbd import ioctl

        index, device_fd = ioctl.attach(kernel_end.fileno(), size=record.device.size,
                                        block_size=record.device.block_size,
                                        flags=p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY)
        kernel_end.close()

        def sit() -> None:
            try:
                ioctl.do_it(device_fd)
            finally:
                os.close(device_fd)

        thread = threading.Thread(target=sit, name="nbd-do-it", daemon=True)
        thread.start()
        pid_file = Path(f"/sys/block/nbd{index}/pid")
        deadline = time.monotonic() + 10
        while not pid_file.exists():
            if not thread.is_alive() or time.monotonic() > deadline:
                raise KernelError(f"nbd{index} did not start serving (NBD_DO_IT)")
            time.sleep(0.02)
        return index, thread

    def _reconnect(self, record: rec.Record, pairs: list[tuple[socket.socket, socket.socket]],
                   export: Export, threads: list[threading.Thread]) -> int:
        """RECONFIGURE with new sockets until the kernel has taken all of them.

        The kernel silently drops a new socket while none of the device's
        connections is marked dead; a dropped socket shows as EOF on our end.
        """
        from .nbd.netlink import NBDNetlink

        index = record.device.index
        deadline = time.monotonic() + RECONNECT_PATIENCE
        pending = pairs
        with NBDNetlink() as nl:
            while True:
                nl.reconfigure_device(index, backend=str(self.record_path),
                                      fds=[k.fileno() for _s, k in pending])
                for _s, k in pending:
                    k.close()
                dropped = _dropped([s for s, _k in pending])
                threads += [self._start(s, export, len(threads)) for s, _k in pending if s not in dropped]
                for s in dropped:
                    s.close()
                if not dropped:
                    return index
                if time.monotonic() > deadline:
                    raise DeviceStateError(
                        f"nbd{index}: the kernel did not take {len(dropped)} new connection(s); "
                        "its old connections are not dead (is another daemon serving it?)")
                time.sleep(0.2)
                pending = [self._pair() for _ in dropped]


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
    parser.add_argument("mode", choices=["connect", "reattach"])
    parser.add_argument("record", type=Path)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--lock-fd", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _harden()
    daemon = Daemon(args.record, args.ready_fd)
    try:
        return daemon.run(args.mode)
    except Exception as exc:  # a bug: keep the traceback in the log, a line for the user
        log.exception("daemon failed")
        return daemon.fail(KernelError(f"daemon failed: {type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    sys.exit(main())
