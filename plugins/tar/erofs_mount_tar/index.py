"""An archive's index: made in one pass over it, kept in the cache under its digest, loaded by every reattach.

The index holds all a daemon needs to serve the archive without reading it
first: the synthesized image's layout (metadata and block map), the sha256
of every span of the uncompressed stream, and what random access into the
compressed stream needs (gzip checkpoints, zstd frames). It is kept in
``$EROFS_MOUNT_CACHE_DIR/tar-index/<sha256 of the archive>.idx``; whoever
knows an archive by another key (a local file by its identity) may note
its sha256 under that key (``alias_path``) to find the index again without
reading the archive. Archives are any ``Source``: a local file, a blob.

The file format (version 2, little-endian)::

    magic "erofs-mount-tidx" | version u32 | payload length u64 | sha256(payload)
    payload: sections, each  name length u8 | name | length u64 | bytes
      meta     JSON: compression, archive sha256 and size, stream size and sha256 (an OCI
               layer's diff_id), span size, frames
      hashes   the span hashes, 32 bytes each
      layout   zlib(ImageLayout.to_bytes()): kept when asked for, and in a published index (a layer mounted alone)
      tree     zlib(packed_tree.dump(tree)): what merging the layers of an image needs
      gzip     zlib(rapidgzip's checkpoint export), for gzip archives

An index that is missing, of another version, truncated or whose checksum
fails is built again from the archive; one that does not describe the
archive it is asked for is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from erofs_mount_core import (
    ImageLayout,
    Source,
    SourceError,
    SpanHasher,
    SpanHashes,
    cache_directory,
    open_cache_file,
    write_cache_file,
)

from . import packed_tree, streams
from .entries import Tree, read_tree
from .progress import Meter, Progress

MAGIC = b"erofs-mount-tidx"
VERSION = 2
_HEADER = struct.Struct("<16sIQ32s")
SPAN_SIZE = 1 << 20
HASH_SIZE = 32  # a span's sha256
MAX_INDEX = 1 << 30  # no archive's index is near this; a larger file is not one of ours
INDEX_DIR, UNPACKED_DIR = "tar-index", "tar-unpacked"


@attrs.frozen
class ArchiveIndex:
    compression: str
    archive_sha256: str
    archive_size: int
    stream_size: int
    stream_sha256: str
    spans: SpanHashes
    layout: ImageLayout | None
    """The archive's own image, if the index keeps it (``image_layout()`` makes it otherwise)."""
    tree: bytes = attrs.field(repr=False)
    """``packed_tree.dump`` of the archive's tree."""
    fresh: list[Tree] = attrs.field(factory=list, eq=False, repr=False)
    """The tree itself, when this index was just built: handed to the first ``read_tree`` (not loaded again)."""
    gzip_checkpoints: bytes = b""
    zstd_frames: tuple[streams.Frame, ...] = ()

    @property
    def unpacked(self) -> bool:
        return self.compression == "zstd" and not self.zstd_frames

    def image_layout(self) -> ImageLayout:
        """The archive's own image (whiteouts in overlayfs form), kept or made from the tree."""
        return self.layout if self.layout is not None else ImageLayout.of(self.read_tree().root)

    def with_own_layout(self) -> ArchiveIndex:
        """This index keeping the archive's own image (what ``index push`` publishes for hosts that mount the
        layer alone). A tree just built is read, not handed over: the mount that publishes merges it next."""
        if self.layout is not None:
            return self
        tree = self.fresh[0] if self.fresh else packed_tree.load(self.tree)
        return attrs.evolve(self, layout=ImageLayout.of(tree.root), fresh=[])

    def read_tree(self, base: int = 0) -> Tree:
        """A copy of the archive's tree of its own, its files' bytes placed ``base`` bytes into a backing stream."""
        if self.fresh:
            return packed_tree.moved(self.fresh.pop(), base)
        try:
            return packed_tree.load(self.tree, base)
        except ValueError as exc:  # (a cached index's tree is checked here, when first used: see ``load``)
            raise SourceError(f"tar: the index of archive sha256:{self.archive_sha256} holds a tree this version "
                              f"refuses ({exc}); if it is cached, remove {_index_path(self.archive_sha256)}") from None

    def open_stream(self, archive: Source) -> Any:
        """The uncompressed stream at random (not yet checked: see ``SpanHashes.verified``)."""
        if self.compression == "gzip":
            return streams.GzipStream(archive, self.gzip_checkpoints, self.stream_size)
        if self.compression == "zstd" and self.zstd_frames:
            return streams.ZstdFrameStream(archive, list(self.zstd_frames), self.stream_size)
        if self.compression == "zstd":
            return streams.UnpackedStream(streams.unpacked_path(cache_directory(UNPACKED_DIR),
                                                                self.archive_sha256), self.stream_size)
        return archive

    # -- the file -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = {"compression": self.compression, "archive_sha256": self.archive_sha256,
                "archive_size": self.archive_size, "stream_size": self.stream_size,
                "stream_sha256": self.stream_sha256, "span_size": self.spans.span_size,
                "zstd_frames": [attrs.astuple(f) for f in self.zstd_frames]}
        sections = {"meta": json.dumps(meta).encode(), "hashes": self.spans.hashes, "tree": zlib.compress(self.tree, 6)}
        if self.layout is not None:
            sections["layout"] = zlib.compress(self.layout.to_bytes(), 6)
        if self.gzip_checkpoints:
            sections["gzip"] = zlib.compress(self.gzip_checkpoints, 6)
        payload = b"".join(struct.pack("<B", len(name)) + name.encode() + struct.pack("<Q", len(body)) + body
                           for name, body in sections.items())
        return _HEADER.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest()) + payload

    @classmethod
    def from_bytes(cls, data: bytes, *, check_tree: bool = True) -> ArchiveIndex:
        """ValueError unless ``data`` is a whole, intact index of this version. ``check_tree``: parse and
        check its tree now (an index from elsewhere); else when a layout is made from it (this host's own
        cache: a daemon whose layout is kept never parses it)."""
        if len(data) < _HEADER.size:
            raise ValueError("too short to be an index")
        magic, version, length, checksum = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"not an index of version {VERSION}")
        payload = memoryview(data)[_HEADER.size:]
        if len(payload) != length or hashlib.sha256(payload).digest() != checksum:
            raise ValueError("the index is damaged (its checksum does not match)")
        try:
            sections, pos = {}, 0
            while pos < len(payload):
                n = payload[pos]
                name = bytes(payload[pos + 1:pos + 1 + n]).decode()
                (size,) = struct.unpack_from("<Q", payload, pos + 1 + n)
                start = pos + 9 + n
                if start + size > len(payload):
                    raise ValueError("a section runs past the end")
                sections[name], pos = bytes(payload[start:start + size]), start + size
            meta = json.loads(sections["meta"])
            layout = ImageLayout.from_bytes(_inflate(sections["layout"])) if "layout" in sections else None
            tree = _inflate(sections["tree"])
            index = cls(
                compression=str(meta["compression"]), archive_sha256=str(meta["archive_sha256"]),
                archive_size=int(meta["archive_size"]), stream_size=int(meta["stream_size"]),
                stream_sha256=str(meta["stream_sha256"]),
                spans=SpanHashes(int(meta["span_size"]), sections["hashes"]),
                layout=layout, tree=tree,
                fresh=[packed_tree.load(tree)] if check_tree else [],
                gzip_checkpoints=_inflate(sections["gzip"]) if "gzip" in sections else b"",
                zstd_frames=tuple(streams.frames_from(meta["zstd_frames"])),
            )
        except (KeyError, TypeError, IndexError, AttributeError, zlib.error, struct.error, OverflowError,
                UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"the index is incomplete ({exc})") from None
        if index.compression not in ("tar", "gzip", "zstd") or min(index.archive_size, index.stream_size) < 0:
            raise ValueError("the index describes no archive this version reads")
        if index.spans.span_size != SPAN_SIZE or index.spans.spans * HASH_SIZE != len(index.spans.hashes) or \
                index.spans.spans != -(-index.stream_size // SPAN_SIZE):
            raise ValueError("the index's span hashes do not cover its stream")
        return index


def _inflate(data: bytes) -> bytes:
    """A zlib section, no larger than an index may be."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_INDEX)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("a section is damaged or too large")
    return out


# -- the pass ---------------------------------------------------------------------------------------


def build(archive: Source, where: str, *, progress: bool | Meter = False,
          digest: Callable[[], str] | None = None, layout: bool = True, threads: int | None = None,
          spans_to: Callable[[int, bytes], object] | None = None) -> ArchiveIndex:
    """Read ``archive`` once: its tree, its stream's span hashes and sha256, random-access data and the
    archive's own sha256.

    ``progress``: a line on the terminal (True), or a meter to report to.
    ``digest``: the archive's sha256, taken by whoever fetched it (then it is
    not read a second time for it); called once the pass is done.
    ``layout``: keep the archive's own image in the index (an image's layers are merged instead).
    ``threads``: how many threads decompress a gzip archive (fewer when several passes run at once).
    ``spans_to``: given each span of the stream as it is hashed, ``(n, its bytes)`` (a span store keeps
    them, so the reads after the pass need not fetch them again).
    """
    compression = streams.compression_of(bytes(archive.pread(min(8, archive.size), 0)), where)
    try:
        return _build(archive, where, compression, progress, digest, layout, threads, spans_to, unpack=False)
    except streams.LargeFrame:  # a zstd frame larger than it declared: once more, unpacking the stream
        return _build(archive, where, compression, progress, digest, layout, threads, spans_to, unpack=True)


def _build(archive: Source, where: str, compression: str, progress: bool | Meter,
           digest: Callable[[], str] | None, layout: bool, threads: int | None,
           spans_to: Callable[[int, bytes], object] | None, *, unpack: bool) -> ArchiveIndex:
    if compression == "gzip":
        one_pass: streams.Pass = streams.GzipPass(archive, where, threads)
    elif compression == "zstd":
        one_pass = streams.ZstdPass(archive, where, cache_directory(UNPACKED_DIR), unpack=unpack)
    else:
        one_pass = streams.PlainPass(archive, where)
    # a plain archive is its own stream: the pass hashes it on the way; else a second read beside it
    beside = None if digest is not None or one_pass.sha256 is not None else _Digest(archive)
    meter = progress if isinstance(progress, Meter) else Progress(f"indexing {where}", archive.size,
                                                                   enabled=progress)
    hashes = _Hashes(whole=compression != "tar", spans_to=spans_to)
    try:
        with streams.native_stderr_kept():
            stream = _Tee(one_pass, hashes, meter)
            tree = read_tree(stream, where)  # type: ignore[arg-type]
            stream.drain()
        if not tree.entries and stream.data_after_end:  # (an EROFS image starts with 1 KiB of zeros, say)
            raise streams.ArchiveError(f"{where} is not a tar archive: it holds no entry, and other data than "
                                       "an empty archive's zeros")
        spans, stream_sha256 = hashes.result()
        if digest is not None:
            sha256 = digest()
        else:
            sha256 = beside.result() if beside is not None else one_pass.sha256.hexdigest()
        one_pass.finish(sha256)
    finally:
        hashes.close()
        one_pass.close()
        if beside is not None:
            beside.cancel()
        meter.close()
    return ArchiveIndex(
        compression=compression, archive_sha256=sha256, archive_size=archive.size, stream_size=stream.length,
        stream_sha256=stream_sha256 or sha256, spans=spans,
        layout=ImageLayout.of(tree.root) if layout else None,
        tree=packed_tree.dump(tree), fresh=[] if layout else [tree],  # to be merged: handed over, not loaded
        gzip_checkpoints=one_pass.kept.get("checkpoints", b""),
        zstd_frames=tuple(streams.frames_from(one_pass.kept.get("frames", []))),
    )


class _Tee:
    """The pass's stream for the tar reader, every byte of it hashed on the way.

    A file that reads and seeks forward only: tarfile skips each member's
    data with a seek, which drops the bytes without copying them.
    """

    def __init__(self, one_pass: streams.Pass, hashes: _Hashes, meter: Meter) -> None:
        self.one_pass, self.hashes, self.meter = one_pass, hashes, meter
        self.length = 0
        self._chunks = one_pass.chunks()
        self._pending = memoryview(b"")
        self._pos = 0
        self.data_after_end = False

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self._pos:
            raise OSError("the archive's stream is read forward only")
        while pos > self._pos:
            if not self._pending and not self._pull():
                break  # past the end: the next read says so
            n = min(pos - self._pos, len(self._pending))
            self._pending = self._pending[n:]
            self._pos += n
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise OSError("the archive's stream is read in pieces")
        out = []
        while size:
            if not self._pending and not self._pull():
                break
            piece = self._pending[:size]
            out.append(piece)
            self._pending = self._pending[len(piece):]
            self._pos += len(piece)
            size -= len(piece)
        return b"".join(out)

    def drain(self) -> None:
        """The tar reader has stopped at the archive's end: read (and hash) what follows it, noting whether
        anything but zeros does (``data_after_end``)."""
        self.data_after_end = bool(bytes(self._pending).strip(b"\0"))
        self._pending = memoryview(b"")
        while self._pull():
            self.data_after_end = self.data_after_end or bool(bytes(self._pending).strip(b"\0"))
            self._pending = memoryview(b"")

    def _pull(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self.hashes.update(chunk)
        self.length += len(chunk)
        self.meter.update(self.one_pass.compressed_done, self.length)
        self._pending = memoryview(chunk)
        return True


class _Hashes:
    """The stream's span hashes and (``whole``) its sha256, taken in a thread of their own: hashing
    releases the GIL, so it runs beside the tar reader and the decompressor instead of after them.
    ``spans_to`` is given each whole span there too."""

    def __init__(self, *, whole: bool, spans_to: Callable[[int, bytes], object] | None = None) -> None:
        self.spans = SpanHasher(SPAN_SIZE)
        self.sha256 = hashlib.sha256() if whole else None  # of the whole stream: an OCI layer's diff_id
        self.spans_to = spans_to
        self._span = bytearray()  # the span being filled, for spans_to
        self._given = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)  # a few MiB ahead at most
        self._thread = threading.Thread(target=self._run, name="stream-hashes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.spans.update(chunk)
            if self.sha256 is not None:
                self.sha256.update(chunk)
            if self.spans_to is not None:
                self._span += chunk
                while len(self._span) >= SPAN_SIZE:
                    self.spans_to(self._given, bytes(self._span[:SPAN_SIZE]))
                    del self._span[:SPAN_SIZE]
                    self._given += 1

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def result(self) -> tuple[SpanHashes, str | None]:
        """The span hashes and the stream's sha256 (None if not taken), once every chunk is hashed."""
        self.close()
        if self.spans_to is not None and self._span:
            self.spans_to(self._given, bytes(self._span))  # the stream's last, shorter span
        return self.spans.finish(), self.sha256.hexdigest() if self.sha256 is not None else None

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class _Digest:
    """The archive's sha256, read beside the pass (in a thread: hashing releases the GIL)."""

    def __init__(self, archive: Source) -> None:
        self.archive = archive
        self._stop = threading.Event()
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="archive-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        h = hashlib.sha256()
        try:
            for offset in range(0, self.archive.size, 4 << 20):
                if self._stop.is_set():
                    return
                h.update(self.archive.pread(min(4 << 20, self.archive.size - offset), offset))
            self._value = h.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of result()
            self._error = exc

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the cache ---------------------------------------------------------------------------------------


