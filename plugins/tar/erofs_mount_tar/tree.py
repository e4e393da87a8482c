"""A tar archive's members -> a tree of ImageNodes whose files point at their bytes in the archive.

Python's tarfile reads the headers (ustar, GNU long names and base-256
numbers, PAX); this module decides what they mean for a filesystem:

- names are relative to the root: ``./x``, ``/x`` and ``x/`` are ``x``;
  a ``..`` component refuses the archive, naming the entry;
- directories that only appear as a prefix are made (0755, root, time 0)
  and noted as implicit: a layer merged over another leaves such a
  directory's attributes to the layer below;
- a later entry wins over an earlier one of the same name (a directory
  entry over a directory keeps its contents);
- a hardlink is the same inode as its target, which must come before it;
- PAX ``SCHILY.xattr.NAME`` and ``LIBARCHIVE.xattr.NAME`` become xattrs,
  PAX ``mtime`` keeps its nanoseconds;
- OCI whiteouts are kept as overlayfs reads them: ``.wh.NAME`` is a
  character device 0/0 named NAME, ``.wh..wh..opq`` marks its directory
  with ``trusted.overlay.opaque=y``.
"""

from __future__ import annotations

import base64
import stat
import tarfile
import urllib.parse
from decimal import Decimal, InvalidOperation
from typing import BinaryIO

import attrs

from erofs_mount_core import ImageNode

from .streams import ArchiveError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
IMPLICIT_DIR_MODE = stat.S_IFDIR | 0o755


@attrs.define
class Tree:
    """A layer's tree, and which of its directories the archive never named (by ``id()``; the
    nodes are held, so that an id is never reused while the tree lives)."""

    root: ImageNode
    implicit: dict[int, ImageNode] = attrs.Factory(dict)

    def is_implicit(self, node: ImageNode) -> bool:
        return id(node) in self.implicit


def read_tree(stream: BinaryIO, where: str) -> Tree:
    """The tree of the uncompressed tar ``stream``, read in order (it need only seek forward);
    ``where`` names it in errors."""
    root = ImageNode(mode=IMPLICIT_DIR_MODE)
    tree = Tree(root, {id(root): root})
    by_path: dict[tuple[str, ...], ImageNode] = {(): root}
    try:
        with tarfile.open(fileobj=stream, mode="r:", errors="surrogateescape") as tar:
            for member in tar:
                _add(member, tree, by_path, where)
                tar.members.clear()  # the tree holds what is needed; tarfile need not hold every header too
    except tarfile.ReadError as exc:
        if "unexpected end" in str(exc):
            raise ArchiveError(f"{where} ends in the middle of an entry: it is truncated") from None
        raise ArchiveError(f"{where} is not a tar archive that can be read: {exc}") from None
    except tarfile.TarError as exc:
        raise ArchiveError(f"{where} is not a tar archive that can be read: {exc}") from None
    except EOFError:
        raise ArchiveError(f"{where} ends in the middle of an entry: it is truncated") from None
    return tree


def _parts(name: str, where: str, entry: str) -> tuple[str, ...]:
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"{where}: entry {entry!r} would land outside the root ('..'): refusing the archive")
    return parts


def _directory(path: tuple[str, ...], tree: Tree, by_path: dict[tuple[str, ...], ImageNode]) -> ImageNode:
    """The directory at ``path``, made (with its parents) if the archive has not named it yet."""
    node = by_path.get(path)
    if node is not None and node.kind == stat.S_IFDIR:
        return node
    parent = _directory(path[:-1], tree, by_path)
    node = ImageNode(mode=IMPLICIT_DIR_MODE)
    tree.implicit[id(node)] = node
    parent.children[_name(path[-1])] = node
    by_path[path] = node
    return node


def _name(part: str) -> bytes:
    return part.encode("utf-8", "surrogateescape")


