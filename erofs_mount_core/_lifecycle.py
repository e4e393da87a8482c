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
from typing import Any

import attrs

from . import _liveness as liveness
from . import _mounts as mounts
from . import _record as rec
from ._control import ask_stats
from ._daemon_protocol import daemon_alive, locked, spawn, spawn_taker
from ._errors import (
    DeviceStateError,
    ErofsMountError,
    KernelError,
    NotRootError,
    PluginError,
    RecordError,
    SourceError,
    UnknownSchemeError,
    UsageError,
)
from ._faults import kill_point
from ._filters import Retrying
from ._nbd import sysfs
from ._nbd.link import choose_link, disconnect_any, link_named
from ._plugins import PluginHost
from ._source import Source, split_spec

log = logging.getLogger("erofs_mount.lifecycle")

EROFS_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024
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


def check_erofs(source: Source, spec: str) -> None:
    if source.size < EROFS_SUPER_OFFSET + 4:
        raise SourceError(f"{spec} is not an EROFS image (only {source.size} bytes)")
    magic = int.from_bytes(source.pread(4, EROFS_SUPER_OFFSET), "little")
    if magic != EROFS_MAGIC:
        raise SourceError(f"{spec} is not an EROFS image (no EROFS superblock)")


# -- mount -------------------------------------------------------------------

def mount(spec: str, mountpoint: str, options: Mapping[str, str] | None = None,
          settings: DeviceSettings = DeviceSettings()) -> str:
    """Attach ``spec`` to a new nbd device and mount it; return the device path.

    ``options`` are the ``-o`` pairs: mount(8)'s flags (``nosuid``, ``suid``,
    ``dev``, ``noexec``...; nosuid,nodev by default) for the mount, the rest for the source.
    """
    require_root("mount")
    flags, options = mounts.split_options(options or {})
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} does not exist or is not a directory")
    if settings.connections < 1 or settings.block_size not in (512, 1024, 2048, 4096):
        raise UsageError("--connections must be >= 1 and --block-size one of 512, 1024, 2048, 4096")
    with _claimed(mountpoint):
        return _mount(spec, mountpoint, flags, options, settings)


@contextlib.contextmanager
def _claimed(mountpoint: str) -> Iterator[None]:
    """One mount at a time onto ``mountpoint``, and none onto a mountpoint: the directory is locked (flock)
    from this check to its mount, so of two mounts at once the second sees the first's."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.ismount(mountpoint):
            raise UsageError(f"{mountpoint} is already a mountpoint: unmount it first, or mount elsewhere")
        yield
    finally:
        os.close(fd)


def _mount(spec: str, mountpoint: str, flags: int, options: Mapping[str, str], settings: DeviceSettings) -> str:
    host = PluginHost()
    scheme, location = split_spec(spec)
    plugin = host.owner(scheme)
    source = Retrying(host.open_source(scheme, location, options))
    try:
        check_erofs(source, spec)
        state = host.source_state(scheme, source)
        description = source.describe()
        size = -(-source.size // settings.block_size) * settings.block_size
    finally:
        source.close()
    link = choose_link()
    connections = min(settings.connections, link.max_connections)

    store = rec.RecordStore()
    store.ensure()
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
        mounts.mount_erofs(device, os.path.realpath(mountpoint), flags)
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

def umount(target: str) -> str:
    """Unmount a mountpoint or device, disconnect it, end its daemon; return the device."""
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
        mounts.umount(mp)
    if mounts.mountpoints_of(device):
        return device  # still mounted elsewhere: keep serving
    if record_path is None:
        raise DeviceStateError(f"{device} is not connected")
    _disconnect_and_wait(index, record_path)
    return device


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
    """
    require_root("reattach")
    index = _index_or_usage(target)
    record_path = _record_of(index, "nothing to reattach")
    record = rec.RecordStore.read(record_path)
    link_named(record.device.interface).check_reattach(index)
    _check_plugin(record, host)
    kill_point("reattach:before-spawn")
    if force and daemon_alive(record_path) and end_if_hung(index, record_path, stuck_after) is None:
        raise DeviceStateError(f"nbd{index}: its daemon (pid {record.daemon_pid}) answers and serves: "
                               "--force ends only a daemon that fails its liveness probe")
    try:
        return start(record_path) if start else spawn("reattach", record_path)
    except DeviceStateError as exc:
        raise DeviceStateError(f"nbd{index}: {exc}") from None


@attrs.frozen
class Reattached:
    """One device's outcome in ``reattach_all``: its index, the error if it failed, and in how
    many seconds it is due again if it failed or was skipped (its reattach keeps failing)."""

    index: int
    error: ErofsMountError | None = None
    due_in: float | None = None


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
    """Reattach one device unless its back-off says not yet; keep the back-off up to date.

    ``start`` and ``host`` as for ``reattach`` (``watch`` forks its daemons, with its plugins loaded).
    """
    now = time.time() if now is None else now
    failures, due = _retry_state(record_path)
    if now < due:
        return Reattached(index, due_in=due - now)
    try:
        reattach(f"/dev/nbd{index}", start=start, host=host)
    except ErofsMountError as exc:
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** failures)
        _write_retry_state(record_path, failures + 1, now + delay)
        return Reattached(index, exc, due_in=delay)
    rec.retry_path(record_path).unlink(missing_ok=True)
    return Reattached(index)


def _retry_state(record_path: Path) -> tuple[int, float]:
    """(failures so far, when the next attempt is due); a missing or odd file means none."""
    try:
        failures, due = rec.retry_path(record_path).read_text().split()
        return int(failures), float(due)
    except (OSError, ValueError):
        return 0, 0.0


def _write_retry_state(record_path: Path, failures: int, due: float) -> None:
    fd = os.open(rec.retry_path(record_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{failures} {due}\n")


def _check_plugin(record: rec.Record, host: PluginHost | None = None) -> None:
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


def list_devices() -> list[dict[str, Any]]:
    """One row per attached nbd device, then one per orphaned record (``device`` None)."""
    rows = []
    for info in sysfs.devices():
        if not info.configured:
            continue
        row: dict[str, Any] = {
            "device": info.path,
            "mountpoints": mounts.mountpoints_of(info.path),
            "mount_options": mounts.security_options_of(info.path),
            "source": None,
            "serving": None,
            "source_state": None,
            "daemon_pid": None,
            "daemon_alive": None,
            "record": info.backend,
            "read_bytes": None,
            "last_error": None,
            "error": None,
        }
        path = record_path_of(info)
        if path is None:
            row["error"] = "not attached by erofs-mount"
        else:
            try:
                record = rec.RecordStore.read(path)
            except RecordError as exc:
                row["error"] = str(exc)
            else:
                row["source"] = f"{record.source.scheme}:{record.source.location}"
                row["serving"] = record.source.description  # what the plugin pinned: a digest, a version
                row["source_state"] = record.source.state  # all it pinned (no secret is ever in it)
                row["daemon_pid"] = record.daemon_pid or None
                row["daemon_alive"] = daemon_alive(path)
                stats = _stats_or_nothing(path) if row["daemon_alive"] else {}
                row["read_bytes"] = stats.get("read_bytes")
                row["last_error"] = stats.get("last_error")
        rows.append(row)
    for path in _orphans():
        rows.append({"device": None, "mountpoints": [], "mount_options": None, "source": None, "serving": None,
                     "source_state": None, "daemon_pid": None, "daemon_alive": None, "record": str(path),
                     "read_bytes": None, "last_error": None,
                     "error": "orphaned: no device is attached with this record "
                              "(the next mount, 'reattach --all' or watch removes it)"})
    return rows