def _index_path(sha256: str) -> Path:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise SourceError(f"tar: {sha256!r} is not a sha256")
    return cache_directory(INDEX_DIR) / f"{sha256}.idx"


def load(sha256: str) -> ArchiveIndex | None:
    """The cached index of the archive whose sha256 is ``sha256``; None if there is none that is whole.

    Its tree is parsed only when a layout is made from it: the file is
    checksummed, and this host wrote it after checking that tree (a
    published index's tree is checked when it is fetched)."""
    fd = open_cache_file(_index_path(sha256))
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_INDEX + 1)
    try:
        index = ArchiveIndex.from_bytes(data, check_tree=False)
    except ValueError:
        return None
    if index.archive_sha256 != sha256:
        return None
    if index.unpacked and not streams.unpacked_path(cache_directory(UNPACKED_DIR), sha256).is_file():
        return None
    return index


def store(index: ArchiveIndex, encoded: bytes | None = None) -> None:
    """Keep ``index`` in the cache; ``encoded``: the bytes it was read from (``to_bytes`` of it, made
    elsewhere), kept as they are."""
    write_cache_file(_index_path(index.archive_sha256), encoded if encoded is not None else index.to_bytes())


def alias_path(key: str) -> Path:
    """Where the sha256 of an archive known by ``key`` (a file's identity, say) is noted."""
    return cache_directory(INDEX_DIR) / f"known-{hashlib.sha256(key.encode()).hexdigest()}"
