"""mount, umount, reattach, restart, stats and list: the orchestration behind the CLI.

The parts it orchestrates each live in one place: plugins (``_plugins``),
records (``_record``), the daemon and its lock (``_daemon_protocol``), the
kernel's nbd driver (``_nbd.link``, ``_nbd.sysfs``) and mount(2) (``_mounts``).

Every command either completes or leaves the system as it found it: a
failed mount disconnects its device and removes its record; a refused
reattach leaves the device blocked (its reads wait) and the record intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from . import _liveness as liveness
from . import _mounts as mounts
from . import _record as rec
from ._control import ask_stats
from ._daemon_protocol import daemon_alive, locked, spawn, spawn_taker
from ._erofs.check import check_erofs
from ._errors import (
    AlreadyServing,
    DeviceStateError,
    ErofsMountError,
    KernelError,
    NotRootError,
    PluginError,
    RecordError,
    UnknownSchemeError,
    UsageError,
)
from ._faults import kill_point
from ._nbd import kernel_log, sysfs
from ._nbd.link import choose_link, disconnect_any, link_named
from ._source import split_spec

if TYPE_CHECKING:  # plugins (pluggy, importlib.metadata) load only in the commands that open sources
    from ._plugins import PluginHost

log = logging.getLogger("erofs_mount.lifecycle")

DEFAULT_BLOCK_SIZE = 512
DEFAULT_CONNECTIONS = 4
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
            index = spawn("connect", path, lock_fd=lock_fd)
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

    A daemon that outlives ``timeout`` keeps its files (and the next umount or reattach finds them).
    """
    disconnect_any(index)
    deadline = time.monotonic() + timeout
    while daemon_alive(record_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with locked(record_path):
            rec.RecordStore.remove(record_path)
    except DeviceStateError:
        if not record_path.exists():
            return  # the daemon removed them itself as it ended
        raise KernelError(f"nbd{index} was disconnected, but its daemon did not exit within {timeout:.0f} s; "
                          f"its record {record_path} is kept") from None


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
    if os.path.isdir(target) and not target.startswith("/dev/"):
        device = mounts.device_mounted_at(target)
        if device is None or not _is_nbd(device):
            raise UsageError(f"{target} is not an erofs-mount mountpoint")
        points = [os.path.realpath(target)]
    else:
        index = _index_or_usage(target)
        device = f"/dev/nbd{index}"
        points = mounts.mountpoints_of(device)
    index = _index_or_usage(device)
    info = sysfs.device(index)
    connected = info is not None and info.configured
    record_path = record_path_of(info) if info is not None and connected else None
    if connected and record_path is None:  # before anything is unmounted
        raise DeviceStateError(f"{_not_ours(device, info)}: leave it to the tool that attached it")
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
    for path, record in _detached():
        if record is not None and record.device.index == index:
            with contextlib.suppress(DeviceStateError):
                with locked(path):
                    rec.RecordStore.remove(path)
            return True
    return False


def device_index(target: str) -> int:
    """The nbd device index of ``/dev/nbdN``, ``nbdN`` or a mountpoint of one; UsageError otherwise."""
    return _index_or_usage(target)


def _is_nbd(device: str) -> bool:
    try:
        sysfs.index_of(device)
    except (ValueError, OSError):
        return False
    return True


def _index_or_usage(target: str) -> int:
    """The nbd device ``target`` names: ``/dev/nbdN``, ``nbdN``, or the mountpoint of one."""
    if os.path.isdir(target) and not target.startswith("/dev/"):
        device = mounts.device_mounted_at(target)
        if device is None or not _is_nbd(device):
            raise UsageError(f"{target} is not an erofs-mount mountpoint")
        target = device
    try:
        return sysfs.index_of(target)
    except (ValueError, OSError):
        raise UsageError(f"{target} is neither an nbd device nor an erofs-mount mountpoint") from None


def _not_ours(device: str, info: sysfs.DeviceInfo) -> str:
    named = f"its backend is {info.backend!r}" if info.backend else "it has no backend identifier"
    return f"{device} was not attached by erofs-mount ({named})"


def _record_of(index: int, otherwise: str) -> Path:
    """The record of connected device ``index``; DeviceStateError if it is not connected (saying
    ``otherwise``) or not ours."""
    info = sysfs.device(index)
    if info is None or not info.configured:
        raise DeviceStateError(f"nbd{index} is not connected: {otherwise}")
    record_path = record_path_of(info)
    if record_path is None:
        raise DeviceStateError(_not_ours(f"nbd{index}", info))
    return record_path


def record_path_of(info: sysfs.DeviceInfo) -> Path | None:
    """The device's record: named by its backend identifier, or (attached through
    the ioctls, which have none) the record in our directory that names its index.

    Only a record in our run directory counts: a backend identifier naming a
    file elsewhere belongs to another tool, whose device and files we leave alone.
    """
    store = rec.RecordStore()
    if info.backend:
        return Path(info.backend) if store.holds(info.backend) else None
    for path in store.paths():
        with contextlib.suppress(RecordError):
            device = store.read(path).device
            if not link_named(device.interface).names_backend and device.index == info.index:
                return path
    return None


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
    index = _index_or_usage(target)
    record_path = _record_of(index, "nothing to reattach")
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
        _note_failure(record_path, exc, time.time() if now is None else now)
        raise
    rec.retry_path(record_path).unlink(missing_ok=True)
    return started


def _reattach(index: int, record_path: Path, start: Callable[[Path], int] | None, host: PluginHost | None,
              force: bool, stuck_after: float) -> int:
    record = rec.RecordStore.read(record_path)
    link_named(record.device.interface).check_reattach(index)
    _check_plugin(record, host)
    kill_point("reattach:before-spawn")
    if force and daemon_alive(record_path) and end_if_hung(index, record_path, stuck_after) is None:
        raise AlreadyServing(f"nbd{index}: its daemon (pid {record.daemon_pid}) answers and serves: "
                             "--force ends only a daemon that fails its liveness probe; nothing to do")
    try:
        return start(record_path) if start else spawn("reattach", record_path)
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


#: back-off for a device whose reattach keeps failing, in ``reattach --all`` (a timer runs it often)
RETRY_FIRST, RETRY_MAX = 10.0, 600.0


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
    failure = last_failure(record_path)
    if failure is not None and now < failure.due:
        return Reattached(index, due_in=failure.due - now)
    try:
        _attempt(index, record_path, start, host, now=now)
    except AlreadyServing:
        return Reattached(index, by_another=True)
    except ErofsMountError as exc:
        return Reattached(index, exc, due_in=_backoff(0 if failure is None else failure.count))
    return Reattached(index)


@attrs.frozen
class Failure:
    """The last failed reattach of a device: how many in a row, when the next is due, and why."""

    count: int
    due: float
    why: str


def last_failure(record_path: Path) -> Failure | None:
    """The device's failed reattaches, kept beside its record; None if the last one worked (or none ran)."""
    try:
        count, due, why = rec.retry_path(record_path).read_text().rstrip("\n").split(" ", 2)
        return Failure(int(count), float(due), why)
    except (OSError, ValueError):
        return None


def _backoff(failures_before: int) -> float:
    return min(RETRY_MAX, RETRY_FIRST * 2 ** failures_before)


def _note_failure(record_path: Path, exc: ErofsMountError, now: float) -> None:
    before = last_failure(record_path)
    count = 1 if before is None else before.count + 1
    due = now + _backoff(count - 1)
    why = str(exc).replace("\n", " ")
    with contextlib.suppress(OSError):  # a run directory that will not take it costs only the back-off
        fd = os.open(rec.retry_path(record_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{count} {due} {why}\n")


def _check_plugin(record: rec.Record, host: PluginHost | None = None) -> None:
    from ._plugins import PluginHost

    try:
        (host or PluginHost()).owner(record.source.scheme)
    except UnknownSchemeError:
        dist = record.source.distribution or f"the plugin providing {record.source.scheme!r}"
        raise PluginError(
            f"the record needs source type {record.source.scheme!r}: install {dist} (pip install {dist})"
        ) from None


def _ours() -> Iterator[tuple[int, Path]]:
    """Each connected device attached by erofs-mount, with its record."""
    for info in sysfs.devices():
        path = record_path_of(info) if info.configured else None
        if path is not None and path.exists():
            yield info.index, path


def dead_devices() -> list[tuple[int, Path]]:
    """Devices attached by erofs-mount whose daemon is gone and which can be reattached, with their records."""
    found = []
    for index, path in _ours():
        if daemon_alive(path):
            continue
        with contextlib.suppress(RecordError, DeviceStateError):
            link_named(rec.RecordStore.read(path).device.interface).check_reattach(index)
            found.append((index, path))
    return found


def live_devices() -> list[tuple[int, Path]]:
    """Devices attached by erofs-mount whose daemon holds its lock, with their records."""
    return [(index, path) for index, path in _ours() if daemon_alive(path)]


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
    index = _index_or_usage(target)
    record_path = _live_record(index, "nothing to restart")
    record = rec.RecordStore.read(record_path)
    try:
        link_named(record.device.interface).check_reattach(index)
    except DeviceStateError as exc:
        raise DeviceStateError(f"{exc} (so it cannot be restarted either)") from None
    _check_plugin(record)
    try:
        spawn_taker(record_path)
    except DeviceStateError as exc:
        raise DeviceStateError(f"nbd{index}: {exc}") from None
    return Restarted(index, record.daemon_pid, rec.RecordStore.read(record_path).daemon_pid)


def restart_all() -> list[Restarted]:
    """Restart every erofs-mount device whose daemon is alive, all at once; a failure does not stop the others."""
    from concurrent.futures import ThreadPoolExecutor

    require_root("restart")
    served = [info for info in sysfs.devices()
              if info.configured and (path := record_path_of(info)) is not None and daemon_alive(path)]

    def one(info: sysfs.DeviceInfo) -> Restarted:
        try:
            return restart(info.path)
        except ErofsMountError as exc:
            return Restarted(info.index, error=exc)

    with ThreadPoolExecutor(max_workers=max(1, min(RESTARTS_AT_ONCE, len(served)))) as pool:
        return list(pool.map(one, served))


def _live_record(index: int, otherwise: str) -> Path:
    """The record of a connected erofs-mount device whose daemon is alive."""
    record_path = _record_of(index, otherwise)
    if not daemon_alive(record_path):
        raise DeviceStateError(f"nbd{index}: its daemon is not running (erofs-mount reattach /dev/nbd{index})")
    return record_path


# -- stats -------------------------------------------------------------------


def device_stats(target: str | None = None, command: str = "stats") -> dict[str, dict[str, Any]]:
    """``{"nbdN": counts}`` for one device or every erofs-mount device; ``{}`` where no daemon answers."""
    require_root(command)  # the daemons answer on sockets in the root-only run directory
    if target is not None:
        index = _index_or_usage(target)
        return {f"nbd{index}": ask_stats(_live_record(index, "no daemon to ask"))}
    found: dict[str, dict[str, Any]] = {}
    for info in sysfs.devices():
        path = record_path_of(info) if info.configured else None
        if path is not None:
            found[f"nbd{info.index}"] = _stats_or_nothing(path)
    return found


def _stats_or_nothing(record_path: Path) -> dict[str, Any]:
    if not daemon_alive(record_path):
        return {}
    try:
        return ask_stats(record_path)
    except DeviceStateError:
        return {}


# -- list --------------------------------------------------------------------

def _orphans() -> list[Path]:
    """Records (with their lock, log and retry files) in the run directory that no attached device
    names and no process holds: left by a daemon killed as its device was disconnected, say."""
    store = rec.RecordStore()
    named = {p for info in sysfs.devices() if info.configured and (p := record_path_of(info))}
    stems = {p.with_suffix("") for p in store.directory.glob("nbd-*.*") if store.holds(p.with_suffix(rec.SUFFIX))}
    return sorted(stem.with_suffix(rec.SUFFIX) for stem in stems
                  if stem.with_suffix(rec.SUFFIX) not in named and not daemon_alive(stem.with_suffix(rec.SUFFIX)))


def prune_orphans() -> list[Path]:
    """Remove the orphans' files, each under its lock (a mount that takes it meanwhile keeps its files)."""
    removed = []
    for path in _orphans():
        with contextlib.suppress(DeviceStateError, RecordError):
            with locked(path):
                rec.RecordStore.remove(path)
                removed.append(path)
    return removed


#: what ``list`` calls a device, by what it can do now
SERVING, DEAD, REFUSED, EXPIRED, DETACHED, OTHER = "serving", "dead", "refused", "expired", "detached", "other"


def list_devices() -> list[dict[str, Any]]:
    """One row per attached nbd device, then one per record whose device was detached.

    Each row's ``state``: ``serving``; ``dead`` (its daemon is gone and reads wait: reattach);
    ``refused`` (its last reattach failed, ``why`` says how); ``expired`` (past its dead-connection
    timeout the kernel fails its reads until a reattach); ``detached`` (the device was disconnected,
    only the record is left); ``other`` (not attached by erofs-mount).
    """
    said = kernel_log.said()
    rows = [_row(info, said) for info in sysfs.devices() if info.configured]
    for path, record in _detached():
        row = _blank_row(None, str(path))
        row.update(state=DETACHED, why="its device was disconnected: the next mount, 'reattach --all' "
                                       "or watch removes this record; mount the image again to use it")
        if record is not None:
            _describe_record(row, record, path)
            if record.device.index >= 0:  # it was connected: its filesystem may still be mounted, failing reads
                row["device"] = device = f"/dev/nbd{record.device.index}"
                row["mountpoints"] = mounts.mountpoints_of(device)
        rows.append(row)
    return rows


def _detached() -> list[tuple[Path, rec.Record | None]]:
    """The orphans, each with its record (None if it cannot be read), whose device is not connected."""
    found = []
    for path in _orphans():
        try:
            record: rec.Record | None = rec.RecordStore.read(path)
        except RecordError:
            record = None
        if record is not None and record.device.index >= 0:
            info = sysfs.device(record.device.index)
            if info is not None and info.configured:
                record = attrs.evolve(record, device=attrs.evolve(record.device, index=-1))  # another's now
        found.append((path, record))
    return found


def describe(target: str) -> dict[str, Any]:
    """``list``'s row for one device (what ``mount --json`` and ``reattach --json`` print)."""
    index = _index_or_usage(target)
    info = sysfs.device(index)
    if info is None or not info.configured:
        raise DeviceStateError(f"nbd{index} is not connected")
    return _row(info, kernel_log.said())


def _blank_row(device: str | None, record: str | None) -> dict[str, Any]:
    return {"device": device, "state": None, "why": None, "mountpoints": [], "mount_options": None,
            "size": None, "since": None, "connections": None, "dead_timeout": None, "source": None,
            "serving": None, "pins": None, "daemon_pid": None, "record": record, "read_bytes": None,
            "last_error": None, "reattach_command": None}


def _describe_record(row: dict[str, Any], record: rec.Record, path: Path) -> None:
    """The row's fields a record gives: source, what it pins, the device's shape, since when it is served."""
    with contextlib.suppress(OSError):  # each daemon rewrites the record as it starts serving
        row["since"] = _iso(path.stat().st_mtime)
    row.update(source=f"{record.source.scheme}:{record.source.location}",
               serving=record.source.description,  # what the plugin pinned: a digest, a version
               pins=record.source.state,  # all it pinned (no secret is ever in it)
               size=record.device.size, connections=record.device.connections,
               dead_timeout=record.device.dead_timeout, daemon_pid=record.daemon_pid or None)


def _row(info: sysfs.DeviceInfo, said: Mapping[int, kernel_log.Said]) -> dict[str, Any]:
    row = _blank_row(info.path, info.backend)
    row.update(mountpoints=mounts.mountpoints_of(info.path), mount_options=mounts.security_options_of(info.path),
               size=info.size)
    path = record_path_of(info)
    if path is None:
        row.update(state=OTHER, why="not attached by erofs-mount")
        return row
    row["record"] = str(path)
    try:
        record = rec.RecordStore.read(path)
    except RecordError as exc:
        row.update(state=REFUSED, why=str(exc))
        return row
    _describe_record(row, record, path)
    if daemon_alive(path):
        stats = _stats_or_nothing(path)
        row.update(state=SERVING, read_bytes=stats.get("read_bytes"), last_error=stats.get("last_error"))
        return row
    row["reattach_command"] = f"erofs-mount reattach {info.path}"
    row["daemon_pid"] = None  # the record's pid is a dead daemon's: no process to look for
    failure = last_failure(path)
    try:
        link_named(record.device.interface).check_reattach(info.index)
    except DeviceStateError as exc:
        row.update(state=REFUSED, why=str(exc), reattach_command=None)
    else:
        if failure is not None:
            row.update(state=REFUSED, why=failure.why)
    try:  # each daemon rewrites the record as it starts serving
        started = path.stat().st_mtime
    except OSError:  # removed meanwhile (an umount): whatever the kernel said, it is not about this record
        started = float("inf")
    kernel = said.get(info.index, kernel_log.Said())
    if kernel.disconnected > started:  # configured still only while its filesystem is mounted
        row.update(state=DETACHED, reattach_command=None,
                   why="it was disconnected while mounted: its reads fail; unmount it (erofs-mount umount)")
    elif kernel.shut_down > started:
        row.update(state=EXPIRED, why=f"past its dead-connection timeout ({record.device.dead_timeout} s) the "
                                      "kernel fails its reads until a reattach"
                                      + (f"; the last reattach failed: {failure.why}" if failure else ""))
    elif row["state"] is None:
        row.update(state=DEAD, why=f"its daemon is gone: reads wait (up to {record.device.dead_timeout} s) "
                                   "until a reattach")
    return row


def _iso(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")
