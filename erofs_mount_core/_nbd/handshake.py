"""The fixed newstyle handshake, server side (NBD protocol spec, "Handshake").

Used by ``erofs-mount serve`` for ordinary NBD clients; the kernel path
skips it (the kernel starts in the transmission phase). One read-only
export is offered under every name, as nbdkit does by default.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct

from . import protocol as p

log = logging.getLogger("erofs_mount.handshake")

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) | 1
REP_ERR_INVALID = (1 << 31) | 3

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

#: the longest option payload we read; longer ones are refused unread
MAX_OPTION = 64 * 1024
#: block size constraints advertised with NBD_INFO_BLOCK_SIZE
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096


class HandshakeError(Exception):
    """The client broke the protocol or went away: close the connection."""


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("client closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _reply(sock: socket.socket, option: int, rtype: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QIII", OPTION_REPLY_MAGIC, option, rtype, len(data)) + data)


def negotiate(sock: socket.socket, *, size: int, flags: int, description: str = "") -> bool:
    """Run the handshake; True when the client enters the transmission phase."""
    sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (client_flags,) = struct.unpack(">I", _recv(sock, 4))
    if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        raise HandshakeError(f"unknown client flags 0x{client_flags:x}")
    no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
    while True:
        magic, option, length = struct.unpack(">QII", _recv(sock, 16))
        if magic != IHAVEOPT:
            raise HandshakeError(f"bad option magic 0x{magic:x}")
        if length > MAX_OPTION:
            raise HandshakeError(f"option {option} of {length} bytes is too large")
        data = _recv(sock, length)
        if option == OPT_EXPORT_NAME:
            sock.sendall(struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124)))
            return True
        if option == OPT_ABORT:
            with contextlib.suppress(OSError):  # clients may close without reading the ACK
                _reply(sock, option, REP_ACK)
            return False
        if option == OPT_LIST:
            if data:
                _reply(sock, option, REP_ERR_INVALID)
                continue
            _reply(sock, option, REP_SERVER, struct.pack(">I", 0))
            _reply(sock, option, REP_ACK)
        elif option in (OPT_INFO, OPT_GO):
            requests = _parse_info_request(data)
            if requests is None:
                _reply(sock, option, REP_ERR_INVALID)
                continue
            name, wanted = requests
            _reply(sock, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags))
            _reply(sock, option, REP_INFO,
                   struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, p.MAX_READ))
            if INFO_NAME in wanted:
                _reply(sock, option, REP_INFO, struct.pack(">H", INFO_NAME) + name)
            if INFO_DESCRIPTION in wanted and description:
                _reply(sock, option, REP_INFO,
                       struct.pack(">H", INFO_DESCRIPTION) + description.encode("utf-8", "replace")[:4096])
            _reply(sock, option, REP_ACK)
            if option == OPT_GO:
                return True
        else:
            _reply(sock, option, REP_ERR_UNSUP)


def _parse_info_request(data: bytes) -> tuple[bytes, set[int]] | None:
    if len(data) < 6:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    if 4 + name_len + 2 > len(data):
        return None
    name = data[4:4 + name_len]
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[6 + name_len:]
    if len(rest) != 2 * count:
        return None
    return name, set(struct.unpack(f">{count}H", rest))
