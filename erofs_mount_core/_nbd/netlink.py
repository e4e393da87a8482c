"""Kernel control of nbd devices over generic netlink (linux/nbd-netlink.h).

Names follow the kernel header. The kernel runs each command inside
``sendmsg``; CONNECT and RECONFIGURE take the socket fds from the calling
process, so they must be sent by the process that owns the sockets.
Importing this module imports pyroute2's netlink modules (~0.1 s): import it lazily.
"""

from __future__ import annotations

import errno
import importlib.util
import sys
from collections.abc import Sequence


def _pyroute2_without_its_package_init() -> None:
    """pyroute2's ``__init__`` imports all of the library (IPDB, NDB, conntrack, nl80211...): 0.25 s
    here, 5 s in an emulated test VM, on every command and daemon start. Only its netlink modules are
    used: register the package without running its ``__init__``, so importing them runs just them."""
    if "pyroute2" not in sys.modules:
        spec = importlib.util.find_spec("pyroute2")
        if spec is not None:
            sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)


_pyroute2_without_its_package_init()

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
from pyroute2.netlink.generic import GenericNetlinkSocket  # noqa: E402

from .._errors import ErofsMountError, KernelError, NotRootError  # noqa: E402

FAMILY = "nbd"
VERSION = 1

NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3


class nbdmsg(genlmsg):  # noqa: N801 - pyroute2 naming convention
    # ids are positional: NBD_ATTR_UNSPEC = 0 ... NBD_ATTR_BACKEND_IDENTIFIER = 10
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sock_list"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sock_list(nla):  # noqa: N801
        # repeated NBD_SOCK_ITEM (type 1): pyroute2's '*item' arrays would number them 1, 2, ...
        nla_flags = 0x8000
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):  # noqa: N801
            nla_flags = 0x8000
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_list(nla):  # noqa: N801
        nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):  # noqa: N801
            nla_map = (
                ("NBD_DEVICE_UNSPEC", "none"),
                ("NBD_DEVICE_INDEX", "uint32"),
                ("NBD_DEVICE_CONNECTED", "uint8"),
            )


def _msg(cmd: int, attrs: list[list[object]]) -> nbdmsg:
    msg = nbdmsg()
    msg["cmd"] = cmd
    msg["version"] = VERSION
    msg["attrs"] = attrs
    return msg


def _sockets(fds: Sequence[int]) -> list[object]:
    return ["NBD_ATTR_SOCKETS",
            {"attrs": [["NBD_SOCK_ITEM", {"attrs": [["NBD_SOCK_FD", fd]]}] for fd in fds]}]


def connect_msg(fds: Sequence[int], *, size: int, block_size: int, server_flags: int,
                dead_timeout: int, backend: str, client_flags: int = 0,
                index: int | None = None) -> nbdmsg:
    attrs: list[list[object]] = []
    if index is not None:
        attrs.append(["NBD_ATTR_INDEX", index])
    attrs += [
        ["NBD_ATTR_SIZE_BYTES", size],
        ["NBD_ATTR_BLOCK_SIZE_BYTES", block_size],
        # TIMEOUT 0: requests never time out, the kernel re-checks stuck ones every 30 s
        ["NBD_ATTR_TIMEOUT", 0],
        ["NBD_ATTR_SERVER_FLAGS", server_flags],
        ["NBD_ATTR_CLIENT_FLAGS", client_flags],
        ["NBD_ATTR_DEAD_CONN_TIMEOUT", dead_timeout],
        _sockets(fds),
        ["NBD_ATTR_BACKEND_IDENTIFIER", backend],
    ]
    return _msg(NBD_CMD_CONNECT, attrs)


def reconfigure_msg(index: int, *, backend: str, fds: Sequence[int] = (),
                    client_flags: int | None = None) -> nbdmsg:
    attrs: list[list[object]] = [["NBD_ATTR_INDEX", index], ["NBD_ATTR_BACKEND_IDENTIFIER", backend]]
    if client_flags is not None:
        attrs.append(["NBD_ATTR_CLIENT_FLAGS", client_flags])
    if fds:
        attrs.append(_sockets(fds))
    return _msg(NBD_CMD_RECONFIGURE, attrs)


def disconnect_msg(index: int) -> nbdmsg:
    return _msg(NBD_CMD_DISCONNECT, [["NBD_ATTR_INDEX", index]])


class NBDNetlink(GenericNetlinkSocket):
    """The nbd generic netlink family. Raises ``KernelError`` with a user-facing line.

    No STATUS: a device's state is read from sysfs (``sysfs.py``), which needs
    no privilege and reads the same for devices attached through the ioctls.

    Method names avoid ``status``/``send``/``pid``: pyroute2's SyncAPI proxies those.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        try:
            self.bind(FAMILY, nbdmsg)
        except NetlinkError as exc:
            self.close()
            if exc.code == errno.ENOENT:
                raise KernelError(
                    "the kernel has no nbd driver: load it with 'modprobe nbd' "
                    "(a kernel built with CONFIG_BLK_DEV_NBD is needed)"
                ) from exc
            raise KernelError(f"cannot reach the kernel's nbd netlink family: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _request(self, msg: nbdmsg, what: str, *, ack: bool) -> tuple[nbdmsg, ...]:
        try:
            return tuple(self.nlm_request(msg, msg_type=self.prid,
                                          msg_flags=NLM_F_REQUEST | (NLM_F_ACK if ack else 0)))
        except NetlinkError as exc:
            raise _kernel_error(what, exc) from exc

    def connect_device(self, fds: Sequence[int], **kwargs: object) -> int:
        """NBD_CMD_CONNECT; returns the device index the kernel chose."""
        for reply in self._request(connect_msg(fds, **kwargs), "connect", ack=False):  # type: ignore[arg-type]
            index = reply.get_attr("NBD_ATTR_INDEX")
            if index is not None:
                return int(index)
        raise KernelError("the kernel accepted the nbd connect but named no device")

    def reconfigure_device(self, index: int, **kwargs: object) -> None:
        self._request(reconfigure_msg(index, **kwargs), f"reconfigure nbd{index}", ack=True)  # type: ignore[arg-type]

    def disconnect_device(self, index: int) -> None:
        self._request(disconnect_msg(index), f"disconnect nbd{index}", ack=True)


def _kernel_error(what: str, exc: NetlinkError) -> ErofsMountError:
    if exc.code == errno.EPERM:
        return NotRootError(f"nbd {what}")
    if exc.code == errno.EBUSY:
        return KernelError(f"nbd {what}: the device is already in use")
    if exc.code == errno.EINVAL:
        return KernelError(f"nbd {what}: the kernel refused the request (EINVAL; dmesg says why)")
    return KernelError(f"nbd {what} failed: {exc.args[-1] if exc.args else exc}")
