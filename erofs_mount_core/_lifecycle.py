"""mount, umount, reattach, restart and stats: the verbs behind the CLI.

The parts they orchestrate each live in one place: plugins (``_plugins``),
records (``_record``), which devices are ours (``_devices``), a failed
reattach's back-off (``_backoff``), the daemon and its lock
(``_daemon_start``), the kernel's nbd driver (``_nbd.link``,
``_nbd.sysfs``) and mount(2) (``_mounts``); what ``list`` shows is
``_listing``'s.

Every command either completes or leaves the system as it found it: a
failed mount disconnects its device and removes its record; a refused
reattach leaves the device blocked (its reads wait) and the record intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from . import _backoff as backoff
from . import _liveness as liveness
from . import _mounts as mounts
from . import _record as rec
from ._control import ask_stats
from ._daemon_start import ForkStarter, Starter, daemon_alive, default_starter, locked, spawn, spawn_taker
from ._devices import (
    attached,
    dead_devices,
    detached,
    device_index,
    live_record,
    not_ours,
    prune_orphans,
    record_of,
    record_path_of,
    stats_or_nothing,
)
from ._erofs.check import check_erofs
from ._errors import (
    AlreadyServing,
    DeviceStateError,
    ErofsMountError,
    KernelError,
    NotRootError,
    PluginError,
    UnknownSchemeError,
    UsageError,
)
from ._kill_points import kill_point
from ._nbd import sysfs
from ._nbd.link import choose_link, disconnect_any, link_named
from ._source import split_spec

if TYPE_CHECKING:  # plugins (pluggy, importlib.metadata) load only in the commands that open sources
    from ._plugins import PluginHost

log = logging.getLogger("erofs_mount.lifecycle")

DEFAULT_BLOCK_SIZE = 512
#: one socket, served by several threads: the kernel (6.1 measured) may hand all of a device's
#: receive works to the one rescuer thread of its workqueue when it is slow to start workers (at boot,
#: under load), which then reads the replies of one socket alone; the others' wait 30 s for a retry
DEFAULT_CONNECTIONS = 1
DEFAULT_DEAD_TIMEOUT = 24 * 3600


@attrs.frozen
class DeviceSettings:
    """How the nbd device is set up: connections, dead-connection timeout, block size."""

    connections: int = DEFAULT_CONNECTIONS
    dead_timeout: int = DEFAULT_DEAD_TIMEOUT
    block_size: int = DEFAULT_BLOCK_SIZE


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRootError(what)


# -- mount -------------------------------------------------------------------

def mount(spec: str, mountpoint: str, options: Mapping[str, str] | None = None,
          settings: DeviceSettings = DeviceSettings(), *, stack: bool = False) -> str:
    """Attach ``spec`` to a new nbd device and mount it; return the device path.

    ``options`` are the ``-o`` pairs: mount(8)'s flags (``nosuid``, ``suid``,
    ``dev``, ``noexec``...; nosuid,nodev by default) for the mount, the rest for the source.
    ``stack``: mount over a mountpoint (refused otherwise).
    """
    require_root("mount")
    mount_options, options = mounts.split_options(options or {})
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} does not exist or is not a directory")
    if settings.connections < 1 or settings.block_size not in (512, 1024, 2048, 4096):
        raise UsageError("--connections must be >= 1 and --block-size one of 512, 1024, 2048, 4096")
    with _claimed(mountpoint, stack):
        return _mount(spec, mountpoint, mount_options, options, settings)


@contextlib.contextmanager
def _claimed(mountpoint: str, stack: bool = False) -> Iterator[None]:
    """One mount at a time onto ``mountpoint``, and none onto a mountpoint: the directory is locked (flock)
    from this check to its mount, so of two mounts at once the second sees the first's."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.ismount(mountpoint) and not stack:
            raise UsageError(f"{mountpoint} is already a mountpoint: unmount it first, mount elsewhere, "
                             "or mount over it with --stack")
        yield
    finally:
        os.close(fd)


