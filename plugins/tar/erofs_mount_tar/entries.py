"""A tar archive's members -> a tree of ImageNodes whose files point at their bytes in the archive.

Python's tarfile reads the headers (ustar, GNU long names and base-256
numbers, PAX), bounded by ``headers``; this module decides what they mean
for a filesystem:

- names are relative to the root: ``./x``, ``/x`` and ``x/`` are ``x``;
  a ``..`` component, a NUL, a name over 255 bytes or a path over
  ``PATH_MAX`` refuses the archive, naming the entry;
- directories that only appear as a prefix are made (0755, root, time 0)
  and noted as implicit: a layer merged over another leaves such a
  directory's attributes to the layer below;
- a later entry wins over an earlier one of the same name (a directory
  entry over a directory keeps its contents);
- a hardlink is the same inode as its target, which must come before it;
- PAX ``SCHILY.xattr.NAME`` and ``LIBARCHIVE.xattr.NAME`` become xattrs,
  PAX ``mtime`` keeps its nanoseconds (times before 1970 too); an xattr in
  a namespace Linux does not have is left out with a warning, as
  containerd leaves it out;
- OCI whiteouts are kept as overlayfs reads them: ``.wh.NAME`` is a
  character device 0/0 named NAME, ``.wh..wh..opq`` marks its directory
  with ``trusted.overlay.opaque=y``. Like containerd's and Docker's
  appliers, a whiteout after an entry of the same layer deletes it; one
  under a non-directory of the same layer has nothing of that layer to
  delete and applies to the layers below, which the non-directory already
  hides: it is dropped, and never turns the entry into a directory.

Every value is checked against what the EROFS image can hold
(``problem_of``), and the archive against ``MAX_ENTRIES`` and
``MAX_XATTR_BYTES``: each archive is indexed in bounded memory, and a value
out of range is one line naming the entry, never a traceback.
"""

from __future__ import annotations

import base64
import logging
import stat
import tarfile
import urllib.parse
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import BinaryIO

import attrs

from erofs_mount_core import ImageNode

from .headers import PATH_MAX, BoundedTarInfo, HeaderError
from .streams import ArchiveError

log = logging.getLogger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
IMPLICIT_DIR_MODE = stat.S_IFDIR | 0o755
NAME_MAX = 255
MAX_ENTRIES = 1 << 20
"""Entries (headers) one archive may have: about 1 KiB of memory each while it is indexed."""
MAX_XATTR_BYTES = 64 << 20
"""The xattrs of one archive, names and values, all held in its tree."""
XATTR_VALUE_MAX = 1 << 16  # Linux's XATTR_SIZE_MAX
XATTR_AREA_MAX = (0xFFFF - 1) * 4  # an inode's inline xattrs: i_xattr_icount is 16 bits
#: xattr namespaces Linux has; EROFS stores each (system.* only as the POSIX ACLs)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.posix_acl_access", b"system.posix_acl_default")
_TIME_RANGE = range(-(1 << 63), 1 << 63)
_ID_RANGE = range(0, 1 << 32)


@attrs.define
class Tree:
    """A layer's tree, and which of its directories the archive never named (by ``id()``; the
    nodes are held, so that an id is never reused while the tree lives)."""

    root: ImageNode
    implicit: dict[int, ImageNode] = attrs.Factory(dict)
    entries: int = 0
    """Headers read (when the tree was just read from an archive)."""

    def is_implicit(self, node: ImageNode) -> bool:
        return id(node) in self.implicit


def problem_of(node: ImageNode) -> str | None:
    """What in ``node`` no EROFS image can hold, or None: the one check of a tree read from an archive
    and of one loaded from a cached index."""
    if stat.S_IFMT(node.mode) not in _KINDS or node.mode >> 16:
        return f"a mode ({node.mode:o}) no filesystem holds"
    if node.uid not in _ID_RANGE or node.gid not in _ID_RANGE:
        return f"an owner ({node.uid}:{node.gid}) outside 0 to 2^32-1"
    if node.mtime not in _TIME_RANGE or not 0 <= node.mtime_nsec < 1_000_000_000:
        return f"a time ({node.mtime}.{node.mtime_nsec:09d}) outside what a filesystem holds"
    if node.size < 0 or node.data_offset < 0 or node.size >> 63 or node.data_offset >> 63:
        return "a size or an offset out of range"
    if not 0 <= node.rdev[0] < 1 << 12 or not 0 <= node.rdev[1] < 1 << 20:
        return f"a device number ({node.rdev[0]}:{node.rdev[1]}) Linux cannot have"
    if stat.S_ISLNK(node.mode) and (not node.target or len(node.target) >= PATH_MAX or b"\0" in node.target):
        return "a symlink target that is empty, holds a NUL or is longer than PATH_MAX"
    area = 0
    for name, value in node.xattrs.items():
        if not name.startswith(XATTR_NAMESPACES) or len(name) > NAME_MAX or b"\0" in name:
            return f"an xattr name ({name[:60]!r}) EROFS cannot store"
        if len(value) > XATTR_VALUE_MAX:
            return f"an xattr value of {len(value):,} bytes (more than {XATTR_VALUE_MAX:,})"
        area += 4 + len(name) + len(value) + 3
    if area > XATTR_AREA_MAX:
        return f"{area:,} bytes of xattrs (an inode holds {XATTR_AREA_MAX:,})"
    for name in node.children:
        if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name or name in (b".", b".."):
            return f"an entry named {name[:60]!r}"
    return None


