"""The serving daemon: one process per attached device.

Started by ``mount`` (to connect a new device) and by ``reattach`` (to hand
a device whose daemon died a new set of connections). It rebuilds its
source from the record, so both paths check the source's identity the same
way. It inherits the record's lock, already held, and checks that it
holds it before serving; it reports one line on the ready pipe, serves
until the kernel disconnects, then removes its record (both as
``_daemon_start`` says). Killed, it leaves the record for the next
reattach. Every source is served through ``Retrying``, the one retry on
the read path.

    python -m erofs_mount_core._daemon {connect|reattach} RECORD --ready-fd N --lock-fd N
    python -m erofs_mount_core._daemon take-over RECORD --ready-fd N
    python -m erofs_mount_core._daemon MODE RECORD --channel PATH     (a systemd service)

As a systemd service (``_systemd``) it says READY=1 once it serves, and
pings the watchdog while no request has been stuck for ``STUCK_REQUEST``.

``take-over`` is ``restart``'s: the new daemon takes the device's
connections and lock from the running one through its control socket
(``_control``), so the kernel never sees a connection end.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import attrs

from . import _daemon_start as protocol
from . import _logging
from . import _record as rec
from . import _systemd as systemd
from ._control import ControlServer, take_over
from ._errors import DeviceStateError, ErofsMountError, KernelError
from ._filters import Retrying
from ._kill_points import kill_point
from ._metrics import DeviceStats
from ._nbd.link import KernelLink, link_named
from ._nbd.transmission import HANDED_OVER, Disk, transmit
from ._plugins import PluginHost
from ._source import Source

log = logging.getLogger("erofs_mount.daemon")

#: how long a reattach keeps trying while the kernel has not yet noticed the
#: old connections died (it drops a new socket while no connection is dead)
RECONNECT_PATIENCE = 10.0
#: how often an idle connection looks whether it is being handed over, in seconds
IDLE_CHECK = 0.2
#: threads serving each kernel connection: a read that waits on the network holds up no other
THREADS_PER_CONNECTION = 8
#: how long a hand-over waits for the requests in flight to finish
DRAIN_TIMEOUT = 60.0
PR_SET_IO_FLUSHER = 57
PR_SET_NAME = 15
#: every daemon's name in ps, top and pgrep (its comm)
PROCESS_NAME = b"erofs-mountd"

SocketPair = tuple[socket.socket, socket.socket]


class Daemon:
    def __init__(self, record_path: Path, ready: protocol.ReadyPipe, host: PluginHost | None = None,
                 service: systemd.Service | None = None) -> None:
        self.record_path = record_path
        self.service = service or systemd.Service()
        self.host = host
        self.backend = str(record_path)
        self.ready = ready
        self.store = rec.RecordStore(record_path.parent)
        self.reasons: list[str] = []
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.stats = DeviceStats()
        self.source: Source | None = None
        self.disk: Disk | None = None
        self.lock_fd = -1
        self.index = -1
        self.stop = threading.Event()  # set while the connections are being handed over
        self.finished = threading.Event()  # every connection ended, or was handed over
        self.handed_over = False
        self._live = 0
        self._live_lock = threading.Lock()

    def fail(self, exc: ErofsMountError) -> int:
        log.error("%s", exc)
        self.ready.failed(exc)
        return exc.exit_code

    def run(self, mode: str, lock_fd: int | None) -> int:
        try:
            record = self.store.read(self.record_path)
            link = link_named(record.device.interface)
            source = self.source = Retrying((self.host or PluginHost()).deserialize_source(record.source.scheme,
                                                                            record.source.state))
            disk = self.disk = self._disk(source, record)
            if mode == "take-over":
                index = record.device.index
                self._take_over(disk)
            else:
                assert lock_fd is not None
                self.lock_fd = lock_fd
                pairs = [_pair() for _ in range(record.device.connections)]
                if mode == "connect":
                    # serve first: the kernel may read while CONNECT is still running
                    for server_end, _k in pairs:
                        self._serve(server_end, disk)
                    kill_point("daemon:before-connect")
                    index = link.connect([k for _s, k in pairs], size=record.device.size,
                                         block_size=record.device.block_size,
                                         dead_timeout=record.device.dead_timeout, backend=self.backend)
                    for _s, kernel_end in pairs:
                        kernel_end.close()  # the kernel holds its own reference
                    kill_point("daemon:after-connect")
                else:
                    index = record.device.index
                    kill_point("daemon:before-reconfigure")
                    self._reconnect(link, index, pairs, disk)
                    kill_point("daemon:after-reconfigure")
        except ErofsMountError as exc:
            return self.fail(exc)
        self.index = index
        record = attrs.evolve(record, daemon_pid=os.getpid(), device=attrs.evolve(record.device, index=index))
        self.store.write(self.record_path, record)
        kill_point("daemon:before-ready")
        try:
            ControlServer(self.record_path, stats=self.snapshot, hand_over=self.hand_over,
                          resume=self.resume, handed=self._handed)
        except OSError as exc:  # serving matters more: only stats and restart will not reach this daemon
            log.warning("no control socket (%s): stats and restart cannot reach this daemon", exc)
        log.info("serving nbd%d from %s:%s (%s)", index, record.source.scheme,
                 record.source.location, source.describe())
        self.service.notify("READY=1", f"STATUS=serving nbd{index}", f"MAINPID={os.getpid()}")
        if self.service.watchdog:
            threading.Thread(target=self._watchdog, args=(self.service.watchdog / 2,), name="watchdog",
                             daemon=True).start()
        self.ready.ready(index)
        source.start_background()
        self.finished.wait()
        if self.handed_over:
            log.info("nbd%d handed over to a new daemon; this one exits", index)
            self.service.notify("STOPPING=1")
            return 0
        link.wait()
        source.close()
        if self.reasons and all(r == "disconnect" for r in self.reasons):
            log.info("nbd%d disconnected; removing %s", index, self.record_path)
            self.store.remove(self.record_path)
            return 0
        log.warning("connections ended (%s); keeping %s: nbd%d's reads wait until "
                    "'erofs-mount reattach /dev/nbd%d'", ", ".join(self.reasons), self.record_path, index, index)
        return 1

    def on_sigterm(self, signum: int, _frame: object) -> None:
        """Say which command brings the device back, then die of the signal as if unhandled."""
        if self.index >= 0:
            log.warning("ending on SIGTERM: nbd%d's reads wait until 'erofs-mount reattach /dev/nbd%d' "
                        "(or the watch service) gives it a new daemon", self.index, self.index)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @staticmethod
    def _disk(source: Source, record: rec.Record) -> Disk:
        disk = Disk(source, record.device.size)
        if source.size > disk.size or disk.size - source.size >= record.device.block_size:
            raise DeviceStateError(
                f"the source is now {source.size} bytes, the device was made for {record.device.size}: refusing it")
        return disk

    def _serve(self, sock: socket.socket, disk: Disk) -> None:
        """Serve ``sock`` on a thread of its own until it ends or ``stop`` hands it over."""
        n = len(self.threads)
        stats = self.stats.connection()
        # an idle connection looks at ``stop`` this often (a receive timeout costs nothing while busy)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, int(IDLE_CHECK * 1e6)))
        with self._live_lock:
            self._live += 1

        def work() -> None:
            reason = transmit(sock, disk, peer=f"connection {n}", stats=stats, stop=self.stop,
                              threads=THREADS_PER_CONNECTION)
            if reason == HANDED_OVER:
                return  # the socket stays open: it is about to be given away
            sock.close()
            self.reasons.append(reason)
            with self._live_lock:
                self._live -= 1
                if self._live == 0:
                    self.finished.set()

        t = threading.Thread(target=work, name=f"nbd-conn-{n}", daemon=True)
        t.start()
        self.threads.append(t)
        self.sockets.append(sock)

    def _watchdog(self, every: float) -> None:
        """Ping systemd's watchdog while serving is healthy; a stuck request stops the pings, once logged."""
        stuck_said = False
        while not self.finished.wait(every):
            stuck = self.stuck()
            if not stuck:
                self.service.notify("WATCHDOG=1")
            elif not stuck_said:
                log.error("%d request(s) stuck for more than %.0f s: no watchdog ping, systemd will end this daemon",
                          stuck, systemd.STUCK_REQUEST)
            stuck_said = bool(stuck)

    def stuck(self) -> int:
        """How many connections have been inside one request for more than ``STUCK_REQUEST``."""
        since = time.monotonic_ns() - int(systemd.STUCK_REQUEST * 1e9)
        return sum(1 for c in self.stats.connections if 0 < c.started < since)

    def snapshot(self) -> dict[str, object]:
        assert self.source is not None
        now = time.monotonic_ns()
        oldest = max((now - c.started for c in self.stats.connections if c.started > 0), default=0)
        refused = self.source.refusal()
        return {**({"refused": refused} if refused else {}), "pid": os.getpid(), "device": f"nbd{self.index}",
                "connections": self._live,
                "unit": systemd.unit_of_this_process(), "oldest_request_seconds": round(oldest / 1e9, 3),
                **self.stats.snapshot(self.source.counters())}

    # -- hot upgrade: the connections go to a new daemon (``_control``) --

    def hand_over(self) -> tuple[int, list[socket.socket], dict[str, object]]:
        """Stop every connection between two requests; give away the lock, the sockets and the counts."""
        self.stop.set()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self.threads):
            self.resume()
            raise DeviceStateError(f"a request took longer than {DRAIN_TIMEOUT:.0f} s to finish; try again")
        handed = [s for s in self.sockets if s.fileno() != -1]
        return self.lock_fd, handed, self.snapshot()

    def _handed(self) -> None:
        self.handed_over = True
        self.finished.set()

    def resume(self) -> None:
        """The hand-over failed: serve the connections it stopped again."""
        assert self.disk is not None
        stopped = [s for s in self.sockets if s.fileno() != -1]
        self.stop.clear()
        self.threads, self.sockets = [], []
        with self._live_lock:
            self._live -= len(stopped)
        for sock in stopped:
            self._serve(sock, self.disk)

    def _take_over(self, disk: Disk) -> None:
        """``restart``: take the device's connections and lock from its running daemon."""
        handover = take_over(self.record_path)
        protocol.check_lock(handover.lock_fd, self.record_path)
        self.lock_fd = handover.lock_fd
        self.stats = DeviceStats(carried=handover.carried)
        handover.taken()  # from here the old daemon exits, and the sockets are ours alone
        for sock in handover.sockets:
            self._serve(sock, disk)

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


