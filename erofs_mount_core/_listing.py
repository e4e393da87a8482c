"""What ``list`` shows: one row per device, and its state (serving, dead, refused, expired, detached, other).

``describe`` is one device's row: what ``mount --json`` and ``reattach --json`` print.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import _mounts as mounts
from . import _record as rec
from ._backoff import last_failure
from ._daemon_start import daemon_alive
from ._devices import detached, device_index, record_path_of, stats_or_nothing
from ._errors import DeviceStateError, RecordError
from ._nbd import kernel_log, sysfs
from ._nbd.link import link_named

#: what ``list`` calls a device, by what it can do now
SERVING, DEAD, REFUSED, EXPIRED, DETACHED, OTHER = "serving", "dead", "refused", "expired", "detached", "other"


def list_devices() -> list[dict[str, Any]]:
    """One row per attached nbd device, then one per record whose device was detached.

    Each row's ``state``: ``serving``; ``dead`` (its daemon is gone and reads wait: reattach);
    ``refused`` (its last reattach failed, or its daemon refuses every read: ``why`` says how); ``expired``
    (past its dead-connection timeout the kernel fails its reads until a reattach); ``detached`` (the device
    was disconnected, only the record is left); ``other`` (not attached by erofs-mount).
    """
    said = kernel_log.said()
    rows = [_row(info, said) for info in sysfs.devices() if info.configured]
    for path, record in detached():
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


def describe(target: str) -> dict[str, Any]:
    """``list``'s row for one device (what ``mount --json`` and ``reattach --json`` print)."""
    index = device_index(target)
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
        stats = stats_or_nothing(path)
        row.update(state=SERVING, read_bytes=stats.get("read_bytes"), last_error=stats.get("last_error"))
        if stats.get("refused"):  # its daemon found its bytes are not the pinned ones: every read fails
            row.update(state=REFUSED, why=str(stats["refused"]))
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
