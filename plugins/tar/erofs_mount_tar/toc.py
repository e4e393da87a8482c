"""Layers that carry their own table of contents (zstd:chunked, eStargz): the tree and every chunk, no index pass.

A zstd:chunked layer (written by podman, buildah and skopeo) is an
ordinary tar+zstd blob whose files' payloads sit in zstd frames of their
own, split into chunks, followed by a skippable frame that holds the TOC:
JSON listing every entry (``reg``, ``dir``, ``symlink``, ``hardlink``,
``char``, ``block``, ``fifo``) with its attributes, and for a regular file
the blob range of its payload (``offset``, ``endOffset``) and the sha256
of its bytes; a file of several chunks is its ``reg`` entry (chunk 0)
followed by ``chunk`` entries, each with its uncompressed ``chunkOffset``
and ``chunkSize``, the blob ``offset`` of its frame and the sha256 of its
bytes (``chunkDigest``). The layer descriptor's annotations give the TOC's
position and the sha256 of its compressed bytes, so a TOC is checked
against the pinned manifest before a field of it is read
(``erofs_mount_core`` and c/storage: ``pkg/chunked``).

An eStargz layer (stargz-snapshotter's ``docs/estargz.md``) is a tar+gzip
blob of gzip members, each file's payload (each chunk of it) starting one;
its TOC, of the same entries, is the tar entry ``stargz.index.json`` in a
member of its own, placed by a 51-byte footer, and the annotation
``containerd.io/snapshot/stargz/toc.digest`` is the sha256 of its JSON. A
chunk is its member (``offset``) inflated from ``innerOffset``.

The tree is made by the same reader as an archive's (``entries``), so a
TOC's names, modes, owners, times, xattrs, hardlinks and whiteouts get
the same checks. Its files' bytes are laid end to end in a virtual stream,
which ``chunked_files.ChunkedFiles`` serves: each chunk fetched with a range
request, inflated and checked against its sha256 before a byte of it is
served.

A TOC that lacks what the EROFS image needs (a regular file's digest or
position, chunks that do not add up, a chunk larger than ``MAX_CHUNK``)
raises ``TocLacks``, naming what: the layer is then indexed as any tar
layer, never guessed at.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import calendar
import functools
import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any

import attrs

from erofs_mount_core import (
    ImageLayout,
    Source,
    SourceError,
)

from . import packed_tree
from .chunked_files import MAX_CHUNK, Chunk, ChunkedFiles
from .entries import Tree, tree_of
from .streams import ArchiveError

MAX_TOC = 150 << 20  # the uncompressed TOC: c/storage's own bound (pkg/chunked: maxTocSize)
ANNOTATIONS = {  # (position, checksum) keys of the layer descriptor: c/storage's current and older spelling
    "io.github.containers.zstd-chunked": ("io.github.containers.zstd-chunked.manifest-position",
                                          "io.github.containers.zstd-chunked.manifest-checksum"),
    "io.containers.zstd-chunked": ("io.containers.zstd-chunked.manifest-position",
                                   "io.containers.zstd-chunked.manifest-checksum"),
}
_TYPES = {"reg": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
          "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
_RFC3339 = re.compile(r"(-?\d{4,})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")
_COUNT_BOUND = 1 << 63
TOC_DIR = "tar-toc"  # where what a TOC gave is kept (``toc_cache``)


class TocLacks(ArchiveError):
    """The TOC does not give what the image needs: the layer is indexed instead (the message says what)."""


ZSTD_CHUNKED, ESTARGZ = "zstd:chunked", "estargz"
ESTARGZ_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
FOOTER = 51  # eStargz's footer: an empty gzip member whose extra field holds the TOC's offset
TOC_NAME = "stargz.index.json"


@attrs.frozen
class TocPosition:
    """Where a layer's TOC is and what it must hash to, from the layer descriptor's annotations.

    zstd:chunked: the TOC's compressed bytes are ``blob[offset:offset+length]`` and ``checksum`` is
    their sha256. eStargz: the footer gives the offset, and ``checksum`` is the sha256 of the TOC's JSON.
    """

    checksum: str
    offset: int = 0
    length: int = 0
    raw_length: int = 0
    kind: str = ZSTD_CHUNKED

    @classmethod
    def of(cls, annotations: Any, blob_size: int, media_type: str) -> TocPosition | None:
        """The position the annotations give a layer of ``media_type``, None when they give none;
        ArchiveError when they are bad."""
        if not isinstance(annotations, Mapping):
            return None
        if media_type.endswith(("gzip", "+gzip")):
            digest = annotations.get(ESTARGZ_DIGEST)
            if digest is None:
                return None
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise ArchiveError(f"its {ESTARGZ_DIGEST} annotation is not a sha256")
            if blob_size <= FOOTER:
                raise ArchiveError(f"it is {blob_size} bytes: no eStargz footer fits")
            return cls(digest, kind=ESTARGZ)
        if not media_type.endswith("+zstd"):
            return None
        for position_key, checksum_key in ANNOTATIONS.values():
            position, checksum = annotations.get(position_key), annotations.get(checksum_key)
            if position is None and checksum is None:
                continue
            if not isinstance(position, str) or not isinstance(checksum, str) or not _SHA256.fullmatch(checksum):
                raise ArchiveError(f"its {position_key} and {checksum_key} annotations are not a position and a "
                                   "sha256")
            fields = position.split(":")
            if len(fields) != 4 or not all(f.isdigit() and len(f) <= 19 for f in fields) or fields[3] != "1":
                raise ArchiveError(f"its {position_key} annotation ({position[:80]!r}) is not "
                                   "OFFSET:LENGTH:UNCOMPRESSED:1")
            offset, length, raw = (int(f) for f in fields[:3])
            if not 0 < length <= MAX_TOC or offset + length > blob_size or not 0 < raw <= MAX_TOC:
                raise ArchiveError(f"its TOC ({length} bytes at {offset}, {raw} uncompressed) does not fit the "
                                   f"blob's {blob_size} bytes or the {MAX_TOC >> 20} MiB a TOC may have")
            return cls(checksum, offset, length, raw)
        return None

    def to_state(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> TocPosition:
        return cls(str(state["checksum"]), int(state.get("offset", 0)), int(state.get("length", 0)),
                   int(state.get("raw_length", 0)), str(state.get("kind", ZSTD_CHUNKED)))


@attrs.frozen
class FoundToc:
    """A TOC's pinned bytes as fetched (zstd:chunked: compressed; eStargz: its JSON), and where it starts in
    the blob: every chunk lies before it."""

    pinned: bytes = attrs.field(repr=False)
    toc_offset: int


@attrs.frozen
class TocIndex:
    """What a TOC gives: the layer's tree (packed, as an archive index keeps it) and its files' chunks."""

    tree: bytes = attrs.field(repr=False)
    chunks: tuple[Chunk, ...] = attrs.field(repr=False)
    stream_size: int
    entries: int
    codec: str = "zstd"
    """what a chunk's blob bytes are: zstd frames, or a gzip member (eStargz)"""
    fresh: list[Tree] = attrs.field(factory=list, eq=False, repr=False)
    """The tree itself, when the TOC was just read: handed to the first ``read_tree`` (not loaded again)."""

    def read_tree(self, base: int = 0) -> Tree:
        """A copy of the tree of its own, its files' bytes placed ``base`` bytes into a backing stream."""
        if self.fresh:
            return packed_tree.moved(self.fresh.pop(), base)
        try:
            return packed_tree.load(self.tree, base)
        except ValueError as exc:  # (a kept index's tree is checked here, when first used: see ``toc_cache``)
            raise SourceError(f"tar: a TOC's kept index holds a tree this version refuses ({exc}); remove "
                              f"the cache's {TOC_DIR}/ and the TOC is read again") from None

    def image_layout(self) -> ImageLayout:
        return ImageLayout.of(self.read_tree().root)

    def open_stream(self, blob: Source, cache_bytes: int, what: str, *,
                    rejected: Callable[[str], object] | None = None) -> ChunkedFiles:
        return ChunkedFiles(blob, self.chunks, self.stream_size, cache_bytes, what, rejected, codec=self.codec)


