"""mount(2), umount2(2) and /proc/self/mounts, without shelling out."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re

from ._errors import ErofsMountError, UsageError

MS_RDONLY = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_erofs(device: str, mountpoint: str, options: str = "") -> None:
    rc = _libc.mount(device.encode(), mountpoint.encode(), b"erofs", MS_RDONLY,
                     options.encode() if options else None)
    if rc != 0:
        err = ctypes.get_errno()
        hint = {
            errno.EINVAL: "the image is not a valid EROFS filesystem",
            errno.ENODEV: "the kernel has no erofs support (modprobe erofs)",
            errno.ENOTDIR: "the mountpoint is not a directory",
            errno.ENOENT: "the mountpoint does not exist",
            errno.EBUSY: "the mountpoint or device is busy",
        }.get(err, os.strerror(err))
        raise ErofsMountError(f"mounting {device} on {mountpoint} failed: {hint}")


def umount(mountpoint: str) -> None:
    if _libc.umount2(mountpoint.encode(), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            raise UsageError(f"{mountpoint} is busy (files open or processes inside); nothing was changed")
        raise ErofsMountError(f"unmounting {mountpoint} failed: {os.strerror(err)}")


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as ``\\ooo`` octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[tuple[str, str, str]]:
    """``[(source, mountpoint, fstype)]`` of the calling process's namespace."""
    table = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) >= 3:
                table.append((_unescape(fields[0]), _unescape(fields[1]), fields[2]))
    return table


def mountpoints_of(device: str) -> list[str]:
    return [mp for src, mp, _ in mount_table() if src == device]


def device_mounted_at(mountpoint: str) -> str | None:
    mountpoint = os.path.realpath(mountpoint)
    found = None
    for src, mp, _ in mount_table():
        if mp == mountpoint:
            found = src  # the last one is on top
    return found