_KINDS = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK)


def read_tree(stream: BinaryIO, where: str) -> Tree:
    """The tree of the uncompressed tar ``stream``, read in order (it need only seek forward);
    ``where`` names it in errors."""
    reader = _Reader(where)
    try:
        with tarfile.open(fileobj=stream, mode="r:", errors="surrogateescape", tarinfo=BoundedTarInfo) as tar:
            for member in tar:
                reader.add(member)
                tar.members.clear()  # the tree holds what is needed; tarfile need not hold every header too
    except HeaderError as exc:
        raise ArchiveError(f"{where}: {exc}") from None
    except tarfile.ReadError as exc:
        if "unexpected end" in str(exc):
            raise ArchiveError(f"{where} ends in the middle of an entry: it is truncated") from None
        raise ArchiveError(f"{where} is not a tar archive that can be read: {exc}") from None
    except tarfile.TarError as exc:
        raise ArchiveError(f"{where} is not a tar archive that can be read: {exc}") from None
    except EOFError:
        raise ArchiveError(f"{where} ends in the middle of an entry: it is truncated") from None
    reader.tree.entries = reader.entries
    return reader.tree


def tree_of(members: Iterable[tarfile.TarInfo], where: str) -> Tree:
    """The tree of entries that another table than a tar stream lists (a layer's TOC), read with the same
    rules and checks: each member's ``offset_data`` is where its bytes are in the backing stream."""
    reader = _Reader(where)
    for member in members:
        reader.add(member)
    reader.tree.entries = reader.entries
    return reader.tree