def fetch_toc(position: TocPosition, read: Callable[[int, int], bytes], blob_size: int, where: str) -> FoundToc:
    """The TOC's pinned bytes, read from the blob with ``read(length, offset)`` (not yet checked)."""
    if position.kind == ZSTD_CHUNKED:
        return FoundToc(bytes(read(position.length, position.offset)), position.offset)
    footer = bytes(read(FOOTER, blob_size - FOOTER))
    if footer[:4] != b"\x1f\x8b\x08\x04" or footer[12:14] != b"SG" or footer[32:38] != b"STARGZ" or \
            not all(c in b"0123456789abcdef" for c in footer[16:32]):
        raise TocLacks(f"{where}: it has no eStargz footer")
    offset = int(footer[16:32], 16)
    if not 0 <= offset < blob_size - FOOTER or blob_size - FOOTER - offset > MAX_TOC:
        raise TocLacks(f"{where}: its eStargz footer places the TOC at {offset}, outside the blob or too large")
    member = bytes(read(blob_size - FOOTER - offset, offset))
    inflater = zlib.decompressobj(wbits=31)
    try:
        tar = inflater.decompress(member, MAX_TOC + (64 << 10))
    except zlib.error as exc:
        raise TocLacks(f"{where}: its eStargz TOC does not inflate: {exc}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
            entry = archive.next()
            if entry is None or entry.name != TOC_NAME or not entry.isreg() or entry.size > MAX_TOC:
                raise TocLacks(f"{where}: its eStargz TOC member holds no {TOC_NAME}")
            extracted = archive.extractfile(entry)
            assert extracted is not None
            return FoundToc(extracted.read(), offset)
    except (tarfile.TarError, EOFError):
        raise TocLacks(f"{where}: its eStargz TOC member is not a tar entry") from None


def load_toc(found: FoundToc, position: TocPosition, where: str) -> TocIndex:
    """The TOC's index: its bytes checked against ``position.checksum`` first (SourceError: other bytes than
    the manifest pins), then read; TocLacks or ArchiveError when it cannot give the image."""
    if "sha256:" + hashlib.sha256(found.pinned).hexdigest() != position.checksum:
        raise SourceError(f"{where}: its TOC's bytes are not the ones its manifest pins ({position.checksum})",
                          transient=True)
    raw = found.pinned if position.kind == ESTARGZ else _inflated(found.pinned, position, where)
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise ArchiveError(f"{where}: its TOC is not JSON") from None
    if not isinstance(document, dict) or document.get("version") != 1 or not isinstance(document.get("entries"), list):
        raise TocLacks(f"{where}: its TOC is not version 1 with a list of entries")
    return _index(document["entries"], found.toc_offset, where, position.kind)


def _inflated(compressed: bytes, position: TocPosition, where: str) -> bytes:
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed), read_across_frames=True)
        raw = reader.read(position.raw_length + 1)
    except zstandard.ZstdError as exc:
        raise ArchiveError(f"{where}: its TOC does not inflate: {exc}") from None
    if len(raw) != position.raw_length:
        raise ArchiveError(f"{where}: its TOC inflates to {len(raw)} bytes, not the {position.raw_length} "
                           "its annotation says")
    return raw


