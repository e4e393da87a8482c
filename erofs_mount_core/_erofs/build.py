"""A tree of entries -> EROFS metadata and a block map: the synthesized image's layout.

The device is ``[metadata blocks][data region]``. The metadata blocks hold
the superblock, every inode (with its inline xattrs and, where it fits, the
tail of a directory or symlink), then the full blocks of large directories.
The data region holds each regular file's bytes from its own block on; its
blocks are not stored anywhere: ``ImageLayout.extents`` says which range of the
backing stream each file's blocks come from, and the image source reads
them there, zero-filling each file's last block. Nothing is copied, and no
alignment of the stream is needed.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from bisect import bisect_right

import attrs

from .._errors import SourceError
from . import format as fmt

BS = fmt.BLOCK_SIZE
INODE_SIZE = fmt.INODE.size
FIRST_RECORD = fmt.SUPER_OFFSET + fmt.SUPER.size  # inodes start right after the superblock, in block 0


@attrs.define(eq=False)
class ImageNode:
    """One inode. The same ImageNode under several names is one inode with several links (a hardlink)."""

    mode: int
    """st_mode: the file type bits and the permissions (setuid, setgid and sticky included)."""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    xattrs: dict[bytes, bytes] = attrs.Factory(dict)
    size: int = 0
    """Regular files: the length of their bytes."""
    data_offset: int = 0
    """Regular files: where their bytes start in the backing stream."""
    target: bytes = b""
    """Symlinks: where they point."""
    rdev: tuple[int, int] = (0, 0)
    """Character and block devices: (major, minor)."""
    children: dict[bytes, ImageNode] = attrs.Factory(dict)
    """Directories: name -> entry, without "." and ".."."""

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


@attrs.frozen
class Extent:
    first_block: int
    backing_offset: int
    size: int
    """The file's bytes; its last block is zero-filled past them."""


_PACKED_HEAD = struct.Struct("<8sIIIQ")  # magic, data_start, blocks, inodes, extents
_PACKED_EXTENT = struct.Struct("<QQQ")  # first_block, backing_offset, size
_PACKED_MAGIC = b"EROFSLAY"


