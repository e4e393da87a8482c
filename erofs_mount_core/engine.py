"""mount, umount, reattach and list: the orchestration behind the CLI.

Every command either completes or leaves the system as it found it: a
failed mount disconnects its device and removes its record; a refused
reattach leaves the device blocked (its reads wait) and the record intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from . import mounts
from . import record as rec
from .errors import (
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
from .nbd import sysfs
from .plugins import PluginHost
from .source import Source, split_spec

EROFS_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024
DEFAULT_BLOCK_SIZE = 512
DEFAULT_CONNECTIONS = 4
DEFAULT_DEAD_TIMEOUT = 24 * 3600
#: how long mount/reattach wait for the daemon to report (imports are slow on small VMs)
READY_TIMEOUT = 120.0


@attrs.frozen
class MountOptions:
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
          settings: MountOptions = MountOptions(), store: rec.RecordStore | None = None) -> str:
    """Attach ``spec`` to a new nbd device and mount it; return the device path."""
    require_root("mount")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mountpoint {mountpoint} does not exist or is not a directory")
    if settings.connections < 1 or settings.block_size not in (512, 1024, 2048, 4096):
        raise UsageError("--connections must be >= 1 and --block-size one of 512, 1024, 2048, 4096")
    host = PluginHost()
    scheme, location = split_spec(spec)
    plugin = host.owner(scheme)
    source = host.open_source(scheme, location, options or {})
    try:
        check_erofs(source, spec)
        state = host.serialize_source(scheme, source)
        description = source.describe()
        size = -(-source.size // settings.block_size) * settings.block_size
    finally:
        source.close()
    interface = _choose_interface()
    if interface == "ioctl":
        settings = attrs.evolve(settings, connections=1)

    store = store or rec.RecordStore()
    store.ensure()
    path = store.new_path()
    record = rec.Record(
        format=rec.FORMAT, created=rec.now(), daemon_pid=0,
        device=rec.DeviceRecord(index=-1, size=size, block_size=settings.block_size,
                                connections=settings.connections, dead_timeout=settings.dead_timeout,
                                interface=interface),
        source=rec.SourceRecord(scheme=scheme, location=location, description=description,
                                plugin=plugin.name, distribution=plugin.distribution or "",
                                state=state),
    )
    store.write(path, record)
    try:
        with _locked(path) as lock_fd:
            index = _start_daemon("connect", path, lock_fd)
    except BaseException:
        store.remove(path)
        raise
    device = f"/dev/nbd{index}"
    try:
        mounts.mount_erofs(device, os.path.realpath(mountpoint))
        if interface == "netlink":
            # a plain umount(8) of the device now disconnects it and ends the daemon
            _netlink_call(lambda nl: nl.reconfigure_device(index, backend=str(path), client_flags=_autoclear()))
    except BaseException:
        _disconnect_and_wait(index, path)
        raise
    return device


def _autoclear() -> int:
    from .nbd import protocol

    return protocol.CFLAG_DISCONNECT_ON_CLOSE


INTERFACE_ENV = "EROFS_MOUNT_NBD_INTERFACE"


def _choose_interface() -> str:
    """netlink when the kernel has it; the legacy ioctls on kernels before 4.12 (no reattach).

    Decided before any state exists, so a missing driver leaves nothing behind.
    """
    from .nbd import ioctl

    forced = os.environ.get(INTERFACE_ENV)
    if forced not in (None, "", "netlink", "ioctl"):
        raise UsageError(f"{INTERFACE_ENV} must be netlink or ioctl, not {forced!r}")
    if forced == "ioctl":
        if not ioctl.available():
            raise KernelError("the kernel has no nbd driver: load it with 'modprobe nbd'")
        return "ioctl"
    try:
        _netlink_call(lambda nl: None)
    except KernelError:
        if forced or not ioctl.available():
            raise
        print("warning: the kernel has no nbd netlink interface; using the legacy ioctl interface, "
              "which cannot reattach after a daemon dies", file=sys.stderr)
        return "ioctl"
    return "netlink"


def _netlink_call(fn: Any) -> Any:
    from .nbd.netlink import NBDNetlink

    with NBDNetlink() as nl:
        return fn(nl)


# -- the daemon --------------------------------------------------------------

@contextlib.contextmanager
def _locked(record_path: Path) -> Iterator[int]:
    """Take the record's daemon lock; DeviceStateError if a live daemon holds it."""
    fd = os.open(rec.lock_path(record_path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceStateError("its daemon is alive and serving: nothing to do") from None
        yield fd
    finally:
        os.close(fd)  # the daemon keeps its inherited copy, and with it the lock


def daemon_alive(record_path: Path) -> bool:
    """True while some process holds the record's lock (the daemon, or a reattach in progress)."""
    try:
        fd = os.open(rec.lock_path(record_path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _start_daemon(mode: str, record_path: Path, lock_fd: int) -> int:
    ready_r, ready_w = os.pipe()
    logf = os.open(rec.log_path(record_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "erofs_mount_core.daemon", mode, str(record_path),
             "--ready-fd", str(ready_w), "--lock-fd", str(lock_fd)],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            pass_fds=(ready_w, lock_fd), start_new_session=True, close_fds=True,
        )
    finally:
        os.close(ready_w)
        os.close(logf)
    try:
        line = _read_line(ready_r, READY_TIMEOUT)
    finally:
        os.close(ready_r)
    if line.startswith("READY "):
        return int(line.split()[1])
    if proc.poll() is None and not line:
        proc.kill()
    proc.wait()
    if line.startswith("ERROR "):
        _, code, message = line.split(" ", 2)
        err = ErofsMountError(message)
        err.exit_code = int(code)
        raise err
    raise KernelError(f"the serving daemon exited without a word (status {proc.returncode}); "
                      f"see {rec.log_path(record_path)}")


def _read_line(fd: int, timeout: float) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _disconnect(index: int) -> None:
    """Disconnect through netlink, or through the ioctl on kernels without it."""
    from .nbd import ioctl

    try:
        _netlink_call(lambda nl: nl.disconnect_device(index))
    except KernelError:
        if ioctl.available():
            with contextlib.suppress(ErofsMountError, OSError):
                ioctl.disconnect(index)


def _disconnect_and_wait(index: int, record_path: Path, timeout: float = 10.0) -> None:
    """Disconnect the device, let its daemon exit, and leave no record behind."""
    _disconnect(index)
    deadline = time.monotonic() + timeout
    while daemon_alive(record_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    rec.RecordStore.remove(record_path)


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
    record_path = _record_path_of(info) if info else None
    for mp in reversed(points):
        mounts.umount(mp)
    if mounts.mountpoints_of(device):
        return device  # still mounted elsewhere: keep serving
    if info is None or not info.configured:
        raise DeviceStateError(f"{device} is not connected")
    if record_path is None:
        _disconnect(index)
        return device
    _disconnect_and_wait(index, record_path)
    return device


def _is_nbd(device: str) -> bool:
    try:
        sysfs.index_of(device)
    except (ValueError, OSError):
        return False
    return True


def _index_or_usage(target: str) -> int:
    try:
        return sysfs.index_of(target)
    except (ValueError, OSError):
        raise UsageError(f"{target} is neither an nbd device nor an erofs-mount mountpoint") from None


def _record_path_of(info: sysfs.DeviceInfo) -> Path | None:
    """The device's record: named by its backend identifier, or (attached through
    the ioctls, which have none) the record in our directory that names its index."""
    if info.backend and info.backend.startswith("/") and info.backend.endswith(rec.SUFFIX):
        return Path(info.backend)
    store = rec.RecordStore()
    for path in store.paths():
        with contextlib.suppress(RecordError):
            device = store.read(path).device
            if device.interface == "ioctl" and device.index == info.index:
                return path
    return None


# -- reattach ----------------------------------------------------------------

def reattach(target: str) -> int:
    """Give a device whose daemon died a new daemon; return its index."""
    require_root("reattach")
    index = _index_or_usage(target)
    info = sysfs.device(index)
    if info is None or not info.configured:
        raise DeviceStateError(f"nbd{index} is not connected: nothing to reattach")
    record_path = _record_path_of(info)
    if record_path is None:
        raise DeviceStateError(f"nbd{index} was not attached by erofs-mount (backend {info.backend!r})")
    record = rec.RecordStore.read(record_path)
    if record.device.interface != "netlink":
        raise DeviceStateError(
            f"nbd{index} was attached through the kernel's legacy ioctl interface, which cannot "
            "take a new connection: unmount it and mount it again")
    _check_plugin(record)
    try:
        with _locked(record_path) as lock_fd:
            return _start_daemon("reattach", record_path, lock_fd)
    except DeviceStateError as exc:
        raise DeviceStateError(f"nbd{index}: {exc}") from None


def _check_plugin(record: rec.Record) -> None:
    try:
        PluginHost().owner(record.source.scheme)
    except UnknownSchemeError:
        dist = record.source.distribution or f"the plugin providing {record.source.scheme!r}"
        raise PluginError(
            f"the record needs source type {record.source.scheme!r}: install {dist} (pip install {dist})"
        ) from None


def reattach_candidates() -> list[int]:
    """Devices attached by erofs-mount whose daemon is gone."""
    found = []
    for info in sysfs.devices():
        path = _record_path_of(info) if info.configured else None
        if path is None or not path.exists() or daemon_alive(path):
            continue
        with contextlib.suppress(RecordError):
            if rec.RecordStore.read(path).device.interface == "netlink":
                found.append(info.index)
    return found


# -- list --------------------------------------------------------------------

def list_devices() -> list[dict[str, Any]]:
    rows = []
    for info in sysfs.devices():
        if not info.configured:
            continue
        row: dict[str, Any] = {
            "device": info.path,
            "mountpoints": mounts.mountpoints_of(info.path),
            "source": None,
            "serving": None,
            "daemon_pid": None,
            "daemon_alive": None,
            "record": info.backend,
            "error": None,
        }
        path = _record_path_of(info)
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
                row["daemon_pid"] = record.daemon_pid or None
                row["daemon_alive"] = daemon_alive(path)
        rows.append(row)
    return rows