def _index(entries: list[Any], toc_end: int, where: str, kind: str) -> TocIndex:
    chunks: list[Chunk] = []
    chunks_of = _zstd_chunks_of if kind == ZSTD_CHUNKED else _estargz_chunks_of
    members = list(_members(entries, chunks, lambda pending, base: chunks_of(pending, base, chunks, toc_end, where),
                            where))
    tree = tree_of(members, where)
    if kind == ESTARGZ:
        chunks = _members_ended(chunks, toc_end, where)
    stream_size = chunks[-1].start + chunks[-1].size if chunks else 0
    return TocIndex(packed_tree.dump(tree), tuple(chunks), stream_size, tree.entries,
                    "zstd" if kind == ZSTD_CHUNKED else "gzip", fresh=[tree])


def _members(entries: list[Any], chunks: list[Chunk], chunks_of: Callable[[list[dict[str, Any]], int], int],
             where: str) -> Iterator[tarfile.TarInfo]:
    """Each entry as the TarInfo an archive would have held, its payload's chunks appended to ``chunks``."""
    base = 0
    pending: list[dict[str, Any]] = []  # the chunk entries of the file before, and that file
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ArchiveError(f"{where}: TOC entry {number} is not a JSON object")
        kind = entry.get("type")
        if kind == "chunk":
            if not pending or entry.get("name") != pending[0].get("name"):
                raise TocLacks(f"{where}: TOC entry {number} is a chunk of no file before it")
            pending.append(entry)
            continue
        if pending:
            base = chunks_of(pending, base)
            pending = []
        member = _member(entry, number, where)
        if member.isreg() and member.size:
            member.offset_data = base
            pending = [entry]
        yield member
    if pending:
        chunks_of(pending, base)