@attrs.frozen
class ImageLayout:
    """What a synthesized image serves: its metadata blocks, and where each file's blocks come from."""

    metadata: bytes
    """Blocks [0, data_start): everything but the regular files' bytes."""
    data_start: int
    extents: tuple[Extent, ...]
    """Sorted by first_block; blocks of the data region that no extent covers read as zeros."""
    blocks: int
    inodes: int
    _firsts: tuple[int, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_firsts", tuple(e.first_block for e in self.extents))

    @property
    def size(self) -> int:
        return self.blocks * BS

    @staticmethod
    def of(root: ImageNode) -> ImageLayout:
        """Lay out the tree under ``root`` (a directory) as an EROFS image."""
        return build(root)

    def to_bytes(self) -> bytes:
        """A compact form to keep in a cache: ``from_bytes`` gives this layout back, exactly."""
        head = _PACKED_HEAD.pack(_PACKED_MAGIC, self.data_start, self.blocks, self.inodes, len(self.extents))
        return head + b"".join(_PACKED_EXTENT.pack(e.first_block, e.backing_offset, e.size)
                               for e in self.extents) + self.metadata

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageLayout:
        """ValueError unless ``data`` is what ``to_bytes`` writes."""
        try:
            magic, data_start, blocks, inodes, count = _PACKED_HEAD.unpack_from(data)
        except struct.error:
            raise ValueError("not a packed image layout") from None
        start = _PACKED_HEAD.size + count * _PACKED_EXTENT.size
        if magic != _PACKED_MAGIC or len(data) != start + data_start * BS:
            raise ValueError("not a packed image layout")
        extents = tuple(Extent(*_PACKED_EXTENT.unpack_from(data, _PACKED_HEAD.size + i * _PACKED_EXTENT.size))
                        for i in range(count))
        end = data_start
        for e in extents:
            if e.first_block < end or e.size <= 0:
                raise ValueError("a packed image layout's extents overlap")
            end = e.first_block + -(-e.size // BS)
        if end > blocks:
            raise ValueError("a packed image layout's extents run past its end")
        return cls(data[start:], data_start, extents, blocks, inodes)

    def digest(self) -> str:
        """The sha256 of the packed layout: equal digests serve equal bytes from equal streams."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def extent_at(self, block: int) -> Extent | None:
        i = bisect_right(self._firsts, block) - 1
        if i >= 0:
            e = self.extents[i]
            if block < e.first_block + -(-e.size // BS):
                return e
        return None


@attrs.define(eq=False)
class _Placed:
    node: ImageNode
    parent: ImageNode
    content_size: int = 0      # directories and symlinks: the size of their data
    full_blocks: int = 0       # blocks of content outside the inode record
    tail: int = 0              # bytes of content inline after the inode (FLAT_INLINE)
    xattrs: bytes = b""
    xattr_icount: int = 0
    offset: int = 0            # of the inode record in the metadata area
    nlink: int = 0
    raw_blkaddr: int = 0

    @property
    def nid(self) -> int:
        return self.offset // fmt.NID_SIZE


def build(root: ImageNode) -> ImageLayout:
    """Lay out the tree under ``root`` (a directory) as an EROFS image."""
    if root.kind != stat.S_IFDIR:
        raise ValueError("the root of an image must be a directory")
    placed = _collect(root)
    for p in placed.values():
        p.xattrs, p.xattr_icount = fmt.xattr_body(p.node.xattrs)
        p.content_size = _content_size(p)
    end = _place_records(placed)
    meta_blocks = -(-end // BS)
    block = meta_blocks
    for p in placed.values():  # directories and symlinks too large to inline: synthesized full blocks
        if p.full_blocks:
            p.raw_blkaddr, block = block, block + p.full_blocks
    data_start = block
    extents = []
    for p in placed.values():
        if p.node.kind == stat.S_IFREG:
            if p.node.size:
                p.raw_blkaddr = block
                extents.append(Extent(block, p.node.data_offset, p.node.size))
                block += -(-p.node.size // BS)
            else:
                p.raw_blkaddr = fmt.NULL_ADDR
    if block >= fmt.NULL_ADDR:
        raise SourceError(f"the image would have more blocks than EROFS addresses ({block:,}; "
                          f"{fmt.NULL_ADDR * BS >> 40} TiB at most)")
    metadata = bytearray(data_start * BS)
    metadata[fmt.SUPER_OFFSET:FIRST_RECORD] = fmt.superblock(
        root_nid=placed[id(root)].nid, inodes=len(placed), blocks=block, meta_blkaddr=0)
    for p in placed.values():
        content = _content(p, placed)
        record = _inode(p) + p.xattrs + (content[p.full_blocks * BS:] if p.tail else b"")
        metadata[p.offset:p.offset + len(record)] = record
        if p.full_blocks:
            start = p.raw_blkaddr * BS
            metadata[start:start + p.full_blocks * BS] = content[:p.full_blocks * BS].ljust(p.full_blocks * BS, b"\0")
    return ImageLayout(bytes(metadata), data_start, tuple(extents), block, len(placed))


def _collect(root: ImageNode) -> dict[int, _Placed]:
    """Every inode once, root first, directories before their contents; link counts."""
    placed: dict[int, _Placed] = {id(root): _Placed(root, root)}
    stack = [root]
    while stack:
        directory = stack.pop()
        for name, child in sorted(directory.children.items()):
            if not name or b"/" in name or name in (b".", b"..") or len(name) > 255:
                raise ValueError(f"{name!r} cannot be a name in a directory")
            p = placed.get(id(child))
            if p is None:
                p = placed[id(child)] = _Placed(child, directory)
                if child.kind == stat.S_IFDIR:
                    stack.append(child)
            elif child.kind == stat.S_IFDIR:
                raise ValueError(f"directory {name!r} is linked twice")
            p.nlink += 1
    for p in placed.values():
        if p.node.kind == stat.S_IFDIR:
            p.nlink = 2 + sum(1 for c in p.node.children.values() if c.kind == stat.S_IFDIR)
    return placed


def _entries(p: _Placed, placed: dict[int, _Placed]) -> list[tuple[bytes, int, int]]:
    dir_type = fmt.FILE_TYPES[stat.S_IFDIR]
    own = [(b".", p.nid, dir_type), (b"..", placed[id(p.parent)].nid, dir_type)]
    others = [(name, placed[id(c)].nid, fmt.FILE_TYPES.get(c.kind, 0)) for name, c in p.node.children.items()]
    return sorted(own + others)


def _content(p: _Placed, placed: dict[int, _Placed] | None) -> bytes:
    """A directory's entries or a symlink's target; without ``placed``, nids are placeholders
    (the size and the block split, all that placement needs, do not depend on them)."""
    if p.node.kind == stat.S_IFLNK:
        if not p.node.target:
            raise ValueError("a symlink needs a target")
        return p.node.target
    if p.node.kind != stat.S_IFDIR:
        return b""
    if placed is None:
        entries = sorted([(b".", 0, 0), (b"..", 0, 0)] + [(name, 0, 0) for name in p.node.children])
    else:
        entries = _entries(p, placed)
    blocks = fmt.directory_blocks(entries)
    return b"".join(b.ljust(BS, b"\0") for b in blocks[:-1]) + blocks[-1]


def _content_size(p: _Placed) -> int:
    return len(_content(p, None))


def _place_records(placed: dict[int, _Placed]) -> int:
    """Give each inode its offset (so its nid), with its tail inline where the block has room;
    return the end of the last record."""
    offset = FIRST_RECORD
    for p in placed.values():
        p.full_blocks, tail = divmod(p.content_size, BS)
        head = INODE_SIZE + len(p.xattrs)
        if tail and head + tail <= BS:
            p.tail = tail  # FLAT_INLINE: the record and its tail must share a block
        elif tail:
            p.full_blocks += 1  # no room inline: the tail gets a block of its own
        start = -(-offset // fmt.NID_SIZE) * fmt.NID_SIZE
        if start % BS + min(head + p.tail, BS) > BS:
            start = -(-start // BS) * BS
        p.offset = start
        offset = start + head + p.tail
    return offset


def _inode(p: _Placed) -> bytes:
    n = p.node
    kind = n.kind
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        i_u, size = fmt.encode_dev(*n.rdev), 0
    elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
        i_u, size = 0, 0
    elif kind == stat.S_IFREG:
        i_u, size = p.raw_blkaddr, n.size
    else:  # a directory or a symlink: its data, in whole blocks and maybe an inline tail
        i_u, size = (p.raw_blkaddr if p.full_blocks else 0), p.content_size
    layout = fmt.FLAT_INLINE if p.tail else fmt.FLAT_PLAIN
    return fmt.inode(layout=layout, xattr_icount=p.xattr_icount, mode=n.mode, size=size, i_u=i_u,
                     ino=p.nid, uid=n.uid, gid=n.gid, mtime=n.mtime, mtime_nsec=n.mtime_nsec, nlink=p.nlink)
