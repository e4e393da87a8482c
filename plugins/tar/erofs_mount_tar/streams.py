"""An archive's uncompressed tar stream: read once in order (to index it), then at random (to serve it).

Each compression has a pass, which yields the stream in order and keeps
what random access needs, and a reader built from what the pass kept:

- ``tar``: the archive is the stream; nothing to keep.
- ``gzip`` (single- or multi-member, as gzip, pigz and eStargz write it):
  rapidgzip decompresses the pass (in parallel, CRC and length checked)
  and exports checkpoints, each with its 32 KiB window, every 2 MiB of
  compressed data (2-3 MiB of output apart for typical content; long runs
  of highly compressible data can put ~8 MiB between two); a read
  inflates from the checkpoint before it.
- ``zstd``: the pass walks the frame headers first. Archives of small
  frames (zstd:chunked, seekable zstd, ``zstd -B``) are read frame by
  frame; an archive with a large frame cannot be entered in the middle, so
  the pass also unpacks it into a cache file, which then serves it.

No reader checks the bytes it returns: the image verifies every span of the
stream against the hashes the pass took (``SpanHashes``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import sys
import tempfile
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from erofs_mount_core import Counters, Source, SourceError, cache_room, open_cache_file

log = logging.getLogger("erofs_mount.tar")
CHUNK = 1 << 20
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
#: of compressed data: ~3 MiB of output for typical content; rapidgzip holds some 30x this per thread for data
#: that compresses very well
GZIP_CHECKPOINT_SPACING = 1 << 20
#: a zstd frame above this (compressed, or declared uncompressed) makes the archive unpacked into the cache
ZSTD_FRAME_LIMIT, ZSTD_CONTENT_LIMIT = 4 << 20, 32 << 20
#: frames (skippable ones included) one zstd archive may have: each is a row in its index
MAX_ZSTD_FRAMES = 1 << 20
OTHER_MAGICS = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x04\x22\x4d\x18": "lz4"}


class LargeFrame(Exception):
    """A zstd frame turned out larger than ``ZSTD_CONTENT_LIMIT`` (its size was not declared, or not
    truthfully): the pass starts again, unpacking, so that no read has to inflate that much."""


class ArchiveError(SourceError):
    """The archive cannot be mounted as it is: it says where and why."""


def compression_of(head: bytes, where: str) -> str:
    """``tar``, ``gzip`` or ``zstd``, from the archive's first bytes (its name does not matter)."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    for magic, name in OTHER_MAGICS.items():
        if head.startswith(magic):
            raise ArchiveError(f"{where} is {name}-compressed; tar archives can be plain, gzip or zstd")
    return "tar"


# -- the pass: the stream in order, once ---------------------------------------------------------------


class Pass:
    """Yields the uncompressed stream in order (``chunks``); ``kept`` is what random access needs."""

    def __init__(self, archive: Source, where: str) -> None:
        self.archive, self.where = archive, where
        self.kept: dict[str, Any] = {}
        self.compressed_done = 0
        """How far into the archive the pass is (for a progress line)."""
        self.sha256: Any = None
        """The archive's sha256, if the pass takes it on the way (a plain archive is its own stream)."""

    def chunks(self) -> Iterator[bytes]:
        raise NotImplementedError

    def finish(self, digest: str) -> None:
        """The pass is complete and the archive's digest known: keep what must outlive it."""

    def close(self) -> None:
        """Let go of what the pass holds, complete or not."""


class PlainPass(Pass):
    """The archive is its stream: its sha256 is taken on the way, not in a second read."""

    def __init__(self, archive: Source, where: str) -> None:
        super().__init__(archive, where)
        self.sha256 = hashlib.sha256()

    def chunks(self) -> Iterator[bytes]:
        for offset in range(0, self.archive.size, CHUNK):
            data = bytes(self.archive.pread(min(CHUNK, self.archive.size - offset), offset))  # (any Source)
            self.sha256.update(data)
            self.compressed_done = offset + len(data)
            yield data


_stderr_lock = threading.Lock()
_stderr_users = 0
_stderr_saved: tuple[int, Any] | None = None  # the real fd 2 and the sink, while passes run


