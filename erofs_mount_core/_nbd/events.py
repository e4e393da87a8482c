"""The nbd driver's multicast events: NBD_CMD_LINK_DEAD, sent when a device's connection ends.

The kernel multicasts it to the ``nbd_mc_group`` group of the ``nbd`` generic
netlink family, with the device's index (NBD_ATTR_INDEX), as it marks the
connection dead: when its daemon dies, at once. pyroute2 resolves the family
and group ids; the messages are read from a plain socket, so waiting for one
is a ``select`` on its descriptor, with no thread or event loop behind it.
"""

from __future__ import annotations

import errno
import socket
import struct

NETLINK_GENERIC = 16  # not in Python's socket module
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
MC_GROUP = "nbd_mc_group"
NBD_CMD_LINK_DEAD = 4
NBD_ATTR_INDEX = 1
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_GENL = 4  # cmd, version, reserved
_NLA = struct.Struct("=HH")  # length, type


class Overrun(Exception):
    """Events were lost (the socket's buffer filled): look at every device instead."""


class LinkDeadEvents:
    """A subscription to LINK_DEAD; ``read()`` returns the indexes of the devices it names."""

    def __init__(self) -> None:
        from .netlink import NBDNetlink  # pyroute2 loads only here

        with NBDNetlink() as nl:
            self.family, group = nl.prid, nl.mcast_groups[MC_GROUP]
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[int]:
        """The devices named by the events waiting now (at least one message is waiting)."""
        try:
            data = self.sock.recv(1 << 16)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                raise Overrun() from None
            raise
        return dead_links(data, self.family)

    def close(self) -> None:
        self.sock.close()


def dead_links(data: bytes, family: int) -> list[int]:
    """The NBD_ATTR_INDEX of every LINK_DEAD message of ``family`` in one netlink datagram."""
    found = []
    pos = 0
    while pos + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _port = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size or pos + length > len(data):
            break
        body = data[pos + _NLMSG.size:pos + length]
        if kind == family and len(body) >= _GENL and body[0] == NBD_CMD_LINK_DEAD:
            index = _u32_attr(body[_GENL:], NBD_ATTR_INDEX)
            if index is not None:
                found.append(index)
        pos += (length + 3) & ~3
    return found


def _u32_attr(attrs: bytes, wanted: int) -> int | None:
    pos = 0
    while pos + _NLA.size <= len(attrs):
        length, kind = _NLA.unpack_from(attrs, pos)
        if length < _NLA.size:
            return None
        if kind & 0x3FFF == wanted and length >= _NLA.size + 4:
            return int.from_bytes(attrs[pos + _NLA.size:pos + _NLA.size + 4], "little")
        pos += (length + 3) & ~3
    return None