def _member(entry: dict[str, Any], number: int, where: str) -> tarfile.TarInfo:
    kind, name = entry.get("type"), entry.get("name")
    if not isinstance(name, str) or not name:
        raise ArchiveError(f"{where}: TOC entry {number} has no name")
    if kind not in _TYPES:
        raise ArchiveError(f"{where}: TOC entry {name[:200]!r} has a type ({str(kind)[:20]!r}) no filesystem holds")
    member = tarfile.TarInfo(name)
    member.type = _TYPES[kind]
    member.mode = _number(entry, "mode", name, where)
    member.uid, member.gid = _number(entry, "uid", name, where), _number(entry, "gid", name, where)
    member.size = _number(entry, "size", name, where) if kind == "reg" else 0
    member.devmajor, member.devminor = _number(entry, "devMajor", name, where), _number(entry, "devMinor", name, where)
    link = entry.get("linkName", "")
    if not isinstance(link, str):
        raise ArchiveError(f"{where}: TOC entry {name[:200]!r} has a linkName that is not text")
    member.linkname = link
    member.pax_headers = {"mtime": _seconds(entry.get("modtime"), name, where)}
    xattrs = entry.get("xattrs") or {}
    if not isinstance(xattrs, dict):
        raise ArchiveError(f"{where}: TOC entry {name[:200]!r} has xattrs that are not an object")
    for key, value in xattrs.items():
        try:
            decoded = base64.b64decode(value, validate=True) if isinstance(value, str) else None
        except (binascii.Error, ValueError):
            decoded = None
        if decoded is None:
            raise ArchiveError(f"{where}: TOC entry {name[:200]!r} has an xattr value that is not base64")
        member.pax_headers[f"SCHILY.xattr.{key}"] = decoded.decode("utf-8", "surrogateescape")
    return member


def _zstd_chunks_of(entries: list[dict[str, Any]], base: int, chunks: list[Chunk], toc_end: int, where: str) -> int:
    """The chunks of one regular file (its ``reg`` entry, then its ``chunk`` entries), checked to add up to
    its size and to lie in order inside the blob; the next file's base."""
    file, name = entries[0], str(entries[0]["name"])[:200]
    size = int(file["size"])
    end_offset = file.get("endOffset")
    digest = file.get("digest")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise TocLacks(f"{where}: the TOC gives no sha256 for {name!r}")
    if not _is_count(file.get("offset")) or not _is_count(end_offset):
        raise TocLacks(f"{where}: the TOC gives no position for {name!r}")
    starts = [int(file["offset"])] + [e.get("offset") for e in entries[1:]]
    into = 0
    for i, entry in enumerate(entries):
        chunk_size = entry.get("chunkSize", size if len(entries) == 1 else None)
        chunk_digest = entry.get("chunkDigest", digest if len(entries) == 1 else None)
        zeros = entry.get("chunkType") == "zeros"
        if i and entry.get("chunkOffset") != into:
            raise TocLacks(f"{where}: the chunks of {name!r} do not follow each other")
        if not _is_count(chunk_size) or not chunk_size or not _is_count(starts[i]):
            raise TocLacks(f"{where}: a chunk of {name!r} has no size or position")
        if chunk_size > MAX_CHUNK:
            raise TocLacks(f"{where}: {name!r} has a chunk of {chunk_size:,} bytes (more than {MAX_CHUNK >> 20} MiB)")
        if not isinstance(chunk_digest, str) or not _SHA256.fullmatch(chunk_digest):
            raise TocLacks(f"{where}: a chunk of {name!r} has no sha256")
        blob_end = int(end_offset) if i == len(entries) - 1 else starts[i + 1]
        if not _is_count(blob_end) or not (starts[i] <= blob_end <= toc_end) or (blob_end == starts[i] and not zeros):
            raise ArchiveError(f"{where}: the chunks of {name!r} are not in order inside the blob")
        if blob_end - starts[i] > chunk_size + (chunk_size >> 7) + (64 << 10):
            raise ArchiveError(f"{where}: a chunk of {name!r} takes more blob bytes than zstd ever needs")
        chunks.append(Chunk(base + into, chunk_size, starts[i], blob_end, bytes.fromhex(chunk_digest[7:]), zeros))
        into += chunk_size
    if into != size:
        raise TocLacks(f"{where}: the chunks of {name!r} add up to {into:,} bytes, not its {size:,}")
    return base + size