@contextlib.contextmanager
def native_stderr_kept() -> Iterator[None]:
    """What native code writes to fd 2 itself (rapidgzip's C++ complaints about a damaged stream)
    goes to a temporary file while passes run, then to the debug log: erofs-mount's own error
    stays the one line on stderr. Passes in several threads share one redirection."""
    global _stderr_users, _stderr_saved
    with _stderr_lock:
        if _stderr_users == 0:
            sys.stderr.flush()
            sink = tempfile.TemporaryFile()
            _stderr_saved = (os.dup(2), sink)
            os.dup2(sink.fileno(), 2)
        _stderr_users += 1
    try:
        yield
    finally:
        with _stderr_lock:
            _stderr_users -= 1
            if _stderr_users == 0 and _stderr_saved is not None:
                saved, sink = _stderr_saved
                _stderr_saved = None
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                said = sink.read(64 << 10).decode(errors="replace").strip()
                sink.close()
                if said:
                    log.debug("said while reading archives: %s", said)


class GzipPass(Pass):
    def __init__(self, archive: Source, where: str, threads: int | None = None) -> None:
        """``threads``: how many decompress at once (default: one per CPU, up to four)."""
        import rapidgzip

        super().__init__(archive, where)
        self._file = SourceFile(archive)
        # no more threads than chunks: each holds tens of MiB when the data compresses very well
        chunks = -(-archive.size // GZIP_CHECKPOINT_SPACING)
        self._reader = rapidgzip.RapidgzipFile(self._file, chunk_size=GZIP_CHECKPOINT_SPACING,
                                               parallelization=max(1, min(threads or min(4, os.cpu_count() or 1),
                                                                          chunks)))

    def chunks(self) -> Iterator[bytes]:
        try:
            while data := self._reader.read(CHUNK):
                self.compressed_done = self._file.tell()
                yield data
            index = io.BytesIO()
            self._reader.export_index(index)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ArchiveError(_gzip_damage(self.where, exc)) from None
        self.kept["checkpoints"] = index.getvalue()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._reader.close()
        self._file.close()


def _gzip_damage(where: str, exc: Exception) -> str:
    text = str(exc)
    if "CRC32" in text or "checksum" in text.lower():
        return f"{where}: the gzip data is damaged (its CRC does not match): refusing the archive"
    return f"{where}: the gzip data is truncated or damaged ({text.splitlines()[0][:120] if text else exc!r})"


@attrs.frozen
class Frame:
    """One zstd frame: where it is in the archive, and where its output is in the stream."""

    offset: int
    length: int
    out_offset: int = 0
    out_length: int = 0


_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def zstd_frames(archive: Source, where: str) -> tuple[list[Frame], bool]:
    """The archive's frames (skippable ones left out) from their headers, and whether one is too large
    to be entered at random (declared content size or compressed length over the limits)."""
    frames, large, pos, size = [], False, 0, archive.size

    def need(n: int, at: int) -> bytes:
        if at + n > size:
            raise ArchiveError(f"{where}: the zstd data is truncated (a frame runs past the end of the file)")
        return bytes(archive.pread(n, at)) if n else b""

    count = 0
    while pos < size:
        count += 1
        if count > MAX_ZSTD_FRAMES:
            raise ArchiveError(f"{where} has more than {MAX_ZSTD_FRAMES:,} zstd frames: refusing the archive")
        magic = int.from_bytes(need(4, pos), "little")
        if magic in _SKIPPABLE:
            pos += 8 + int.from_bytes(need(4, pos + 4), "little")
            continue
        if magic != 0xFD2FB528:
            raise ArchiveError(f"{where}: no zstd frame at byte {pos}: the file is damaged or has other data "
                               "after its zstd frames")
        fhd = need(1, pos + 4)[0]
        single_segment, checksum, dict_flag, fcs_flag = fhd >> 5 & 1, fhd >> 2 & 1, fhd & 3, fhd >> 6
        if dict_flag:
            raise ArchiveError(f"{where}: a zstd frame needs a dictionary, which this archive does not carry")
        fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
        header = 5 + (0 if single_segment else 1)
        content = None
        if fcs_size:
            content = int.from_bytes(need(fcs_size, pos + header), "little") + (256 if fcs_size == 2 else 0)
        block = pos + header + fcs_size
        while True:
            head = int.from_bytes(need(3, block), "little")
            last, kind, length = head & 1, head >> 1 & 3, head >> 3
            if kind == 3:
                raise ArchiveError(f"{where}: the zstd data is damaged (a reserved block type at byte {block})")
            block += 3 + (1 if kind == 1 else length)
            if last:
                break
        end = block + 4 * checksum
        need(0, end)
        frame = Frame(pos, end - pos, out_length=content or 0)
        large |= frame.length > ZSTD_FRAME_LIMIT or (content or 0) > ZSTD_CONTENT_LIMIT
        frames.append(frame)
        pos = end
    if not frames:
        raise ArchiveError(f"{where}: the zstd file holds no data frame")
    return frames, large


class ZstdPass(Pass):
    """Frame by frame; with a large frame, the stream is also written, sparse, to a cache file."""

    def __init__(self, archive: Source, where: str, unpack_dir: Path, *, unpack: bool = False) -> None:
        """``unpack``: whatever the frames declare (a frame was found larger than it said: ``LargeFrame``)."""
        super().__init__(archive, where)
        self.frames, large = zstd_frames(archive, where)
        self._unpack_dir = unpack_dir if large or unpack else None
        self._out: Any = None
        self._out_path: Path | None = None

    def chunks(self) -> Iterator[bytes]:
        import zstandard

        done = []
        out = 0
        room = 0
        if self._unpack_dir is not None:
            room = unpack_room(self._unpack_dir)
            self._out_path = self._unpack_dir / f".unpacking.{os.getpid()}.{threading.get_ident()}.tmp"
            fd = os.open(self._out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_SH)  # in use: `cache prune` leaves it alone
            self._out = os.fdopen(fd, "wb")
        try:
            for frame in self.frames:
                compressed = _frame_file(self.archive, frame)
                reader = zstandard.ZstdDecompressor().stream_reader(compressed, read_size=CHUNK)
                start = out
                while data := reader.read(CHUNK):
                    out += len(data)
                    if self._out is None and out - start > ZSTD_CONTENT_LIMIT:
                        raise LargeFrame
                    self.compressed_done = frame.offset + compressed.pos
                    if self._out is not None:
                        if out > room:
                            raise ArchiveError(f"{self.where}: unpacking its zstd stream into the cache would leave "
                                               "its filesystem with less than its reserve free: "
                                               "refusing it (write it in smaller frames: zstd -B, or "
                                               "recompress it with gzip)")
                        _write_sparse(self._out, data)
                    yield data
                self.compressed_done = frame.offset + frame.length
                done.append(Frame(frame.offset, frame.length, start, out - start))
        except zstandard.ZstdError as exc:
            raise ArchiveError(f"{self.where}: the zstd data is damaged ({exc})") from None
        if self._out is not None:
            self._out.truncate(out)
            self.kept["unpacked"] = True
        else:
            self.kept["frames"] = [attrs.astuple(f) for f in done]

    def finish(self, digest: str) -> None:
        if self._out is not None:
            self._out.close()
            os.replace(self._out_path, unpacked_path(self._unpack_dir, digest))
            self._out = self._out_path = None

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
        if self._out_path is not None:
            self._out_path.unlink(missing_ok=True)


class SourceFile(io.RawIOBase):
    """Bytes ``start`` to ``end`` of a source as a seekable binary file (what rapidgzip and zstandard read):
    a local file and a registry blob alike."""

    def __init__(self, source: Source, start: int = 0, end: int | None = None) -> None:
        self.source, self.start = source, start
        self.end = source.size if end is None else end
        self.pos = 0  # from start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.end - self.start}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.end - self.start - self.pos)
        if n <= 0:
            return 0
        buffer[:n] = self.source.pread(n, self.start + self.pos)
        self.pos += n
        return n


def _frame_file(archive: Source, frame: Frame) -> SourceFile:
    return SourceFile(archive, frame.offset, frame.offset + frame.length)


def unpack_room(directory: Path) -> int:
    """How many bytes an unpacked stream may take in ``directory`` (see ``cache_room``)."""
    return cache_room(directory)


def unpacked_path(directory: Path, digest: str) -> Path:
    return directory / f"{digest}.tar"


def _write_sparse(out: Any, data: bytes) -> None:
    """Runs of zeros become holes (tar pads every file and ends with zeros)."""
    step = 64 << 10
    for start in range(0, len(data), step):
        piece = data[start:start + step]
        if piece.count(0) == len(piece):
            out.seek(len(piece), os.SEEK_CUR)
        else:
            out.write(piece)


# -- random access: the stream at any offset ----------------------------------------------------------


class Window(Source):
    """The archive through one range fetched ahead: a read of the stream asks its source for the
    compressed bytes it needs at once (one HTTP request for a registry blob), not in the
    decompressor's 128 KiB pieces. Reads outside the range go to the archive.

    ``fetched`` takes no state, so a stream calls it before it takes its decoder's lock: the reads of
    one layer wait for their requests side by side, not one after another; ``show`` then hands the
    bytes to the decoder."""

    def __init__(self, archive: Source) -> None:
        self.archive = archive
        self._start, self._data = 0, memoryview(b"")

    @property
    def size(self) -> int:
        return self.archive.size

    def fetched(self, start: int, end: int) -> memoryview:
        end = min(end, self.archive.size)
        return memoryview(bytes(self.archive.pread(end - start, start)) if end > start else b"")

    def show(self, start: int, data: memoryview) -> None:
        self._start, self._data = start, data

    def fetch(self, start: int, end: int) -> None:
        self.show(start, self.fetched(start, end))

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        into = offset - self._start
        if 0 <= into and into + length <= len(self._data):
            return self._data[into:into + length]
        return self.archive.pread(length, offset)

    def forget(self) -> None:
        self._data = memoryview(b"")

    def counters(self) -> Mapping[str, int]:
        return self.archive.counters()


#: what the gzip reader reads past the checkpoint after a read's end (one buffer), and some slack
GZIP_READ_PAST = 256 << 10
#: what it reads when it is opened: one buffer from the start
GZIP_OPEN_READ = 128 << 10


class GzipStream(Source):
    """Inflates from the checkpoint before each read; a read that continues the last one just continues."""

    def __init__(self, archive: Source, checkpoints: bytes, size: int) -> None:
        import rapidgzip

        self._size = size
        self._window = Window(archive)
        self._file = SourceFile(self._window)
        self._window.fetch(0, GZIP_OPEN_READ)  # what opening reads (the header, a first buffer): one request
        try:
            self._reader = rapidgzip.RapidgzipFile(self._file, parallelization=1)
            try:
                self._reader.import_index(io.BytesIO(checkpoints))
            except BaseException:
                self._reader.close()
                raise
        except (ValueError, RuntimeError) as exc:  # other bytes than were indexed
            raise SourceError(f"the gzip stream does not open at its checkpoints ({exc})") from None
        finally:
            self._window.forget()
        points = sorted((out, bits // 8) for bits, out in self._reader.block_offsets().items())
        self._outs, self._ins = [p[0] for p in points], [p[1] for p in points]
        #: where the reader stopped: (stream offset, compressed offset); a read from there continues
        self._at = (-1, 0)
        self._lock = threading.Lock()
        self._counters = Counters()

    @property
    def size(self) -> int:
        return self._size

    def _compressed_range(self, offset: int, end: int) -> tuple[int, int]:
        stopped_at, read_to = self._at  # (one tuple: read whole although another read may be changing it)
        if offset and stopped_at == offset:  # continuing: from where the reader stopped reading
            first = read_to
        else:
            first = self._ins[max(0, bisect_right(self._outs, offset) - 1)]
        after = bisect_left(self._outs, end)
        last = self._ins[after] + GZIP_READ_PAST if after < len(self._ins) else self._window.size
        return first, last

    def pread(self, length: int, offset: int) -> bytes:
        first, last = self._compressed_range(offset, offset + length)
        try:
            compressed = self._window.fetched(first, last)  # not under the lock: see Window
            with self._lock:
                self._window.show(first, compressed)  # (what the reader then needs elsewhere, it fetches)
                try:
                    if self._reader.tell() != offset:
                        self._reader.seek(offset)
                    data = self._reader.read(length)
                    self._at = (offset + len(data), self._file.tell())
                except BaseException:
                    self._at = (-1, 0)  # where a reader that failed stopped is not known: no read continues it
                    raise
                finally:
                    self._window.forget()
        except (ValueError, RuntimeError, OSError) as exc:
            raise SourceError(f"gzip stream: read of {length} bytes at {offset} failed: {exc}") from None
        if len(data) != length:
            raise SourceError(f"gzip stream: only {len(data)} of {length} bytes at {offset}")
        self._counters.add("decompressed_bytes", length)
        return data

    def counters(self) -> Mapping[str, int]:
        return self._counters.snapshot(self._window.counters())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._reader.close()
        self._file.close()


class ZstdFrameStream(Source):
    """Decompresses the frame a read falls in, from its start; a read that continues the last one continues."""

    def __init__(self, archive: Source, frames: list[Frame], size: int) -> None:
        self.archive, self.frames, self._size = archive, frames, size
        self._window = Window(archive)
        self._starts = [f.out_offset for f in frames]
        self._lock = threading.Lock()
        #: frame index, its reader, the stream offset it is at, the compressed frame it reads
        self._current: tuple[int, Any, int, SourceFile] | None = None
        self._counters = Counters()

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        import zstandard

        out = bytearray()
        start, compressed = self._frames_of(offset, offset + length)  # not under the lock: see Window
        with self._lock:
            self._window.show(start, compressed)
            try:
                while len(out) < length:
                    at = offset + len(out)
                    i = bisect_right(self._starts, at) - 1
                    frame = self.frames[i]
                    reader, file = self._reader_at(i, frame, at)
                    want = min(length - len(out), frame.out_offset + frame.out_length - at)
                    data = reader.read(want)
                    if len(data) != want:
                        raise SourceError(f"zstd stream: frame {i} ended early")
                    out += data
                    self._current = (i, reader, at + want, file)
            except zstandard.ZstdError as exc:
                self._current = None
                raise SourceError(f"zstd stream: read at {offset} failed: {exc}") from None
            finally:
                self._window.forget()
        self._counters.add("decompressed_bytes", length)
        return bytes(out)

    def counters(self) -> Mapping[str, int]:
        return self._counters.snapshot(self._window.counters())

    def _frames_of(self, offset: int, end: int) -> tuple[int, memoryview]:
        """The compressed bytes of the frames the read falls in, in one request: (where they start, them)."""
        first, last = self.frames[bisect_right(self._starts, offset) - 1], \
            self.frames[bisect_right(self._starts, end - 1) - 1]
        start = first.offset
        current = self._current  # (one tuple: read whole although another read may be changing it)
        if current is not None and current[2] == offset and self.frames[current[0]] == first:
            start += current[3].tell()  # continuing: from where the reader stopped
        return start, self._window.fetched(start, last.offset + last.length)

    def _reader_at(self, i: int, frame: Frame, at: int) -> tuple[Any, SourceFile]:
        import zstandard

        if self._current is not None and self._current[0] == i and self._current[2] == at:
            return self._current[1], self._current[3]
        file = _frame_file(self._window, frame)
        reader = zstandard.ZstdDecompressor().stream_reader(file, read_size=CHUNK)
        skip = at - frame.out_offset
        while skip:
            skipped = len(reader.read(min(skip, CHUNK)))
            if not skipped:
                raise SourceError(f"zstd stream: frame {i} ended early")
            skip -= skipped
        return reader, file

    def close(self) -> None:
        self._current = None


class UnpackedStream(Source):
    """A zstd archive's stream unpacked in the cache; held (locked) so that ``cache prune`` leaves it alone."""

    def __init__(self, path: Path, size: int) -> None:
        fd = open_cache_file(path, hold=True)
        if fd is None:
            raise FileNotFoundError(path)
        self._fd, self._size = fd, size
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise FileNotFoundError(path)

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SourceError(f"unpacked stream: only {len(data)} of {length} bytes at {offset}")
        return data

    def close(self) -> None:
        os.close(self._fd)


def frames_from(kept: list[list[int]]) -> list[Frame]:
    """The frames a pass kept, as the index holds them."""
    return [Frame(*map(int, f)) for f in kept]
