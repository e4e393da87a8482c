"""The span store: verified spans of byte streams kept on disk, shared by every daemon and kept across reattach.

A stream is named by its own sha256 (a layer's diff_id, a blob's digest),
so the store is content-addressed: span ``n`` of a stream cut in spans of
``S`` bytes is the file ``<cache>/spans/<sha256>.<S>/<n>``, whichever
mount, device or plugin stored it. A span goes in only after it was checked
against its hash (``SpanHashes.verified`` puts the store above its check);
it is written aside and renamed, so a crash leaves the whole span or none;
it is read back only if its sha256 is still the span's hash (a file
changed on disk is deleted, counted, and fetched again); and each use
touches it, so that when the store outgrows its bound the least recently
used spans are deleted first. A failing disk never fails a read: the span
is fetched as if it had not been stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from ._cache import cache_directory, cache_room, cache_root, write_cache_file
from ._errors import SourceError
from ._filters import DEFAULT_RETRY, Filter
from ._metrics import Counters
from ._source import Source
from ._span_hashes import HASH_SIZE, SpanHashes, checked

log = logging.getLogger("erofs_mount.spans")

STORE_DIR = "spans"
#: after outgrowing its bound, the store is pruned to this share of it, so pruning is not done on every write
LOW_WATER = 0.9
#: a temporary file this old was left by a writer that died
STALE_TEMP = 600


@attrs.frozen
class StoredStream:
    """What the store holds of one stream."""

    stream: str
    span_size: int
    spans: int
    bytes: int
    used: float

    @property
    def name(self) -> str:
        """How ``cache list`` names it: its place in the cache, shortened."""
        return f"{STORE_DIR}/sha256:{self.stream[:12]}…"


@attrs.frozen
class FillJob:
    """One stream to fill the store with in the background: ``open()`` gives a source of its bytes (closed
    after the fill; it must not close what serving still uses), ``spans`` its hashes, ``stream`` its sha256."""

    open: Callable[[], Source]
    spans: SpanHashes
    stream: str
    what: str


class SpanStore:
    """Spans on disk, at most ``max_bytes`` of them (the bound holds for every daemon that uses it)."""

    def __init__(self, max_bytes: int, directory: Path | None = None) -> None:
        if directory is None:
            directory = cache_directory(STORE_DIR)  # root-only, checked
        else:
            directory.mkdir(mode=0o700, exist_ok=True)
        self.directory = directory
        self.max_bytes = max_bytes
        self._held: int | None = None  # bytes stored, as last counted, plus what this process wrote since
        self._lock = threading.Lock()
        self._failed_write = False

    def persisted(self, inner: Source, spans: SpanHashes, stream: str) -> Source:
        """``inner`` (whose reads are checked) with the spans it gives kept here and served from here."""
        return _Persisted(inner, self, spans, stream)

    def filling(self, source: Source, jobs: list[FillJob]) -> Source:
        """``source``, which fills the store with ``jobs`` on a thread of its own once it serves."""
        return _Filling(source, self, jobs)

    def fill(self, inner: Source, spans: SpanHashes, stream: str, what: str, stop: threading.Event,
             counters: Counters) -> bool:
        """Store every span of ``inner`` not stored yet, in order, each checked first (a transient
        failure retried as reads are); until done (True) or ``stop`` is set or a span fails (False)."""
        source, span, where = checked(inner, spans, what), spans.span_size, self.place(stream, spans.span_size)
        if inner.size > self.max_bytes:
            log.warning("%s: not filled: its %d MiB do not fit the span store's %d MiB", what, inner.size >> 20,
                        self.max_bytes >> 20)
            return False
        for n in range(spans.spans):
            if stop.is_set():
                return False
            if (where / str(n)).exists():
                continue
            start = n * span
            try:
                data = DEFAULT_RETRY.call(lambda start=start: source.pread(min(span, inner.size - start), start),
                                          f"{what}: fill of span {n}")
            except SourceError as exc:
                log.warning("%s: fill stopped at span %d of %d (%s); reads fetch what they need", what, n,
                            spans.spans, exc)
                return False
            if self.put(where, n, data):
                counters.add("span_store_filled_bytes", len(data))
        return True

    # -- one span --------------------------------------------------------------------

    def get(self, where: Path, n: int, digest: bytes, counters: Counters, span_size: int) -> bytes | None:
        """Span ``n`` if it is stored and still hashes to ``digest``; a changed file is deleted."""
        path = where / str(n)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("span store: cannot open %s (%s); fetching the span", path, exc)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device in its place: never read
                log.warning("span store: %s is not a file; fetching the span", path)
                return None
            data = os.read(fd, span_size + 1)  # one byte more than a span can be: a longer file does not match
            if hashlib.sha256(data).digest() != digest:
                counters.add("span_store_corrupt")
                log.warning("span store: %s is not the span it was stored as; deleted, fetching it again", path)
                with contextlib.suppress(OSError):
                    path.unlink()
                return None
            with contextlib.suppress(OSError):
                os.utime(fd)  # recently used: evicted last
            return data
        except OSError as exc:
            log.warning("span store: cannot read %s (%s); fetching the span", path, exc)
            return None
        finally:
            os.close(fd)

    def put(self, where: Path, n: int, data: bytes | memoryview) -> bool:
        """Keep span ``n``: written aside and renamed. False if the disk would not take it (logged once)."""
        if len(data) > self.max_bytes:
            return False
        try:
            self._make_room(len(data))
            with contextlib.suppress(FileExistsError):
                where.mkdir(mode=0o700)
            write_cache_file(where / str(n), data)
        except OSError as exc:
            if not self._failed_write:
                self._failed_write = True
                log.warning("span store: cannot write to %s (%s); spans are served without being kept",
                            self.directory, exc)
            return False
        return True

    def passing(self, what: str) -> Path:
        """A place for the spans of a stream whose sha256 is not known yet (an index pass): ``adopt`` names
        them by it once it is, ``drop`` forgets them. Its files are spans like any other until then (pruned
        least recently used first, so a place a dead pass left goes in time)."""
        return self.directory / f".pass-{os.getpid()}-{threading.get_ident()}-{what}"

    def adopt(self, passing: Path, stream: str, span_size: int) -> None:
        """The spans at ``passing`` are the stream ``stream``'s: each goes to its place, unless one is there."""
        where = self.place(stream, span_size)
        try:
            names = os.listdir(passing)
        except FileNotFoundError:
            return
        with contextlib.suppress(FileExistsError):
            where.mkdir(mode=0o700)
        for name in names:
            with contextlib.suppress(OSError):
                if not (where / name).exists():
                    os.rename(passing / name, where / name)
        self.drop(passing)

    def drop(self, passing: Path) -> None:
        """Forget the spans at ``passing`` (the pass failed, or its stream is kept otherwise)."""
        shutil.rmtree(passing, ignore_errors=True)

    def holds(self, stream: str, spans: SpanHashes) -> bool:
        """Whether every span of the stream is stored (each is still checked when it is read)."""
        where = self.place(stream, spans.span_size)
        try:
            names = set(os.listdir(where))
        except OSError:
            return False
        return all(str(n) in names for n in range(spans.spans))

    def place(self, stream: str, span_size: int) -> Path:
        """The directory of a stream's spans (made on first write)."""
        return self.directory / f"{stream}.{span_size}"

    # -- the bound -------------------------------------------------------------------

    def _make_room(self, adding: int) -> None:
        with self._lock:
            if self._held is None or self._held + adding > self.max_bytes:
                self._held = self.prune(int(self.max_bytes * LOW_WATER) - adding)
            self._held += adding

    def prune(self, keep: int) -> int:
        """Delete the least recently used spans until at most ``keep`` bytes are stored (and the
        cache's filesystem keeps its reserve); the bytes left. One process prunes at a time."""
        with _locked(self.directory / ".lock"):
            files = list(_span_files(self.directory))
            held = sum(size for _path, size, _used in files)
            room = cache_room(self.directory)
            if room < 0:
                keep = min(keep, held + room)
            files.sort(key=lambda f: f[2])
            for path, size, _used in files:
                if held <= keep:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    held -= size
            return held


