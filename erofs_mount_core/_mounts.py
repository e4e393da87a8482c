"""mount(2), umount2(2) and /proc/self/mounts, without shelling out.

Images come from whoever can write to a file or a repository, so mounts are
``nosuid,nodev`` unless the user says ``-o suid`` or ``-o dev``: a setuid
binary or a device node in an image then has no power on the host.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from collections.abc import Mapping

import attrs

from ._errors import DeviceStateError, KernelError, UsageError

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
DEFAULT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV
#: mount(8)'s generic flags as ``-o`` takes them: name -> (flags set, flags cleared)
FLAG_OPTIONS = {
    "ro": (MS_RDONLY, 0),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "noatime": (MS_NOATIME, 0), "nodiratime": (MS_NODIRATIME, 0), "relatime": (MS_RELATIME, 0),
}
#: the LSM's mount options (SELinux labels), passed to mount(2) as its data string
CONTEXT_OPTIONS = frozenset({"context", "fscontext", "defcontext", "rootcontext"})
#: names mount(8) passes to a helper that are fstab's business, and ``rw``, which it adds to every line
IGNORED = frozenset({"rw", "defaults", "auto", "noauto", "_netdev", "nofail", "user", "nouser", "users",
                     "owner", "group", "sw", "xx"})
IGNORED_PREFIXES = ("x-", "comment=")
#: device settings an fstab line gives as options: option -> the ``erofs-mount mount`` flag
DEVICE_OPTIONS = {"connections": "--connections", "dead-timeout": "--dead-timeout", "block-size": "--block-size"}
#: every ``-o`` name that is not a source's: a plugin may not declare one (``_plugins``)
RESERVED = frozenset(FLAG_OPTIONS) | CONTEXT_OPTIONS | IGNORED | frozenset(DEVICE_OPTIONS)
_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has (find_library runs ldconfig)


def split_option_list(text: str) -> list[str]:
    """``a,b="x,y",c`` -> ``["a", 'b="x,y"', "c"]``: commas inside double quotes stay, as mount(8) reads
    them (an SELinux context holds commas); the quotes stay for the reader of each item to drop."""
    items, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


@attrs.frozen
class MountOptions:
    """What mount(2) gets: its flags, and its data string (the SELinux contexts, as mount(8) passes them)."""

    flags: int = DEFAULT_FLAGS
    data: str = ""


def split_options(options: Mapping[str, str]) -> tuple[MountOptions, dict[str, str]]:
    """The mount's options among ``-o`` options (flags over the nosuid,nodev default), and the source's."""
    flags, data, rest = DEFAULT_FLAGS, [], {}
    for yes, no in (("suid", "nosuid"), ("dev", "nodev"), ("exec", "noexec")):
        if yes in options and no in options:
            raise UsageError(f"-o {yes} and -o {no} say opposite things: give one of them")
    for key, value in options.items():
        if key == "rw":
            raise UsageError("-o rw: EROFS is a read-only filesystem")
        if key in CONTEXT_OPTIONS:
            if not value:
                raise UsageError(f"-o {key} needs a value (a security context)")
            data.append(f"{key}={value}")
        elif key in FLAG_OPTIONS:
            if value:
                raise UsageError(f"-o {key} takes no value")
            on, off = FLAG_OPTIONS[key]
            flags = (flags | on) & ~off
        else:
            rest[key] = value
    return MountOptions(flags, ",".join(data)), rest


def mount_erofs(device: str, mountpoint: str, options: MountOptions = MountOptions()) -> None:
    rc = _libc.mount(os.fsencode(device), os.fsencode(mountpoint), b"erofs", options.flags | MS_RDONLY,
                     os.fsencode(options.data) if options.data else None)
    if rc != 0:
        err = ctypes.get_errno()
        hint = {
            errno.EINVAL: "the image is not a valid EROFS filesystem",
            errno.EUCLEAN: "the image is not a valid EROFS filesystem (the kernel found it damaged)",
            errno.ENODEV: "the kernel has no erofs support (modprobe erofs)",
            errno.ENOTDIR: "the mountpoint is not a directory",
            errno.ENOENT: "the mountpoint does not exist",
            errno.EBUSY: "the mountpoint or device is busy",
        }.get(err, os.strerror(err))
        raise KernelError(f"mounting {device} on {mountpoint} failed: {hint}")


MNT_DETACH = 2


def umount(mountpoint: str, lazy: bool = False) -> None:
    """umount2(2); ``lazy`` detaches the mount now and lets the kernel end it when it is no longer used."""
    if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            raise DeviceStateError(f"{mountpoint} is busy (files open or processes inside); nothing was changed")
        raise KernelError(f"unmounting {mountpoint} failed: {os.strerror(err)}")


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as ``\\ooo`` octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[tuple[str, str, str, str]]:
    """``[(source, mountpoint, fstype, options)]`` of the calling process's namespace."""
    table = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) >= 4:
                table.append((_unescape(fields[0]), _unescape(fields[1]), fields[2], fields[3]))
    return table


def mountpoints_of(device: str) -> list[str]:
    return [mp for src, mp, _, _ in mount_table() if src == device]


def security_options_of(device: str) -> str | None:
    """The ro/nosuid/nodev/noexec flags of the device's first mount, or None if it is not mounted."""
    for src, _mp, _fstype, options in mount_table():
        if src == device:
            present = set(options.split(","))
            return ",".join(n for n in ("ro", "nosuid", "nodev", "noexec") if n in present)
    return None


def device_mounted_at(mountpoint: str) -> str | None:
    mountpoint = os.path.realpath(mountpoint)
    found = None
    for src, mp, _, _ in mount_table():
        if mp == mountpoint:
            found = src  # the last one is on top
    return found
