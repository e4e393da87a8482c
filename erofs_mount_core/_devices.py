"""Which nbd devices are erofs-mount's: a device's identity (by path, name or mountpoint), its record, and the one
walk over our devices that every command shares (live, dead, orphaned records, detached ones).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from . import _mounts as mounts
from . import _record as rec
from ._control import ask_stats
from ._daemon_start import daemon_alive, locked
from ._errors import DeviceStateError, RecordError, UsageError
from ._nbd import sysfs
from ._nbd.link import link_named


def is_nbd(device: str) -> bool:
    try:
        sysfs.index_of(device)
    except (ValueError, OSError):
        return False
    return True


def device_index(target: str) -> int:
    """The nbd device index ``target`` names: ``/dev/nbdN``, ``nbdN``, or the mountpoint of one; UsageError
    otherwise."""
    if os.path.isdir(target) and not target.startswith("/dev/"):
        device = mounts.device_mounted_at(target)
        if device is None or not is_nbd(device):
            raise UsageError(f"{target} is not an erofs-mount mountpoint")
        target = device
    try:
        return sysfs.index_of(target)
    except (ValueError, OSError):
        raise UsageError(f"{target} is neither an nbd device nor an erofs-mount mountpoint") from None


def not_ours(device: str, info: sysfs.DeviceInfo) -> str:
    named = f"its backend is {info.backend!r}" if info.backend else "it has no backend identifier"
    return f"{device} was not attached by erofs-mount ({named})"


def record_of(index: int, otherwise: str) -> Path:
    """The record of connected device ``index``; DeviceStateError if it is not connected (saying
    ``otherwise``) or not ours."""
    info = sysfs.device(index)
    if info is None or not info.configured:
        raise DeviceStateError(f"nbd{index} is not connected: {otherwise}")
    record_path = record_path_of(info)
    if record_path is None:
        raise DeviceStateError(not_ours(f"nbd{index}", info))
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


def attached() -> Iterator[tuple[sysfs.DeviceInfo, Path]]:
    """Each connected device attached by erofs-mount, with its record's path: the one walk over our devices."""
    for info in sysfs.devices():
        path = record_path_of(info) if info.configured else None
        if path is not None:
            yield info, path


def ours() -> Iterator[tuple[int, Path]]:
    """Each connected device attached by erofs-mount whose record is there, with it."""
    for info, path in attached():
        if path.exists():
            yield info.index, path


def dead_devices() -> list[tuple[int, Path]]:
    """Devices attached by erofs-mount whose daemon is gone and which can be reattached, with their records."""
    found = []
    for index, path in ours():
        if daemon_alive(path):
            continue
        with contextlib.suppress(RecordError, DeviceStateError):
            link_named(rec.RecordStore.read(path).device.interface).check_reattach(index)
            found.append((index, path))
    return found


def live_devices() -> list[tuple[int, Path]]:
    """Devices attached by erofs-mount whose daemon holds its lock, with their records."""
    return [(index, path) for index, path in ours() if daemon_alive(path)]


def mounted_source(target: str) -> tuple[str, Mapping[str, Any]]:
    """What the erofs-mount device ``target`` (a mountpoint, ``/dev/nbdN`` or ``nbdN``) serves, as its record
    keeps it: (the source's scheme, its state). For a plugin's command about a mount (``index push
    --prefetch-from``); one clear error (UsageError, DeviceStateError, RecordError) otherwise."""
    record = rec.RecordStore.read(record_of(device_index(target), "it serves nothing"))
    return record.source.scheme, record.source.state


def live_record(index: int, otherwise: str) -> Path:
    """The record of a connected erofs-mount device whose daemon is alive."""
    record_path = record_of(index, otherwise)
    if not daemon_alive(record_path):
        raise DeviceStateError(f"nbd{index}: its daemon is not running (erofs-mount reattach /dev/nbd{index})")
    return record_path


def stats_or_nothing(record_path: Path) -> dict[str, Any]:
    if not daemon_alive(record_path):
        return {}
    try:
        return ask_stats(record_path)
    except DeviceStateError:
        return {}


def orphans() -> list[Path]:
    """Records (with their lock, log and retry files) in the run directory that no attached device
    names and no process holds: left by a daemon killed as its device was disconnected, say."""
    store = rec.RecordStore()
    named = {path for _info, path in attached()}
    stems = {p.with_suffix("") for p in store.directory.glob("nbd-*.*") if store.holds(p.with_suffix(rec.SUFFIX))}
    return sorted(stem.with_suffix(rec.SUFFIX) for stem in stems
                  if stem.with_suffix(rec.SUFFIX) not in named and not daemon_alive(stem.with_suffix(rec.SUFFIX)))


def prune_orphans() -> list[Path]:
    """Remove the orphans' files, each under its lock (a mount that takes it meanwhile keeps its files)."""
    removed = []
    for path in orphans():
        with contextlib.suppress(DeviceStateError, RecordError):
            with locked(path):
                rec.RecordStore.remove(path)
                removed.append(path)
    return removed


def detached() -> list[tuple[Path, rec.Record | None]]:
    """The orphans, each with its record (None if it cannot be read), whose device is not connected."""
    found = []
    for path in orphans():
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
