"""Netlink messages for the kernel's nbd family, checked byte by byte.

The kernel side of these messages is exercised by tests/vm/test_local_mount.py.
"""

from __future__ import annotations

import struct

from erofs_mount_core._nbd import netlink as nl
from erofs_mount_core._nbd import protocol as p

NLA_F_NESTED = 0x8000


def tlvs(buf: bytes) -> list[tuple[int, int, bytes]]:
    """An independent netlink attribute parser: [(type, flags, payload)]."""
    out, off = [], 0
    while off + 4 <= len(buf):
        length, atype = struct.unpack_from("=HH", buf, off)
        out.append((atype & 0x3FFF, atype & 0xC000, buf[off + 4:off + length]))
        off += (length + 3) & ~3
    return out


def genl_payload(msg: nl.nbdmsg) -> tuple[int, int, bytes]:
    msg.encode()
    raw = bytes(msg.data)
    total = struct.unpack_from("=I", raw)[0]
    cmd, version = struct.unpack_from("=BB", raw, 16)
    return cmd, version, raw[20:total]


def test_connect_message_layout() -> None:
    msg = nl.connect_msg([7, 9], size=1 << 30, block_size=512,
                         server_flags=p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY | p.FLAG_CAN_MULTI_CONN,
                         dead_timeout=3600, backend="/run/erofs-mount/nbd-x y.toml")
    cmd, version, body = genl_payload(msg)
    assert (cmd, version) == (1, 1)
    attrs = {t: (f, v) for t, f, v in tlvs(body)}
    assert struct.unpack("=Q", attrs[2][1]) == (1 << 30,)             # SIZE_BYTES
    assert struct.unpack("=Q", attrs[3][1]) == (512,)                 # BLOCK_SIZE_BYTES
    assert struct.unpack("=Q", attrs[4][1]) == (0,)                   # TIMEOUT
    assert struct.unpack("=Q", attrs[5][1]) == (0x103,)               # SERVER_FLAGS
    assert struct.unpack("=Q", attrs[8][1]) == (3600,)                # DEAD_CONN_TIMEOUT
    assert attrs[10][1] == b"/run/erofs-mount/nbd-x y.toml\0"         # BACKEND_IDENTIFIER
    assert 1 not in attrs                                             # no INDEX: the kernel picks
    flags, socks = attrs[7]
    items = tlvs(socks)
    assert [t for t, _f, _v in items] == [1, 1], "every socket item has type NBD_SOCK_ITEM (1)"
    fds = [struct.unpack("=I", tlvs(v)[0][2])[0] for _t, _f, v in items]
    assert fds == [7, 9]
    assert all(tlvs(v)[0][0] == 1 for _t, _f, v in items)             # NBD_SOCK_FD


def test_reconfigure_carries_index_backend_and_sockets() -> None:
    msg = nl.reconfigure_msg(3, backend="/r/a.toml", fds=[5], client_flags=p.CFLAG_DISCONNECT_ON_CLOSE)
    cmd, _v, body = genl_payload(msg)
    assert cmd == 3
    attrs = {t: v for t, _f, v in tlvs(body)}
    assert struct.unpack("=I", attrs[1]) == (3,)
    assert attrs[10] == b"/r/a.toml\0"
    assert struct.unpack("=Q", attrs[6]) == (2,)
    assert [struct.unpack("=I", tlvs(v)[0][2])[0] for _t, _f, v in tlvs(attrs[7])] == [5]


def test_disconnect() -> None:
    cmd, _v, body = genl_payload(nl.disconnect_msg(12))
    assert cmd == 2 and tlvs(body) == [(1, 0, struct.pack("=I", 12))]


def test_link_dead_events_are_read_from_raw_datagrams() -> None:
    """Two messages in one datagram, as the kernel may batch them: LINK_DEAD of nbd3, then another command."""
    import struct

    from erofs_mount_core._nbd.events import NBD_CMD_LINK_DEAD, dead_links

    def message(family: int, cmd: int, index: int) -> bytes:
        attr = struct.pack("=HHI", 8, 1, index)
        body = bytes([cmd, 1, 0, 0]) + attr
        return struct.pack("=IHHII", 16 + len(body), family, 0, 0, 0) + body

    data = message(33, NBD_CMD_LINK_DEAD, 3) + message(33, 5, 4) + message(34, NBD_CMD_LINK_DEAD, 5)
    assert dead_links(data, 33) == [3]
    assert dead_links(data[:20], 33) == [], "a truncated message is ignored"