def cache_store() -> Path:
    """Where the span store lives in the cache directory (``cache list`` shows it apart from the other files)."""
    return cache_root() / STORE_DIR


def stored(directory: Path | None = None) -> list[StoredStream]:
    """Each stream the store at ``directory`` (the cache's, by default) holds spans of, least recently used
    first."""
    directory = cache_store() if directory is None else directory
    streams: dict[Path, list[tuple[int, float]]] = {}
    for path, size, used in _span_files(directory):
        streams.setdefault(path.parent, []).append((size, used))
    found = []
    for place, spans in streams.items():
        name, _, span_size = place.name.rpartition(".")
        found.append(StoredStream(name, int(span_size) if span_size.isdigit() else 0, len(spans),
                                  sum(s for s, _ in spans), max(u for _, u in spans)))
    return sorted(found, key=lambda s: (s.used, s.stream))


def _span_files(directory: Path) -> Iterator[tuple[Path, int, float]]:
    """(path, bytes, last used) of every span; temporary files left by dead writers are deleted."""
    now = time.time()
    try:
        places = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for place in places:
        if not place.is_dir(follow_symlinks=False):
            continue
        with os.scandir(place.path) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if entry.name.startswith("."):
                    if now - st.st_mtime > STALE_TEMP:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                    continue
                yield Path(entry.path), st.st_blocks * 512, st.st_mtime


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _Persisted(Filter):
    """Reads of whole spans (as the block cache above asks): stored spans are served from the disk,
    the others fetched from ``inner`` in one read (which checks them) and stored."""

    def __init__(self, inner: Source, store: SpanStore, spans: SpanHashes, stream: str) -> None:
        super().__init__(inner)
        self.store, self.span_size, self.hashes = store, spans.span_size, spans.hashes
        self.where = store.place(stream, spans.span_size)
        self._counters = Counters()

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        span = self.span_size
        first, last = offset // span, (offset + length - 1) // span
        got: dict[int, bytes | memoryview | None] = {
            n: self.store.get(self.where, n, self.hashes[n * HASH_SIZE:(n + 1) * HASH_SIZE], self._counters, span)
            for n in range(first, last + 1)}
        missing = [n for n, data in got.items() if data is None]
        self._counters.add("span_store_hits", len(got) - len(missing))
        if missing:
            self._counters.add("span_store_misses", len(missing))
            lo, hi = missing[0], missing[-1]
            start = lo * span
            data = memoryview(self.inner.pread(min((hi + 1) * span, self.size) - start, start))
            for n in range(lo, hi + 1):
                piece = data[(n - lo) * span:(n - lo + 1) * span]
                if got[n] is None and self.store.put(self.where, n, piece):
                    self._counters.add("span_store_written_bytes", len(piece))
                got[n] = piece
        if first == last:
            whole = got[first]
        else:
            whole = b"".join(got[n] for n in range(first, last + 1))  # type: ignore[misc]
        assert whole is not None
        if (first * span, min((last + 1) * span, self.size)) == (offset, offset + length):
            return whole
        return memoryview(whole)[offset - first * span:offset - first * span + length]

    def fileno(self) -> int | None:
        return None

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot(self.inner.counters())


class _Filling(Filter):
    """Fills the store from ``jobs``, one after the other, on one thread, from ``start_background`` until
    done or closed; what a fill stores, reads then find."""

    def __init__(self, inner: Source, store: SpanStore, jobs: list[FillJob]) -> None:
        super().__init__(inner)
        self.store, self.jobs = store, jobs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counters = Counters()

    def start_background(self) -> None:
        super().start_background()
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="fill", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        started = time.monotonic()
        for job in self.jobs:
            try:
                source = job.open()
            except SourceError as exc:
                log.warning("%s: not filled (%s); reads fetch what they need", job.what, exc)
                continue
            try:
                done = self.store.fill(source, job.spans, job.stream, job.what, self._stop, self._counters)
            finally:
                source.close()
            if self._stop.is_set():
                return
            if done:
                log.info("%s: every span is in the span store (%.1fs since the fill started)", job.what,
                         time.monotonic() - started)

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot(self.inner.counters())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # at most one span's fetch, and its retries, are under way
        super().close()
