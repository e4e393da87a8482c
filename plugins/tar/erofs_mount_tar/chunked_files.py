"""A layer's files' bytes end to end, served chunk by chunk from its blob, each chunk checked before it is served.

What a table of contents (``toc``) gives for each regular file is a list of
chunks: a stretch of the file's bytes, the blob bytes that inflate to it
(zstd frames, or a gzip member from an inner offset) and its sha256.
``ChunkedFiles`` lays the files end to end (a file's ``data_offset`` is
where its bytes start) and serves any range of that: the chunks it needs
are fetched with range requests (neighbours in the blob in one), inflated
with the output bounded by the chunk's size, and checked; a chunk that does
not match is never served. A miss also fetches the blob bytes of the chunks
that follow (``READAHEAD``): a layer's small files lie one after another, and
a program reads its neighbours (a package's modules, a directory's icons);
those bytes are kept as fetched and inflated and checked only when read.
A read that needs chunks another read's request is bringing waits for that
request instead of making its own.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping

import attrs

from erofs_mount_core import Counters, Source, SourceError

MAX_CHUNK = 32 << 20  # one chunk inflated and held to be checked; the writers' chunks are ~64 KiB
MERGE_GAP = 16 << 10  # chunks this close in the blob (tar headers between files) are fetched in one request
READAHEAD = 1 << 20  # blob bytes past a miss's chunks fetched in the same request (round trips saved)


@attrs.frozen
class Chunk:
    """``size`` bytes at ``start`` of the virtual stream: blob bytes [blob_start, blob_end) inflated, or zeros."""

    start: int
    size: int
    blob_start: int
    blob_end: int
    sha256: bytes
    zeros: bool = False
    inner_offset: int = 0
    """eStargz: where the chunk starts in what its gzip member inflates to (members may hold several)"""



class ChunkedFiles(Source):
    """The files' bytes end to end, each chunk fetched from the blob, inflated and checked before it is served.

    Chunks a read needs that lie close together in the blob are fetched in
    one range request; checked chunks are kept, least recently used first
    out, up to ``cache_bytes``. A chunk that does not match its sha256 fails
    the read (transient: the retry fetches it again), after ``rejected``
    hears of it.
    """

    def __init__(self, blob: Source, chunks: tuple[Chunk, ...], size: int, cache_bytes: int, what: str,
                 rejected: Callable[[str], object] | None = None, *, codec: str = "zstd") -> None:
        self.blob, self.chunks, self._size, self.what = blob, chunks, size, what
        self._inflate = _inflate_zstd if codec == "zstd" else _inflate_gzip
        self._starts = [c.start for c in chunks]
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._ahead: OrderedDict[int, bytes] = OrderedDict()  # blob bytes fetched ahead, not yet checked
        self._fetching: dict[int, threading.Event] = {}  # chunks on their way, each to its fetch's end
        self._cached, self._limit = 0, max(cache_bytes, MAX_CHUNK)
        self._lock = threading.Lock()
        self._rejected = rejected
        self._counters = Counters()

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise SourceError(f"{self.what}: a read of {length} bytes at {offset} is outside its files' "
                              f"{self._size} bytes")
        first = bisect.bisect_right(self._starts, offset) - 1
        last = bisect.bisect_right(self._starts, offset + length - 1) - 1 if length else first
        wanted = range(first, last + 1)
        found = self._cached_chunks(wanted)
        missing = [i for i in wanted if i not in found]
        if missing:
            found.update(self._checked(self._fetched_ahead(missing)))
            missing = [i for i in missing if i not in found]
        if missing and self._waited_for(missing):  # another read was fetching some of them: theirs are here now
            found.update(self._cached_chunks(range(first, last + 1)))
            found.update(self._checked(self._fetched_ahead([i for i in missing if i not in found])))
            missing = [i for i in missing if i not in found]
        for group in _groups(self.chunks, missing):
            found.update(self._fetch(group))
        out = bytearray()
        for i in wanted:
            chunk = self.chunks[i]
            lo, hi = max(offset, chunk.start), min(offset + length, chunk.start + chunk.size)
            out += found[i][lo - chunk.start:hi - chunk.start]
        return bytes(out)

    def _cached_chunks(self, wanted: range) -> dict[int, bytes]:
        with self._lock:
            found = {}
            for i in wanted:
                data = self._cache.get(i)
                if data is not None:
                    self._cache.move_to_end(i)
                    found[i] = data
            return found

    def _fetched_ahead(self, wanted: list[int]) -> dict[int, bytes]:
        with self._lock:
            found = {i: self._ahead.pop(i) for i in wanted if i in self._ahead}
            self._cached -= sum(map(len, found.values()))
            return found

    def _waited_for(self, wanted: list[int]) -> bool:
        """Waits for the fetches under way that bring any of ``wanted``; whether there were any."""
        with self._lock:
            under_way = {id(done): done for i in wanted if (done := self._fetching.get(i)) is not None}
        for done in under_way.values():
            done.wait()  # (set however that fetch ends; a failed one leaves the chunks to be fetched here)
        return bool(under_way)

    def _fetch(self, group: list[int]) -> dict[int, bytes]:
        """The group's chunks, fetched in one request with the blob bytes of the chunks that follow them."""
        fetching = any(not self.chunks[i].zeros for i in group)
        done = threading.Event()
        ahead = self._ahead_of(group, done) if fetching else []
        try:
            first = self.chunks[group[0]]
            end = max(self.chunks[i].blob_end for i in (*group, *ahead))
            blobs = {i: b"" for i in group}
            if fetching:
                span = bytes(self.blob.pread(end - first.blob_start, first.blob_start))
                self._counters.add("toc_chunk_fetches")
                self._counters.add("toc_chunk_fetched_bytes", len(span))
                for i in (*group, *ahead):
                    chunk = self.chunks[i]
                    blobs[i] = span[chunk.blob_start - first.blob_start:chunk.blob_end - first.blob_start]
            if ahead:
                self._counters.add("toc_readahead_chunks", len(ahead))
                with self._lock:
                    for i in ahead:
                        self._ahead[i] = blobs.pop(i)
                        self._cached += len(self._ahead[i])
                    self._trim()
            return self._checked(blobs)  # (kept before the reads that wait for them wake)
        finally:
            with self._lock:
                for i in (*group, *ahead):
                    if self._fetching.get(i) is done:
                        del self._fetching[i]
            done.set()

    def _ahead_of(self, group: list[int], done: threading.Event) -> list[int]:
        """The chunks after ``group`` whose blob bytes follow its own, up to ``READAHEAD`` of them, none held
        or on its way; the group's and these are noted as on their way until ``done``."""
        ahead: list[int] = []
        before = self.chunks[group[-1]]
        limit = before.blob_end + READAHEAD
        with self._lock:
            for i in group:
                self._fetching.setdefault(i, done)
            for i in range(group[-1] + 1, len(self.chunks)):
                chunk = self.chunks[i]
                if chunk.zeros:
                    continue
                if not _follows(chunk, before) or chunk.blob_end > limit or i in self._cache or i in self._ahead \
                        or i in self._fetching:
                    break
                ahead.append(i)
                self._fetching[i] = done
                before = chunk
        return ahead

    def _checked(self, blobs: dict[int, bytes]) -> dict[int, bytes]:
        """Each chunk's bytes from its blob bytes, checked against its sha256 (all kept), or SourceError."""
        fetched = {}
        for i, blob in blobs.items():
            chunk = self.chunks[i]
            data = bytes(chunk.size) if chunk.zeros else self._inflate(blob, chunk)
            if len(data) != chunk.size or hashlib.sha256(data).digest() != chunk.sha256:
                message = (f"{self.what}: the chunk at byte {chunk.blob_start} of the blob is not the one its "
                           "TOC pins")
                self._counters.add("toc_chunks_rejected")
                if self._rejected is not None:
                    self._rejected(message)
                raise SourceError(message, transient=True)
            fetched[i] = data
        self._keep(fetched)
        return fetched

    def _keep(self, fetched: dict[int, bytes]) -> None:
        with self._lock:
            for i, data in fetched.items():
                if i not in self._cache:
                    self._cache[i] = data
                    self._cached += len(data)
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest, what was fetched ahead first, until what is held fits (under the lock)."""
        while self._cached > self._limit and (self._ahead or self._cache):
            _, old = (self._ahead or self._cache).popitem(last=False)
            self._cached -= len(old)

    def counters(self) -> Mapping[str, int]:
        return self._counters.snapshot(self.blob.counters())

    def close(self) -> None:
        self.blob.close()


def _inflate_zstd(frames: bytes, chunk: Chunk) -> bytes:
    """The chunk's bytes from its zstd frames (one more byte asked for than it should have: a longer one is
    caught); b"" for frames that do not inflate."""
    import zstandard

    try:
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(frames), read_across_frames=True) \
            .read(chunk.size + 1)
    except zstandard.ZstdError:
        return b""


def _inflate_gzip(member: bytes, chunk: Chunk) -> bytes:
    """The chunk's bytes: ``chunk.size`` of what its gzip member inflates to, from ``chunk.inner_offset``."""
    try:
        data = zlib.decompressobj(wbits=31).decompress(member, chunk.inner_offset + chunk.size)
    except zlib.error:
        return b""
    return data[chunk.inner_offset:]


def _groups(chunks: tuple[Chunk, ...], wanted: list[int]) -> Iterator[list[int]]:
    """``wanted`` (in order) cut where the next chunk does not follow the one before it in the blob."""
    group: list[int] = []
    for i in wanted:
        if group and not _follows(chunks[i], chunks[group[-1]]):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _follows(chunk: Chunk, before: Chunk) -> bool:
    """``chunk`` starts in the blob where ``before`` does (eStargz: one gzip member, an inner offset each) or
    at most ``MERGE_GAP`` after its end: one request fetches both. A TOC may also name bytes out of order."""
    return before.blob_start <= chunk.blob_start <= before.blob_end + MERGE_GAP