def _estargz_chunks_of(entries: list[dict[str, Any]], base: int, chunks: list[Chunk], toc_end: int,
                       where: str) -> int:
    """As ``_zstd_chunks_of``, for eStargz: each chunk names the gzip member it starts (``offset``) and where
    in what the member inflates to (``innerOffset``); its member ends where the next one starts, found
    once every chunk is known (``_members_ended``)."""
    file, name = entries[0], str(entries[0]["name"])[:200]
    size = int(file["size"])
    digest = file.get("digest")
    into = 0
    for i, entry in enumerate(entries):
        last = i == len(entries) - 1
        chunk_size = entry.get("chunkSize") or (size - into if last else None)  # 0 or none: to the file's end
        chunk_digest = entry.get("chunkDigest", digest if len(entries) == 1 else None)
        inner = entry.get("innerOffset", 0)
        if entry.get("chunkOffset", 0) != into:
            raise TocLacks(f"{where}: the chunks of {name!r} do not follow each other")
        if not _is_count(chunk_size) or not chunk_size or not _is_count(entry.get("offset")) or not _is_count(inner):
            raise TocLacks(f"{where}: a chunk of {name!r} has no size or position")
        if inner + chunk_size > MAX_CHUNK:
            raise TocLacks(f"{where}: {name!r} has a chunk that ends {inner + chunk_size:,} bytes into its gzip "
                           f"member (more than {MAX_CHUNK >> 20} MiB)")
        if not isinstance(chunk_digest, str) or not _SHA256.fullmatch(chunk_digest):
            raise TocLacks(f"{where}: the TOC gives no sha256 for a chunk of {name!r}")
        if not entry["offset"] < toc_end:
            raise ArchiveError(f"{where}: a chunk of {name!r} lies outside the blob's files")
        chunks.append(Chunk(base + into, chunk_size, entry["offset"], toc_end, bytes.fromhex(chunk_digest[7:]),
                            inner_offset=inner))
        into += chunk_size
    if into != size:
        raise TocLacks(f"{where}: the chunks of {name!r} add up to {into:,} bytes, not its {size:,}")
    return base + size


def _members_ended(chunks: list[Chunk], toc_end: int, where: str) -> list[Chunk]:
    """Each eStargz chunk with the end of its gzip member: the next member's start, or the TOC's."""
    starts = sorted({c.blob_start for c in chunks} | {toc_end})
    ended = []
    for chunk in chunks:
        end = starts[bisect.bisect_right(starts, chunk.blob_start)]
        if end - chunk.blob_start > MAX_CHUNK + (MAX_CHUNK >> 7) + (64 << 10):
            raise TocLacks(f"{where}: a gzip member at byte {chunk.blob_start} runs {end - chunk.blob_start:,} "
                           f"bytes (more than a chunk of {MAX_CHUNK >> 20} MiB needs)")
        ended.append(attrs.evolve(chunk, blob_end=end))
    return ended


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < _COUNT_BOUND  # (not a bool: its type is bool)


def _number(entry: dict[str, Any], key: str, name: str, where: str) -> int:
    value = entry.get(key, 0)
    if not _is_count(value):
        raise ArchiveError(f"{where}: TOC entry {name[:200]!r} has a {key} that is not a count")
    return int(value)


def _seconds(text: Any, name: str, where: str) -> str:
    """An RFC 3339 time as PAX's decimal seconds (exact to the nanosecond); absent is 0."""
    if text is None:
        return "0"
    seconds = _pax_seconds(text) if isinstance(text, str) else None
    if seconds is None:
        raise ArchiveError(f"{where}: TOC entry {name[:200]!r} has a modtime that is not an RFC 3339 time in range")
    return seconds


@functools.lru_cache(maxsize=4096)
def _pax_seconds(text: str) -> str | None:
    """``text`` as PAX's decimal seconds; None when it is no RFC 3339 time or out of range (a layer's files
    mostly share a few times: each is parsed once)."""
    found = _RFC3339.fullmatch(text)
    if found is None:
        return None
    year, month, day, hour, minute, second = (int(found.group(i)) for i in range(1, 7))
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    zone = found.group(8)
    if zone not in ("Z", "z"):
        sign = -1 if zone[0] == "+" else 1
        seconds += sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    fraction = found.group(7) or "0"
    return str(Decimal(seconds) + Decimal(f"0.{fraction}"))  # -1 and .5 are -0.5: the fraction adds