def _add(member: tarfile.TarInfo, tree: Tree, by_path: dict[tuple[str, ...], ImageNode], where: str) -> None:
    path = _parts(member.name, where, member.name)
    if member.issparse():
        raise ArchiveError(f"{where}: entry {member.name!r} is a sparse file, which is not supported yet")
    if path and path[-1] == OPAQUE:
        directory = _directory(path[:-1], tree, by_path)
        directory.xattrs[b"trusted.overlay.opaque"] = b"y"
        return
    if path and path[-1].startswith(WHITEOUT):
        path = path[:-1] + (path[-1][len(WHITEOUT):],)
        node = ImageNode(mode=stat.S_IFCHR, rdev=(0, 0), uid=member.uid, gid=member.gid)
    elif member.islnk():
        target = _parts(member.linkname, where, member.name)
        node = by_path.get(target)
        if node is None or node.kind == stat.S_IFDIR:
            raise ArchiveError(f"{where}: entry {member.name!r} is a hardlink to {member.linkname!r}, "
                               "which the archive does not hold before it: refusing the archive")
    else:
        node = _node(member, where)
    if not path:  # "." itself: the root's own attributes
        if node.kind == stat.S_IFDIR:
            _update_directory(tree, tree.root, node)
        return
    parent = _directory(path[:-1], tree, by_path)
    old = by_path.get(path)
    if old is not None and old.kind == stat.S_IFDIR and node.kind == stat.S_IFDIR:
        _update_directory(tree, old, node)  # a directory named again: new attributes, same contents
        return
    if old is not None and old.kind == stat.S_IFDIR:
        for key in [k for k in by_path if k[:len(path)] == path]:
            del by_path[key]  # the directory and everything under it are replaced
    parent.children[_name(path[-1])] = node
    by_path[path] = node


def _update_directory(tree: Tree, old: ImageNode, new: ImageNode) -> None:
    tree.implicit.pop(id(old), None)
    old.mode, old.uid, old.gid, old.mtime, old.mtime_nsec = new.mode, new.uid, new.gid, new.mtime, new.mtime_nsec
    old.xattrs.update(new.xattrs)


def _node(member: tarfile.TarInfo, where: str) -> ImageNode:
    seconds, nsec = _mtime(member)
    node = ImageNode(mode=stat.S_IMODE(member.mode), uid=member.uid, gid=member.gid, mtime=seconds, mtime_nsec=nsec,
                     xattrs=_xattrs(member, where))
    if member.isreg():
        node.mode |= stat.S_IFREG
        node.size, node.data_offset = member.size, member.offset_data
    elif member.isdir():
        node.mode |= stat.S_IFDIR
    elif member.issym():
        node.mode = stat.S_IFLNK | 0o777  # as Linux makes every symlink, whatever the archive says
        node.target = member.linkname.encode("utf-8", "surrogateescape")
        if not node.target:
            raise ArchiveError(f"{where}: symlink {member.name!r} has no target")
    elif member.ischr() or member.isblk():
        node.mode |= stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        node.rdev = (member.devmajor, member.devminor)
    elif member.isfifo():
        node.mode |= stat.S_IFIFO
    else:
        raise ArchiveError(f"{where}: entry {member.name!r} has a type ({member.type!r}) no filesystem holds")
    return node


def _mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    """Seconds and nanoseconds: PAX's decimal text, exactly, when the archive has it."""
    text = member.pax_headers.get("mtime")
    if text:
        try:
            value = Decimal(text)
            seconds = int(value.to_integral_value(rounding="ROUND_FLOOR"))
            return seconds, int((value - seconds) * 1_000_000_000)
        except (InvalidOperation, ValueError, OverflowError):
            pass
    return int(member.mtime), 0


def _xattrs(member: tarfile.TarInfo, where: str) -> dict[bytes, bytes]:
    xattrs = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            xattrs[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            try:
                xattrs[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                raise ArchiveError(f"{where}: entry {member.name!r} has a LIBARCHIVE.xattr value that is not "
                                   "base64") from None
    return xattrs