def _mount(spec: str, mountpoint: str, mount_options: mounts.MountOptions, options: Mapping[str, str],
           settings: DeviceSettings) -> str:
    from ._filters import Retrying
    from ._plugins import PluginHost

    host = PluginHost()
    scheme, location = split_spec(spec)
    plugin = host.owner(scheme)
    # the kernel and the run directory first: no source is read (or downloaded) for a mount that cannot be made
    link = choose_link()
    store = rec.RecordStore()
    store.ensure()
    source = Retrying(host.open_source(scheme, location, options))
    try:
        check_erofs(source, spec)
        state = host.source_state(scheme, source)
        description = source.describe()
        size = -(-source.size // settings.block_size) * settings.block_size
    finally:
        source.close()
    connections = min(settings.connections, link.max_connections)

    prune_orphans()
    path = store.new_path()
    kill_point("mount:before-record")
    record = rec.Record(
        format=rec.FORMAT, created=rec.now(), daemon_pid=0,
        device=rec.DeviceRecord(index=-1, size=size, block_size=settings.block_size,
                                connections=connections, dead_timeout=settings.dead_timeout,
                                interface=link.name),
        source=rec.SourceRecord(scheme=scheme, location=location, description=description,
                                plugin=plugin.name, distribution=plugin.distribution or "",
                                state=state),
    )
    with locked(path) as lock_fd:  # from before the record exists: no one takes it for an orphan
        store.write(path, record)
        kill_point("mount:record-written")
        try:
            index = spawn("connect", path, forked(host), lock_fd=lock_fd)
        except BaseException:
            _disconnect_named(path)  # a daemon that died after CONNECT leaves a device naming the record
            store.remove(path)
            raise
    kill_point("mount:daemon-ready")
    device = f"/dev/nbd{index}"
    try:
        mounts.mount_erofs(device, os.path.realpath(mountpoint), mount_options)
    except BaseException:
        _disconnect_and_wait(index, path)
        raise
    kill_point("mount:mounted")
    try:
        link.disconnect_on_close(index, backend=str(path))  # a plain umount(8) now ends the daemon too
    except ErofsMountError as exc:  # the mount works: keep it, say what is missing
        print(f"warning: {device}: {exc}; a plain umount(8) will not end its daemon, "
              "use 'erofs-mount umount'", file=sys.stderr)
    return device


def _disconnect_named(record_path: Path) -> None:
    """Disconnect every device whose backend names ``record_path`` (none is mounted yet)."""
    for info in sysfs.devices():
        if info.configured and info.backend == str(record_path):
            with contextlib.suppress(ErofsMountError):
                disconnect_any(info.index)


#: how long umount waits for a disconnected device's daemon to exit
DAEMON_EXIT_TIMEOUT = 10.0


def _disconnect_and_wait(index: int, record_path: Path, timeout: float = DAEMON_EXIT_TIMEOUT) -> None:
    """Disconnect the device, let its daemon exit, and remove its files under its lock.

    The daemon frees its lock and removes its files as it ends, before its
    process is gone: the wait is for the process, so a umount that returns
    leaves no daemon behind. A daemon that outlives ``timeout`` keeps its
    files (and the next umount or reattach finds them).
    """
    process = _daemon_process(record_path)
    try:
        disconnect_any(index)
        deadline = time.monotonic() + timeout
        while daemon_alive(record_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process is not None:
            select.select([process], [], [], max(0.0, deadline - time.monotonic()))  # readable once it ended
    finally:
        if process is not None:
            os.close(process)
    try:
        with locked(record_path):
            rec.RecordStore.remove(record_path)
    except DeviceStateError:
        if not record_path.exists():
            return  # the daemon removed them itself as it ended
        raise KernelError(f"nbd{index} was disconnected, but its daemon did not exit within {timeout:.0f} s; "
                          f"its record {record_path} is kept") from None


def _daemon_process(record_path: Path) -> int | None:
    """A pidfd of the daemon the record names, if that process holds the record's lock; else None."""
    try:
        pid = rec.RecordStore.read(record_path).daemon_pid
        process = os.pidfd_open(pid) if pid > 0 else None
    except (ErofsMountError, OSError):
        return None
    if process is not None and not liveness.holds_lock(pid, record_path):  # (checked after the pidfd: no pid reused)
        os.close(process)
        return None
    return process


# -- umount ------------------------------------------------------------------

@attrs.frozen
class Unmounted:
    """What ``umount`` did: the device, and what the user should know (it still serves elsewhere...)."""

    device: str
    notes: list[str] = attrs.field(factory=list)


def umount(target: str, lazy: bool = False) -> Unmounted:
    """Unmount a mountpoint (or every mountpoint of a device), disconnect the device, end its daemon.

    A mountpoint whose device is mounted elsewhere too is unmounted alone; the device serves on.
    ``lazy``: detach the mounts at once; the kernel disconnects the device (and its daemon ends)
    when its last user lets go, as it was told at mount.
    """
    require_root("umount")
    index = device_index(target)
    device = f"/dev/nbd{index}"
    a_mountpoint = os.path.isdir(target) and not target.startswith("/dev/")
    points = [os.path.realpath(target)] if a_mountpoint else mounts.mountpoints_of(device)
    info = sysfs.device(index)
    connected = info is not None and info.configured
    record_path = record_path_of(info) if info is not None and connected else None
    if connected and record_path is None:  # before anything is unmounted
        raise DeviceStateError(f"{not_ours(device, info)}: leave it to the tool that attached it")
    for mp in reversed(points):
        mounts.umount(mp, lazy=lazy)
    if still := mounts.mountpoints_of(device):
        return Unmounted(device, [f"{device} is still mounted on {', '.join(still)} and serves on "
                                  f"('erofs-mount umount {device}' unmounts it everywhere)"])
    if lazy:
        return Unmounted(device, [f"{device}: detached; it is disconnected, and its daemon ends, "
                                  "when the last file open on it is closed"])
    if record_path is None:
        if not _forget_detached(index):
            raise DeviceStateError(f"{device} is not connected")
        return Unmounted(device)
    _disconnect_and_wait(index, record_path)
    return Unmounted(device)


def _forget_detached(index: int) -> bool:
    """Remove the record of detached device ``index`` (its filesystem now unmounted); False if none."""
    for path, record in detached():
        if record is not None and record.device.index == index:
            with contextlib.suppress(DeviceStateError):
                with locked(path):
                    rec.RecordStore.remove(path)
            return True
    return False


# -- reattach ----------------------------------------------------------------

def reattach(target: str, start: Callable[[Path], int] | None = None, host: PluginHost | None = None, *,
             force: bool = False, stuck_after: float = liveness.STUCK_AFTER) -> int:
    """Give a device whose daemon died a new daemon; return its index.

    ``start`` starts the daemon (by default a new process); ``host`` is the plugins, if loaded already.
    ``force``: a daemon that holds the device but fails its liveness probe (``_liveness``) is ended first.
    Raises AlreadyServing (exit 0) if a live daemon holds it; a failure is kept beside the record,
    with why, for ``list`` and for the back-off of ``reattach --all``.
    """
    require_root("reattach")
    index = device_index(target)
    record_path = record_of(index, "nothing to reattach")
    return _attempt(index, record_path, start, host, force, stuck_after)


def _attempt(index: int, record_path: Path, start: Callable[[Path], int] | None = None,
             host: PluginHost | None = None, force: bool = False, stuck_after: float = liveness.STUCK_AFTER,
             now: float | None = None) -> int:
    """One reattach; its failure (not a live daemon found) is kept beside the record, with why."""
    try:
        started = _reattach(index, record_path, start, host, force, stuck_after)
    except AlreadyServing:
        raise
    except ErofsMountError as exc:
        if record_path.exists() or _names(index, record_path):  # not a device umount took away meanwhile
            backoff.note_failure(record_path, exc, time.time() if now is None else now)
        raise
    backoff.clear(record_path)
    return started


def _names(index: int, record_path: Path) -> bool:
    """Whether device ``index`` is still connected with ``record_path`` for its record (umount disconnects a
    device before it removes the record: a record gone from a device that names it is lost, not taken away)."""
    info = sysfs.device(index)
    return info is not None and info.configured and record_path_of(info) == record_path


def _reattach(index: int, record_path: Path, start: Callable[[Path], int] | None, host: PluginHost | None,
              force: bool, stuck_after: float) -> int:
    from ._plugins import PluginHost

    record = rec.RecordStore.read(record_path)
    link_named(record.device.interface).check_reattach(index)
    host = host or PluginHost()
    _check_plugin(record, host)
    kill_point("reattach:before-spawn")
    if force and daemon_alive(record_path) and end_if_hung(index, record_path, stuck_after) is None:
        raise AlreadyServing(f"nbd{index}: its daemon (pid {record.daemon_pid}) answers and serves: "
                             "--force ends only a daemon that fails its liveness probe; nothing to do")
    try:
        return start(record_path) if start else spawn("reattach", record_path, forked(host))
    except DeviceStateError as exc:
        raise type(exc)(f"nbd{index}: {exc}") from None


@attrs.frozen
class Reattached:
    """One device's outcome in ``reattach_all``: its index, the error if it failed, and in how
    many seconds it is due again if it failed or was skipped (its reattach keeps failing)."""

    index: int
    error: ErofsMountError | None = None
    due_in: float | None = None
    by_another: bool = False
    """a live daemon was found: another command reattached it first (nothing to do)"""


def reattach_all(now: float | None = None) -> list[Reattached]:
    """Reattach every erofs-mount device whose daemon is gone; a failure does not stop the others.

    A device whose reattach failed is tried again after 10 s, then 20 s, 40 s... up to 10 minutes,
    so a timer that runs this every few seconds does not hammer a registry or fill the journal.
    ``reattach DEVICE`` always tries at once.
    """
    require_root("reattach")
    prune_orphans()  # records a killed mount or a lost daemon left without a device
    return [reattach_when_due(index, path, now) for index, path in dead_devices()]


def reattach_when_due(index: int, record_path: Path, now: float | None = None,
                      start: Callable[[Path], int] | None = None, host: PluginHost | None = None) -> Reattached:
    """Reattach one device unless its back-off says not yet (another command that got there
    first is a success). ``start`` and ``host`` as for ``reattach`` (``watch`` forks its daemons)."""
    now = time.time() if now is None else now
    failure = backoff.last_failure(record_path)
    if failure is not None and now < failure.due:
        return Reattached(index, due_in=failure.due - now)
    try:
        _attempt(index, record_path, start, host, now=now)
    except AlreadyServing:
        return Reattached(index, by_another=True)
    except ErofsMountError as exc:
        return Reattached(index, exc, due_in=backoff.delay(0 if failure is None else failure.count))
    return Reattached(index)


def forked(host: PluginHost) -> Starter:
    """How this command starts a daemon: a service of its own under systemd, else a fork of itself
    (its code and ``host``'s plugins are loaded: no new interpreter to wait for)."""
    import threading

    from ._daemon import serve

    if threading.active_count() > 1:  # a fork has this thread alone: a lock another one holds would stay held
        return default_starter()
    return default_starter(ForkStarter(host, serve))


def _check_plugin(record: rec.Record, host: PluginHost) -> None:
    try:
        host.owner(record.source.scheme)
    except UnknownSchemeError:
        dist = record.source.distribution or f"the plugin providing {record.source.scheme!r}"
        raise PluginError(
            f"the record needs source type {record.source.scheme!r}: install {dist} (pip install {dist})"
        ) from None


def end_if_hung(index: int, record_path: Path, stuck_after: float) -> str | None:
    """End the device's daemon if it fails its liveness probe; why it was ended, or None if it passed."""
    why = liveness.probe(record_path, stuck_after)
    if why is not None:
        pid = rec.RecordStore.read(record_path).daemon_pid
        log.warning("nbd%d: its daemon (pid %d) %s: ending it", index, pid, why)
        liveness.end(record_path, pid)
    return why


# -- restart -----------------------------------------------------------------


#: daemons ``restart --all`` starts at once (each is a new interpreter opening its source)
RESTARTS_AT_ONCE = 8


@attrs.frozen
class Restarted:
    """One device's outcome in ``restart``: the daemon's pid before and after, or the error."""

    index: int
    old_pid: int = 0
    new_pid: int = 0
    error: ErofsMountError | None = None


def restart(target: str) -> Restarted:
    """Hand a served device to a new daemon running the installed code, without a failed read.

    The running daemon stops between two requests and gives the new one its
    connections and lock (``_control``); the kernel never sees them end.
    """
    require_root("restart")
    index = device_index(target)
    record_path = live_record(index, "nothing to restart")
    record = rec.RecordStore.read(record_path)
    try:
        link_named(record.device.interface).check_reattach(index)
    except DeviceStateError as exc:
        raise DeviceStateError(f"{exc} (so it cannot be restarted either)") from None
    from ._plugins import PluginHost

    _check_plugin(record, PluginHost())
    try:
        spawn_taker(record_path)  # a new interpreter: a restart is how new code takes over
    except DeviceStateError as exc:
        raise DeviceStateError(f"nbd{index}: {exc}") from None
    return Restarted(index, record.daemon_pid, rec.RecordStore.read(record_path).daemon_pid)


def restart_all() -> list[Restarted]:
    """Restart every erofs-mount device whose daemon is alive, all at once; a failure does not stop the others."""
    from concurrent.futures import ThreadPoolExecutor

    require_root("restart")
    served = [info for info, path in attached() if daemon_alive(path)]

    def one(info: sysfs.DeviceInfo) -> Restarted:
        try:
            return restart(info.path)
        except ErofsMountError as exc:
            return Restarted(info.index, error=exc)

    with ThreadPoolExecutor(max_workers=max(1, min(RESTARTS_AT_ONCE, len(served)))) as pool:
        return list(pool.map(one, served))


# -- stats -------------------------------------------------------------------


def device_stats(target: str | None = None, command: str = "stats") -> dict[str, dict[str, Any]]:
    """``{"nbdN": counts}`` for one device or every erofs-mount device; ``{}`` where no daemon answers."""
    require_root(command)  # the daemons answer on sockets in the root-only run directory
    if target is not None:
        index = device_index(target)
        return {f"nbd{index}": ask_stats(live_record(index, "no daemon to ask"))}
    return {f"nbd{info.index}": stats_or_nothing(path) for info, path in attached()}


# -- list --------------------------------------------------------------------


