"""One face for the kernel's nbd driver, whichever interface it speaks.

``NetlinkLink`` (Linux 4.12 and newer) and ``IoctlLink`` (the legacy
ioctls) answer the same calls, so mount, reattach, umount and the daemon
never ask which one they hold. A record names its device's link by ``name``;
``link_named`` gives it back. The device status both need comes from sysfs
(``sysfs.py``), which reads the same for either interface.
"""

from __future__ import annotations

import abc
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .._errors import DeviceStateError, ErofsMountError, KernelError, UsageError
from . import protocol as p

INTERFACE_ENV = "EROFS_MOUNT_NBD_INTERFACE"


class KernelLink(abc.ABC):
    """Connects, reconnects and disconnects nbd devices served by this process's sockets."""

    name: str
    max_connections: int
    """How many sockets one device may have."""
    names_backend: bool
    """Whether the kernel keeps the backend identifier (the record's path) in sysfs."""

    @abc.abstractmethod
    def connect(self, kernel_ends: Sequence[socket.socket], *, size: int, block_size: int,
                dead_timeout: int, backend: str) -> int:
        """Attach a new read-only device served on ``kernel_ends``; return its index.

        The kernel holds its own references: the caller may close the sockets.
        """

    @abc.abstractmethod
    def reconnect(self, index: int, kernel_ends: Sequence[socket.socket], *, backend: str) -> None:
        """Hand a device whose connections died new sockets (the kernel drops them while one lives)."""

    @abc.abstractmethod
    def disconnect_on_close(self, index: int, *, backend: str) -> None:
        """Once mounted: a plain umount(8) of the device also disconnects it."""

    @abc.abstractmethod
    def disconnect(self, index: int) -> None:
        """Tear the device's connections down; its serving daemon then sees NBD_CMD_DISC."""

    def check_reattach(self, index: int) -> None:  # noqa: B027 - only the ioctl link refuses
        """DeviceStateError if this interface cannot hand the device a new connection."""

    def wait(self) -> None:  # noqa: B027 - only the ioctl link has something to wait for
        """Return once the kernel has let go of the devices this process connected."""


def server_flags(connections: int) -> int:
    flags = p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY
    return flags | p.FLAG_CAN_MULTI_CONN if connections > 1 else flags


class NetlinkLink(KernelLink):
    """Generic netlink (linux/nbd-netlink.h): the only interface that can reattach."""

    name = "netlink"
    max_connections = 64
    names_backend = True

    @staticmethod
    def _call(fn):  # type: ignore[no-untyped-def]
        from .netlink import NBDNetlink  # pyroute2 loads only here

        with NBDNetlink() as nl:
            return fn(nl)

    def probe(self) -> None:
        """KernelError unless the kernel has the nbd netlink family."""
        self._call(lambda nl: None)

    def connect(self, kernel_ends: Sequence[socket.socket], *, size: int, block_size: int,
                dead_timeout: int, backend: str) -> int:
        return self._call(lambda nl: nl.connect_device(
            [k.fileno() for k in kernel_ends], size=size, block_size=block_size,
            server_flags=server_flags(len(kernel_ends)), dead_timeout=dead_timeout, backend=backend))

    def reconnect(self, index: int, kernel_ends: Sequence[socket.socket], *, backend: str) -> None:
        self._call(lambda nl: nl.reconfigure_device(index, backend=backend, fds=[k.fileno() for k in kernel_ends]))

    def disconnect_on_close(self, index: int, *, backend: str) -> None:
        self._call(lambda nl: nl.reconfigure_device(index, backend=backend,
                                                    client_flags=p.CFLAG_DISCONNECT_ON_CLOSE))

    def disconnect(self, index: int) -> None:
        self._call(lambda nl: nl.disconnect_device(index))


class IoctlLink(KernelLink):
    """The legacy ioctls, for kernels without the netlink family.

    One socket per device, a thread of this process sitting in NBD_DO_IT
    while the device lives, and no way to hand a device a new socket: such
    devices cannot be reattached.
    """

    name = "ioctl"
    max_connections = 1
    names_backend = False

    def __init__(self) -> None:
        self._sitters: list[threading.Thread] = []

    @staticmethod
    def available() -> bool:
        return Path("/dev/nbd0").exists()

    def connect(self, kernel_ends: Sequence[socket.socket], *, size: int, block_size: int,
                dead_timeout: int, backend: str) -> int:
        from . import ioctl

        (kernel_end,) = kernel_ends
        index, device_fd = ioctl.attach(kernel_end.fileno(), size=size, block_size=block_size,
                                        flags=server_flags(1))

        def sit() -> None:
            try:
                ioctl.do_it(device_fd)
            finally:
                os.close(device_fd)

        sitter = threading.Thread(target=sit, name="nbd-do-it", daemon=True)
        sitter.start()
        self._sitters.append(sitter)
        pid_file = Path(f"/sys/block/nbd{index}/pid")
        deadline = time.monotonic() + 10
        while not pid_file.exists():
            if not sitter.is_alive() or time.monotonic() > deadline:
                raise KernelError(f"nbd{index} did not start serving (NBD_DO_IT)")
            time.sleep(0.02)
        return index

    def reconnect(self, index: int, kernel_ends: Sequence[socket.socket], *, backend: str) -> None:
        self.check_reattach(index)

    def check_reattach(self, index: int) -> None:
        raise DeviceStateError(
            f"nbd{index} was attached through the kernel's legacy ioctl interface, which cannot "
            "take a new connection: unmount it and mount it again")

    def disconnect_on_close(self, index: int, *, backend: str) -> None:
        """The ioctl interface has no such flag: the device ends with its NBD_DO_IT."""

    def disconnect(self, index: int) -> None:
        from . import ioctl

        ioctl.disconnect(index)

    def wait(self) -> None:
        for sitter in self._sitters:
            sitter.join()


def link_named(name: str) -> KernelLink:
    """The link a record names."""
    links: dict[str, type[KernelLink]] = {"netlink": NetlinkLink, "ioctl": IoctlLink}
    return links[name]()


def choose_link() -> KernelLink:
    """netlink when the kernel has it, else the legacy ioctls (with a warning: no reattach there).

    Decided before any state exists, so a missing driver leaves nothing behind.
    ``$EROFS_MOUNT_NBD_INTERFACE`` forces one.
    """
    forced = os.environ.get(INTERFACE_ENV)
    if forced not in (None, "", "netlink", "ioctl"):
        raise UsageError(f"{INTERFACE_ENV} must be netlink or ioctl, not {forced!r}")
    if forced == "ioctl":
        if not IoctlLink.available():
            raise KernelError("the kernel has no nbd driver: load it with 'modprobe nbd'")
        return IoctlLink()
    netlink = NetlinkLink()
    try:
        netlink.probe()
    except KernelError:
        if forced or not IoctlLink.available():
            raise
        print("warning: the kernel has no nbd netlink interface; using the legacy ioctl interface, "
              "which cannot reattach after a daemon dies", file=sys.stderr)
        return IoctlLink()
    return netlink


def disconnect_any(index: int) -> None:
    """Disconnect a device whatever attached it: netlink, else the ioctl. Raises if neither could."""
    try:
        NetlinkLink().disconnect(index)
    except KernelError as failed:
        if not IoctlLink.available():
            raise
        try:
            IoctlLink().disconnect(index)
        except (ErofsMountError, OSError):
            raise failed from None
