"""A table of contents compared with its layer's own stream: what a mount by TOC has taken on the TOC's word.

A TOC is pinned by the manifest, and each chunk served is checked against
the TOC's sha256; but a tar stream is what every other tool unpacks, and
a layer whose TOC says other things than its stream (a setuid bit, a file
that the stream does not hold, other bytes) shows one tree to erofs-mount
and another to docker. ``differences`` compares them entry by entry: every
path, its type, mode, owner, times, size, link target, device and xattrs,
which names are one inode, and every chunk's bytes at its file's place in
the stream.
"""

from __future__ import annotations

import bisect
import hashlib
import stat
from collections.abc import Iterator

from erofs_mount_core import ImageNode, Source

from .entries import Tree
from .index import ArchiveIndex
from .toc import TocIndex

#: what an eStargz stream holds beside the entries its TOC lists: the TOC itself
TOC_MEMBERS = {"gzip": {b"stargz.index.json"}, "zstd": set()}
READ = 4 << 20  # the stream is read in order, this much at a time
SAID = 3  # differences named in the line, at most


def differences(toc: TocIndex, measured: ArchiveIndex, stream: Source) -> list[str]:
    """What of ``toc`` the layer's stream does not bear out, at most ``SAID`` things named; empty when it
    bears all of it out. ``measured``: the stream's own index; ``stream``: the stream, read once, in order."""
    said: list[str] = []
    files: list[tuple[int, int, int]] = []  # (where its bytes start in the stream, in the TOC's files, size)
    for problem in _entries(toc.read_tree(), measured.read_tree(), TOC_MEMBERS[toc.codec], files):
        said.append(problem)
        if len(said) == SAID:
            return said
    return said + _contents(toc, files, stream)


def _entries(claimed: Tree, measured: Tree, beside: set[bytes],
             files: list[tuple[int, int, int]]) -> Iterator[str]:
    inodes: dict[int, int] = {}  # an inode's id in the TOC -> in the stream, and back: hardlinks alike
    back: dict[int, int] = {}
    stack: list[tuple[bytes, ImageNode, ImageNode]] = [(b"", claimed.root, measured.root)]
    while stack:
        path, ours, theirs = stack.pop()
        name = path.decode(errors="replace") or "/"
        if inodes.get(id(ours), id(theirs)) != id(theirs) or back.get(id(theirs), id(ours)) != id(ours):
            yield f"{name}: other hardlinks in the stream"
            continue
        if id(ours) in inodes:  # another name of an inode compared already
            continue
        inodes[id(ours)], back[id(theirs)] = id(theirs), id(ours)
        if _attributes(ours) != _attributes(theirs):
            yield f"{name}: {_which(ours, theirs)}"
            continue
        if stat.S_ISREG(ours.mode) and ours.size:
            files.append((theirs.data_offset, ours.data_offset, ours.size))
        if not stat.S_ISDIR(ours.mode):
            continue
        names = set(ours.children)
        others = set(theirs.children) - (beside if not path else set())
        for missing in sorted(names ^ others)[:SAID]:
            yield f"{(path + b'/' + missing).decode(errors='replace')}: " + \
                ("not in the stream" if missing in names else "in the stream, not in the TOC")
        for child in sorted(names & others):
            stack.append((path + b"/" + child, ours.children[child], theirs.children[child]))


def _attributes(node: ImageNode) -> tuple[object, ...]:
    return (node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.size if stat.S_ISREG(node.mode) else 0,
            node.target, node.rdev, sorted(node.xattrs.items()))


def _which(ours: ImageNode, theirs: ImageNode) -> str:
    names = ("mode", "owner", "owner", "mtime", "mtime", "size", "link target", "device", "xattrs")
    found = dict.fromkeys(n for n, a, b in zip(names, _attributes(ours), _attributes(theirs), strict=True) if a != b)
    return ", ".join(found) + " differ"


def _contents(toc: TocIndex, files: list[tuple[int, int, int]], stream: Source) -> list[str]:
    """Every chunk of every file, hashed from the stream in the order the stream holds them."""
    starts = [chunk.start for chunk in toc.chunks]
    ranges = []  # (where in the stream, size, the chunk)
    for at, virtual, size in files:
        first = bisect.bisect_left(starts, virtual)
        for chunk in toc.chunks[first:bisect.bisect_left(starts, virtual + size)]:
            ranges.append((at + chunk.start - virtual, chunk.size, chunk))
    covered = sum(size for _, _, size in files)
    if sum(size for _, size, _ in ranges) != covered:
        return ["its chunks do not cover its files"]
    ranges.sort(key=lambda r: r[0])
    reader = _InOrder(stream)
    wrong = 0
    for at, size, chunk in ranges:
        digest = hashlib.sha256()
        for piece in reader.read(at, size):
            digest.update(piece)
        expected = hashlib.sha256(bytes(size)).digest() if chunk.zeros else chunk.sha256
        wrong += digest.digest() != expected
    return [f"{wrong} chunk(s) are other bytes in the stream"] if wrong else []


class _InOrder:
    """Reads of a stream at increasing offsets, each continuing where the last one stopped (a decoder that is
    read in order never goes back to a checkpoint)."""

    def __init__(self, stream: Source) -> None:
        self.stream, self.pos = stream, 0

    def read(self, at: int, size: int) -> Iterator[bytes | memoryview]:
        if at < self.pos:
            raise ValueError("chunks overlap in the stream")
        while self.pos < at:  # the tar headers between files: read and passed over
            self.pos += len(self.stream.pread(min(READ, at - self.pos), self.pos))
        end = at + size
        while self.pos < end:
            piece = self.stream.pread(min(READ, end - self.pos), self.pos)
            self.pos += len(piece)
            yield piece
