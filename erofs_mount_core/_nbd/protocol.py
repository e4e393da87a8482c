"""NBD wire format of the transmission phase (linux/nbd.h, the NBD protocol spec).

All integers are big-endian. Error replies carry a positive errno value.
"""

from __future__ import annotations

import errno
import struct

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# request: magic u32, command flags u16, type u16, cookie u64, offset u64, length u32
REQUEST = struct.Struct(">IHHQQI")
# simple reply: magic u32, error u32, cookie u64
REPLY = struct.Struct(">IIQ")

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

# transmission flags (server flags)
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_CAN_MULTI_CONN = 1 << 8

# client flags of the kernel's netlink interface
CFLAG_DISCONNECT_ON_CLOSE = 1 << 1

#: the errno values this server replies with (the protocol allows a fixed set)
EPERM = errno.EPERM
EIO = errno.EIO
EINVAL = errno.EINVAL

#: the largest read we serve; the kernel asks for at most max_sectors (a few MiB)
MAX_READ = 32 * 1024 * 1024


def reply_header(cookie: int, error: int = 0) -> bytes:
    return REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
