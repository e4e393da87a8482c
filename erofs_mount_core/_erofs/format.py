"""The EROFS on-disk structures this package writes (linux fs/erofs/erofs_fs.h).

Only what a synthesized, uncompressed image needs: the superblock, the
64-byte extended inode, inline xattrs, directory entries. All integers are
little-endian.
"""

from __future__ import annotations

import stat
import struct

MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024
BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
NID_SIZE = 32  # an inode's number is its offset in the metadata area, in 32-byte slots
NULL_ADDR = 0xFFFFFFFF

# inode data layouts (i_format bits 1-3)
FLAT_PLAIN = 0
FLAT_INLINE = 2
EXTENDED = 1  # i_format bit 0: the 64-byte inode

# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time, build_time_nsec,
# blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name, feature_incompat, u1, extra_devices,
# devt_slotoff, dirblkbits, xattr_prefix_count, xattr_prefix_start, packed_nid, xattr_filter_reserved, reserved
SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
# i_format, i_xattr_icount, i_mode, i_reserved, i_size, i_u, i_ino, i_uid, i_gid, i_mtime, i_mtime_nsec,
# i_nlink, i_reserved2
INODE = struct.Struct("<HHHHQIIIIqII16s")  # i_mtime is signed: times before 1970 too
XATTR_BODY_HEADER = struct.Struct("<IB7s")  # h_name_filter, h_shared_count, reserved
XATTR_ENTRY = struct.Struct("<BBH")  # e_name_len, e_name_index, e_value_size
DIRENT = struct.Struct("<QHBB")  # nid, nameoff, file_type, reserved

assert SUPER.size == 128 and INODE.size == 64 and XATTR_BODY_HEADER.size == 12 and DIRENT.size == 12

# directory entry file types (the kernel's FT_*)
FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4, stat.S_IFIFO: 5,
              stat.S_IFSOCK: 6, stat.S_IFLNK: 7}

#: xattr name prefixes with a short index: the longest match wins
XATTR_PREFIXES = (
    ("system.posix_acl_access", 2),
    ("system.posix_acl_default", 3),
    ("user.", 1),
    ("trusted.", 4),
    ("lustre.", 5),
    ("security.", 6),
)


def superblock(*, root_nid: int, inodes: int, blocks: int, meta_blkaddr: int) -> bytes:
    """Extended inodes carry their own times, so build_time stays 0; no uuid, no volume name."""
    return SUPER.pack(MAGIC, 0, 0, BLOCK_BITS, 0, root_nid, inodes, 0, 0, blocks, meta_blkaddr, 0,
                      bytes(16), bytes(16), 0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(23))


def encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev: what a device inode's i_u holds."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def xattr_name(name: bytes) -> tuple[int, bytes]:
    """``b"user.mime"`` -> ``(1, b"mime")``; ValueError for a namespace EROFS has no index for."""
    for prefix, index in XATTR_PREFIXES:
        p = prefix.encode()
        if name.startswith(p) and (len(name) > len(p) or index in (2, 3)):
            return index, name[len(p):]
    raise ValueError(f"xattr {name!r} is in no namespace EROFS stores")


def xattr_body(xattrs: dict[bytes, bytes]) -> tuple[bytes, int]:
    """The inline xattr area and the inode's i_xattr_icount (0 when there are none)."""
    if not xattrs:
        return b"", 0
    body = bytearray(XATTR_BODY_HEADER.pack(0, 0, bytes(7)))
    for name, value in sorted(xattrs.items()):
        index, suffix = xattr_name(name)
        if len(suffix) > 255 or len(value) > 0xFFFF:
            raise ValueError(f"xattr {name!r} is too large for EROFS")
        body += XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        body += bytes(-len(body) % 4)
    return bytes(body), (len(body) - XATTR_BODY_HEADER.size) // 4 + 1


def inode(*, layout: int, xattr_icount: int, mode: int, size: int, i_u: int, ino: int, uid: int, gid: int,
          mtime: int, mtime_nsec: int, nlink: int) -> bytes:
    return INODE.pack((layout << 1) | EXTENDED, xattr_icount, mode & 0xFFFF, 0, size, i_u & 0xFFFFFFFF, ino,
                      uid, gid, mtime, mtime_nsec, nlink, bytes(16))


def directory_blocks(entries: list[tuple[bytes, int, int]]) -> list[bytes]:
    """Directory data from ``(name, nid, file type)`` in name order: full blocks, the last one trimmed.

    Each block holds its entries' dirents, then their names; a name ends
    where the next begins (the last one at the block's used end).
    """
    blocks: list[bytes] = []
    i = 0
    while i < len(entries):
        j, used = i, 0
        while j < len(entries) and used + DIRENT.size + len(entries[j][0]) <= BLOCK_SIZE:
            used += DIRENT.size + len(entries[j][0])
            j += 1
        if j == i:
            raise ValueError(f"name {entries[i][0]!r} is too long")
        chunk = entries[i:j]
        nameoff = DIRENT.size * len(chunk)
        dirents, names = bytearray(), bytearray()
        for name, nid, ftype in chunk:
            dirents += DIRENT.pack(nid, nameoff + len(names), ftype, 0)
            names += name
        blocks.append(bytes(dirents + names))
        i = j
    return blocks