class _Reader:
    """The tree so far, and the archive's budget of entries and xattr bytes."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.tree = Tree(ImageNode(mode=IMPLICIT_DIR_MODE))
        self.tree.implicit[id(self.tree.root)] = self.tree.root
        self.entries = 0
        self.xattr_bytes = 0
        self.dropped: set[bytes] = set()

    def refuse(self, member: tarfile.TarInfo, what: str) -> ArchiveError:
        return ArchiveError(f"{self.where}: entry {member.name[:200]!r} {what}: refusing the archive")

    def add(self, member: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > MAX_ENTRIES:
            raise ArchiveError(f"{self.where} has more than {MAX_ENTRIES:,} entries: refusing the archive")
        path = self.parts(member.name, member)
        if path and path[-1] == OPAQUE:
            directory = self.directory(path[:-1], member, whiteout=True)
            if directory is not None:
                directory.xattrs[b"trusted.overlay.opaque"] = b"y"
            return
        if path and path[-1].startswith(WHITEOUT):
            target = path[-1][len(WHITEOUT):]
            if target in ("", ".", ".."):
                raise self.refuse(member, "is a whiteout of no name")
            path = path[:-1] + (target,)
            seconds, nsec = self.mtime(member)
            node = ImageNode(mode=stat.S_IFCHR, rdev=(0, 0), uid=member.uid, gid=member.gid,
                             mtime=seconds, mtime_nsec=nsec)
            self.check(node, member)
            parent = self.directory(path[:-1], member, whiteout=True)
            if parent is not None:
                self.place(parent, path, node)
            return
        if member.islnk():
            node = self.find(self.parts(member.linkname, member))
            if node is None or node.kind == stat.S_IFDIR:
                raise ArchiveError(f"{self.where}: entry {member.name!r} is a hardlink to {member.linkname!r}, "
                                   "which the archive does not hold before it: refusing the archive")
        else:
            node = self.node(member)
        if not path:  # "." itself: the root's own attributes
            if node.kind == stat.S_IFDIR:
                _update_directory(self.tree, self.tree.root, node)
            return
        parent = self.directory(path[:-1], member)
        assert parent is not None
        self.place(parent, path, node)

    def place(self, parent: ImageNode, path: tuple[str, ...], node: ImageNode) -> None:
        name = _name(path[-1])
        old = parent.children.get(name)
        if old is not None and old.kind == stat.S_IFDIR and node.kind == stat.S_IFDIR:
            _update_directory(self.tree, old, node)  # a directory named again: new attributes, same contents
        else:
            parent.children[name] = node  # whatever was there, a directory and all under it, is replaced

    def parts(self, name: str, member: tarfile.TarInfo) -> tuple[str, ...]:
        raw = _name(name)
        if len(raw) > PATH_MAX or "\0" in name:
            raise self.refuse(member, "has a name longer than PATH_MAX or holding a NUL")
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if ".." in parts:
            raise ArchiveError(f"{self.where}: entry {member.name!r} would land outside the root ('..'): "
                               "refusing the archive")
        if any(len(_name(p)) > NAME_MAX for p in parts):
            raise self.refuse(member, f"has a name longer than {NAME_MAX} bytes")
        return parts

    def find(self, path: tuple[str, ...]) -> ImageNode | None:
        node = self.tree.root
        for part in path:
            if node.kind != stat.S_IFDIR:
                return None
            child = node.children.get(_name(part))
            if child is None:
                return None
            node = child
        return node

    def directory(self, path: tuple[str, ...], member: tarfile.TarInfo, *, whiteout: bool = False) -> ImageNode | None:
        """The directory at ``path``, made (with its parents) if the archive has not named it yet. For a
        whiteout, None where the layer has a non-directory on the way (see the module)."""
        node = self.tree.root
        for part in path:
            name = _name(part)
            child = node.children.get(name)
            if child is not None and child.kind != stat.S_IFDIR and whiteout:
                return None
            if child is None or child.kind != stat.S_IFDIR:
                child = ImageNode(mode=IMPLICIT_DIR_MODE)
                self.tree.implicit[id(child)] = child
                node.children[name] = child
            node = child
        return node

    def node(self, member: tarfile.TarInfo) -> ImageNode:
        if not 0 <= member.mode <= 0o7777777:
            raise self.refuse(member, f"has a mode ({member.mode}) no filesystem holds")
        seconds, nsec = self.mtime(member)
        node = ImageNode(mode=member.mode & 0o7777, uid=member.uid, gid=member.gid, mtime=seconds,
                         mtime_nsec=nsec, xattrs=self.xattrs(member))
        if member.isreg():
            node.mode |= stat.S_IFREG
            node.size, node.data_offset = member.size, member.offset_data
        elif member.isdir():
            node.mode |= stat.S_IFDIR
        elif member.issym():
            node.mode = stat.S_IFLNK | 0o777  # as Linux makes every symlink, whatever the archive says
            node.target = _name(member.linkname)
            if not node.target:
                raise ArchiveError(f"{self.where}: symlink {member.name!r} has no target")
        elif member.ischr() or member.isblk():
            node.mode |= stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            node.rdev = (member.devmajor, member.devminor)
        elif member.isfifo():
            node.mode |= stat.S_IFIFO
        else:
            raise ArchiveError(f"{self.where}: entry {member.name!r} has a type ({member.type!r}) "
                               "no filesystem holds")
        self.check(node, member)
        return node

    def check(self, node: ImageNode, member: tarfile.TarInfo) -> None:
        problem = problem_of(node)
        if problem is not None:
            raise self.refuse(member, f"has {problem}")

    def mtime(self, member: tarfile.TarInfo) -> tuple[int, int]:
        """Seconds and nanoseconds: PAX's decimal text, exactly, when the archive has it."""
        text = member.pax_headers.get("mtime")
        try:
            if text:
                value = Decimal(text)
                seconds = int(value.to_integral_value(rounding="ROUND_FLOOR"))
                return seconds, int((value - seconds) * 1_000_000_000)
            return int(member.mtime), 0
        except (InvalidOperation, ValueError, OverflowError):
            raise self.refuse(member, f"has a time ({text or member.mtime!r}) no filesystem holds") from None

    def xattrs(self, member: tarfile.TarInfo) -> dict[bytes, bytes]:
        xattrs = {}
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                name = _name(key[len("SCHILY.xattr."):])
                xattrs[name] = _name(value)
            elif key.startswith("LIBARCHIVE.xattr."):
                name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
                try:
                    xattrs[name] = base64.b64decode(value + "=" * (-len(value) % 4))
                except ValueError:
                    raise ArchiveError(f"{self.where}: entry {member.name!r} has a LIBARCHIVE.xattr value that is "
                                       "not base64") from None
        for name in [n for n in xattrs if n and not n.startswith(XATTR_NAMESPACES) and b"\0" not in n]:
            del xattrs[name]  # Linux has no such namespace: containerd's applier leaves these out too
            if name not in self.dropped and len(self.dropped) < 16:
                self.dropped.add(name)
                log.warning("%s: xattr %r (of %r, and any other entry) is in no namespace Linux has: left out",
                            self.where, name.decode("utf-8", "backslashreplace"), member.name)
        self.xattr_bytes += sum(len(k) + len(v) for k, v in xattrs.items())
        if self.xattr_bytes > MAX_XATTR_BYTES:
            raise ArchiveError(f"{self.where} has more than {MAX_XATTR_BYTES >> 20} MiB of xattrs: "
                               "refusing the archive")
        return xattrs


def _update_directory(tree: Tree, old: ImageNode, new: ImageNode) -> None:
    tree.implicit.pop(id(old), None)
    old.mode, old.uid, old.gid, old.mtime, old.mtime_nsec = new.mode, new.uid, new.gid, new.mtime, new.mtime_nsec
    old.xattrs.update(new.xattrs)


def _name(part: str) -> bytes:
    return part.encode("utf-8", "surrogateescape")