def _dropped(server_ends: list[socket.socket], wait: float = 0.05) -> list[socket.socket]:
    """The sockets whose peer the kernel closed at once (EOF without a request).

    The kernel drops a socket inside the RECONFIGURE call, so its EOF shows as
    soon as our copy of its end is closed; ``wait`` is a margin.
    """
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
    """Survive memory pressure (the kernel's page reclaim may wait on our device), and be findable:
    ``pgrep erofs-mountd`` finds every daemon, a fork of ``watch`` too (its command line is watch's)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("-900\n")
    except OSError:
        pass
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0)
    libc.prctl(PR_SET_NAME, PROCESS_NAME, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erofs-mount-daemon")
    parser.add_argument("mode", choices=protocol.MODES)
    parser.add_argument("record", type=Path)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--lock-fd", type=int, help="the record's lock, held (not for take-over: it comes "
                        "from the daemon handing the device over)")
    parser.add_argument("--channel", type=Path, help="a systemd service's start: the socket that gives the "
                        "environment and the lock and takes the ready line")
    args = parser.parse_args(argv)
    service = systemd.Service()  # systemd's variables, before the caller's are taken in
    # the caller's environment comes before any plugin loads: they may read it
    if args.channel is not None:
        try:
            ready_fd, lock_fd = protocol.receive_start(args.channel)
        except ErofsMountError as exc:
            print(f"erofs-mountd: {exc}", file=sys.stderr)
            return exc.exit_code
    elif args.ready_fd is not None:
        protocol.receive_environment(sys.stdin.buffer.read())
        ready_fd, lock_fd = args.ready_fd, args.lock_fd
    else:
        parser.error("--ready-fd or --channel is needed")
    return serve(args.mode, args.record, ready_fd, lock_fd, service=service)


def serve(mode: str, record_path: Path, ready_fd: int, lock_fd: int | None, host: PluginHost | None = None,
          service: systemd.Service | None = None) -> int:
    """The daemon's life, in a new process or in a fork of ``watch`` (with its plugins loaded: ``host``)."""
    service = service or systemd.Service()
    if service.journal:  # systemd keeps time, pid and bounds
        _logging.configure(sys.stderr, "%(levelname)s %(name)s: %(message)s", journal=True)
    else:  # stderr is the record's .log file
        _logging.configure(sys.stderr, "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
                           limit=_logging.LOG_LIMIT)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _harden()
    daemon = Daemon(record_path, protocol.ReadyPipe(ready_fd), host, service)
    signal.signal(signal.SIGTERM, daemon.on_sigterm)
    try:
        if lock_fd is not None:
            protocol.check_lock(lock_fd, record_path)  # held until this process ends
        elif mode != "take-over":
            raise KernelError("daemon started without its lock")
        return daemon.run(mode, lock_fd)
    except ErofsMountError as exc:
        return daemon.fail(exc)
    except Exception as exc:  # a bug: keep the traceback in the log, a line for the user
        log.exception("daemon failed")
        return daemon.fail(KernelError(f"daemon failed: {type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    sys.exit(main())
