"""``erofs-mount watch``: reattach a device the moment its daemon dies.

The kernel multicasts NBD_CMD_LINK_DEAD as it sees a device's connection
end (``_nbd.events``); ``watch`` then reattaches that device at once, with a
daemon forked from itself (its code and plugins are loaded already, so no
interpreter has to start). When systemd runs the machine, where every
daemon has a service of its own (``_systemd``), the held reads are served
first by that fork, and then ``restart`` hands the device, in the
background, to a daemon in a service of its own. A device whose reattach fails is tried again on
the same back-off as ``reattach --all`` (10 s, 20 s... 10 minutes; the state
is shared, so the timer unit and ``watch`` agree), with one log line per
attempt. Every ``SWEEP_EVERY`` seconds, and whenever events were lost, it
looks at every device, as the timer would, and probes every live daemon
(``_liveness``): one that does not answer, or has had a request in its
hands for longer than ``--stuck-after``, is killed and replaced as a dead
one is.
"""

from __future__ import annotations

import logging
import select
import subprocess
import sys
import time

from . import _backoff as backoff
from . import _daemon
from . import _devices as devices
from . import _lifecycle as lifecycle
from . import _systemd as systemd
from ._daemon_start import SYSTEM_PATH, ForkStarter, daemon_alive, exec_environment, passed_environment, spawn
from ._errors import ErofsMountError
from ._nbd import sysfs
from ._nbd.events import LinkDeadEvents, Overrun
from ._plugins import PluginHost

log = logging.getLogger("erofs_mount.watch")

#: how often every device is looked at, events or not
SWEEP_EVERY = 30.0
#: a killed daemon's connections end a moment before its lock is free: how long a held lock may still be its
EXIT_GRACE = 2.0
EXIT_POLL = 0.05
#: after a reattach, how long the end of a connection of the replaced daemon is taken for that, not a death
REPLACED_GRACE = 10.0
#: how often a device's move into a service of its own is looked at
MOVE_POLL = 0.5


class Watcher:
    """The devices due a look, and what a look does."""

    def __init__(self, events: LinkDeadEvents, stuck_after: float = lifecycle.liveness.STUCK_AFTER) -> None:
        self.events = events
        self.stuck_after = stuck_after  # 0: live daemons are not probed
        self.clock = time.monotonic
        self.host = PluginHost()
        self.forked = ForkStarter(self.host, _daemon.serve)
        self.in_services = systemd.systemd_run(SYSTEM_PATH) is not None
        self.moving: dict[int, subprocess.Popen[bytes]] = {}  # device index -> its ``restart`` into a service
        self.due: dict[int, float] = {}  # device index -> when to look at it next
        self.dying: dict[int, float] = {}  # device index -> until when its daemon may still be exiting
        self.died: dict[int, float] = {}  # device index -> when its connection died
        self.reattached: dict[int, float] = {}  # device index -> when this watch reattached it last
        self.next_sweep = 0.0

    def run(self) -> None:
        while True:
            now = self.clock()
            if now >= self.next_sweep:
                self.sweep(now)
            wake = min([self.next_sweep, *self.due.values(), *([now + MOVE_POLL] if self.moving else [])])
            if select.select([self.events], [], [], max(0.0, wake - now))[0]:
                self.heard(self.clock())
            self.moved()
            now = self.clock()
            for index in [i for i, t in self.due.items() if t <= now]:
                del self.due[index]
                self.look(index, now)

    def heard(self, now: float) -> None:
        try:
            indexes = self.events.read()
        except Overrun:
            log.warning("nbd events were lost; looking at every device")
            self.next_sweep = now
            return
        for index in indexes:
            if now - self.reattached.get(index, -REPLACED_GRACE) < REPLACED_GRACE:
                # the kernel ends each connection of the daemon a reattach replaced: one event each
                log.info("nbd%d: a connection of the daemon it replaced ended (the device is served)", index)
            elif index not in self.dying:
                log.info("nbd%d: a connection died", index)
                self.died[index] = now
            self.due[index] = now
            self.dying[index] = now + EXIT_GRACE

    def sweep(self, now: float) -> None:
        self.next_sweep = now + SWEEP_EVERY
        if self.stuck_after:
            for index, path in devices.live_devices():
                if index in self.dying:
                    continue
                try:
                    if lifecycle.end_if_hung(index, path, self.stuck_after) is None:
                        continue
                except ErofsMountError as exc:
                    log.error("nbd%d: its daemon fails its liveness probe but could not be ended: %s", index, exc)
                    continue
                self.died[index] = self.clock()
        devices.prune_orphans()
        for index, _path in devices.dead_devices():
            self.due.setdefault(index, now)

    def look(self, index: int, now: float) -> None:
        info = sysfs.device(index)
        path = devices.record_path_of(info) if info is not None and info.configured else None
        if path is None:  # disconnected meanwhile, or not ours
            self._forget(index)
            return
        if daemon_alive(path):
            if now < self.dying.get(index, 0.0):
                self.due[index] = now + EXIT_POLL  # its dying daemon may still hold the lock
            else:
                self._forget(index)  # healthy, or reattached by someone else
            return
        outcome = lifecycle.reattach_when_due(
            index, path, now=time.time(), start=lambda p: spawn("reattach", p, starter=self.forked),
            host=self.host)
        if outcome.error is not None:
            log.error("nbd%d: reattach failed: %s; next attempt in %.0f s", index, outcome.error, outcome.due_in)
        elif outcome.due_in is not None:
            log.warning("nbd%d: its reattach keeps failing; next attempt in %.0f s", index, outcome.due_in)
        elif outcome.by_another:
            log.info("nbd%d: reattached by another command", index)
            self._forget(index)
            return
        else:
            since = self.died.get(index)
            took = f" {self.clock() - since:.2f} s after its connection died" if since is not None else ""
            log.info("nbd%d: reattached%s", index, took)
            self._forget(index)
            self.reattached[index] = self.clock()
            if self.in_services:
                self.move(index)
            return
        self.due[index] = now + (outcome.due_in or backoff.RETRY_FIRST)
        self.dying.pop(index, None)

    def move(self, index: int) -> None:
        """Hand the device from the daemon forked here to one in a service of its own (``restart``)."""
        self.moving[index] = subprocess.Popen(
            [sys.executable, "-I", "-m", "erofs_mount_core._main", "restart", f"/dev/nbd{index}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/",
            env={**passed_environment(), **exec_environment()}, start_new_session=True)

    def moved(self) -> None:
        for index, proc in list(self.moving.items()):
            if proc.poll() is None:
                continue
            del self.moving[index]
            assert proc.stderr is not None
            said = proc.stderr.read().decode(errors="replace").strip().splitlines()
            proc.stderr.close()
            if proc.returncode == 0:
                log.info("nbd%d: moved to a daemon in a service of its own", index)
            else:
                log.warning("nbd%d: stays with the daemon forked here: %s", index,
                            said[-1] if said else f"restart exit status {proc.returncode}")

    def _forget(self, index: int) -> None:
        self.dying.pop(index, None)
        self.died.pop(index, None)


def watch(stuck_after: float = lifecycle.liveness.STUCK_AFTER) -> None:
    """Run until killed (the daemons it started live on: each is in a session of its own)."""
    lifecycle.require_root("watch")
    events = LinkDeadEvents()
    log.info("watching nbd devices for dead connections")
    try:
        Watcher(events, stuck_after).run()
    finally:
        events.close()
