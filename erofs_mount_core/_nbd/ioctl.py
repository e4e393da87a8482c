"""The legacy ioctl interface to nbd devices, for kernels without the netlink one.

Linux before 4.12 has only this interface: the device is configured through
ioctls on /dev/nbdN and served for as long as one process sits in
NBD_DO_IT. It has no backend identifier and no way to hand a device a new
socket, so devices attached this way cannot be reattached.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .._errors import KernelError
from . import sysfs


def _io(n: int) -> int:
    return (0xAB << 8) | n


NBD_SET_SOCK = _io(0)
NBD_SET_BLKSIZE = _io(1)
NBD_DO_IT = _io(3)
NBD_CLEAR_SOCK = _io(4)
NBD_CLEAR_QUE = _io(5)
NBD_SET_SIZE_BLOCKS = _io(7)
NBD_DISCONNECT = _io(8)
NBD_SET_TIMEOUT = _io(9)
NBD_SET_FLAGS = _io(10)


def available() -> bool:
    return Path("/dev/nbd0").exists()


def attach(sock_fd: int, *, size: int, block_size: int, flags: int) -> tuple[int, int]:
    """Configure the first free device to be served on ``sock_fd``; return ``(index, device fd)``.

    The caller must then call ``do_it`` (which blocks while the device lives).
    """
    for info in sysfs.devices():
        if info.configured:
            continue
        try:
            fd = os.open(info.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.ioctl(fd, NBD_SET_SOCK, sock_fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EBUSY:  # taken since we looked
                continue
            raise KernelError(f"nbd ioctl NBD_SET_SOCK on {info.path} failed: {exc.strerror}") from exc
        try:
            fcntl.ioctl(fd, NBD_SET_BLKSIZE, block_size)
            fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, size // block_size)
            fcntl.ioctl(fd, NBD_SET_TIMEOUT, 0)
            fcntl.ioctl(fd, NBD_SET_FLAGS, flags)
        except OSError as exc:
            _clear(fd)
            os.close(fd)
            raise KernelError(f"configuring {info.path} failed: {exc.strerror}") from exc
        return info.index, fd
    raise KernelError("no free nbd device (load the driver with more: modprobe nbd nbds_max=N)")


def do_it(fd: int) -> None:
    """Serve the device until it is disconnected (blocks)."""
    try:
        fcntl.ioctl(fd, NBD_DO_IT)
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise KernelError(f"NBD_DO_IT failed: {exc.strerror}") from exc
    finally:
        _clear(fd)


def disconnect(index: int) -> None:
    fd = os.open(f"/dev/nbd{index}", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, NBD_DISCONNECT)
    except OSError as exc:
        raise KernelError(f"disconnecting nbd{index} failed: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _clear(fd: int) -> None:
    for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):
        try:
            fcntl.ioctl(fd, request)
        except OSError:
            pass
