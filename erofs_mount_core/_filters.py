"""Filters: sources over sources that add one behaviour, as nbdkit's filters do.

A filter delegates what it does not change (``size``, ``fileno``,
``describe``, ``state``, ``counters``, ``start_background``, ``close``), so it can wrap any source and be
stacked. Two ship with the core:

- ``BlockCache``: a bounded LRU of fixed-size blocks with readahead on
  sequential reads. A plugin whose bytes are remote wraps its source in it
  (``CacheSettings(...).wrap(source)``); each read then costs the source at
  most one ``pread``.
- ``Retrying``: the one place where transient failures are retried. The
  daemon and ``serve`` wrap every source in it; sources make one attempt
  per ``pread`` and report what a retry may cure (``SourceError(...,
  transient=True, retry_after=...)``). ``RetryPolicy.call`` retries other
  calls (a plugin's manifest or token requests at open time) the same way.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs

from ._errors import SourceError, UsageError
from ._metrics import Counters
from ._source import Source

log = logging.getLogger("erofs_mount.retry")
T = TypeVar("T")


class Filter(Source):
    """A source that wraps ``inner``; subclasses override what they change."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        return self.inner.pread(length, offset)

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def describe(self) -> str:
        return self.inner.describe()

    def state(self) -> Mapping[str, Any] | None:
        return self.inner.state()

    def counters(self) -> Mapping[str, int]:
        return self.inner.counters()

    def refusal(self) -> str | None:
        return self.inner.refusal()

    def start_background(self) -> None:
        self.inner.start_background()

    def close(self) -> None:
        self.inner.close()


# -- retries ---------------------------------------------------------------------


@attrs.frozen
class RetryPolicy:
    """How often and how patiently a transient failure is retried.

    The defaults bound one failed read to 6 attempts and at most
    0.25 + 0.5 + 1 + 2 + 4 = 7.75 s of back-off (a server's Retry-After may
    stretch one pause to ``max_hint``, 30 s at most in all).
    """

    attempts: int = attrs.field(default=6, validator=attrs.validators.ge(1))
    base_delay: float = 0.25
    max_delay: float = 4.0
    max_hint: float = 30.0
    """The longest a server's Retry-After may make us wait, in all."""
    quiet: bool = False
    """Attempts are logged at DEBUG, not as warnings (a command's one line says how it ended)."""

    def pause(self, attempt: int, hint: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (jittered unless the server named a time)."""
        if hint is not None:
            return min(max(hint, 0.0), self.max_hint)
        return min(self.max_delay, self.base_delay * 2 ** attempt) * random.uniform(0.5, 1.0)

    def call(self, fn: Callable[[], T], what: str, *, failed: SourceError | None = None) -> T:
        """``fn()``, retried while it raises a transient ``SourceError``.

        ``failed`` is a first attempt the caller already made. When every
        attempt fails, the last error is raised with the count added.
        """
        attempt, waited, last = (0, 0.0, None) if failed is None else (1, 0.0, failed)
        while attempt < self.attempts:
            if last is not None:
                delay = self.pause(attempt - 1, last.retry_after)
                if last.retry_after is not None:
                    delay = min(delay, max(0.0, self.max_hint - waited))
                waited += delay
                log.log(logging.DEBUG if self.quiet else logging.WARNING, "%s failed (%s); attempt %d of %d in %.2fs",
                        what, last, attempt + 1, self.attempts, delay)
                time.sleep(delay)
            try:
                return fn()
            except SourceError as exc:
                if not exc.transient:
                    raise
                last = exc
            attempt += 1
        assert last is not None
        raise SourceError(f"{last} (after {self.attempts} attempts)", transient=True) from last


DEFAULT_RETRY = RetryPolicy()


class Retrying(Filter):
    """Retries each ``pread`` that fails transiently, by ``policy``: the only retry on the read path."""

    def __init__(self, inner: Source, policy: RetryPolicy = DEFAULT_RETRY) -> None:
        super().__init__(inner)
        self.policy = policy
        self._counters = Counters()

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        try:
            return self.inner.pread(length, offset)  # the common case: one call, no closure
        except SourceError as exc:
            if not exc.transient:
                raise
            failed = exc
        self._counters.add("retried_reads")
        return self.policy.call(lambda: self.inner.pread(length, offset),
                                f"read of {length} bytes at {offset}", failed=failed)

    def counters(self) -> Mapping[str, int]:
        return self._counters.snapshot(self.inner.counters())


# -- the block cache ---------------------------------------------------------------


@attrs.frozen
class CacheSettings:
    """A block cache's bounds, as ``-o`` options and as TOML-safe record state."""

    cache_mib: int = 256
    block_kib: int = 256
    readahead_kib: int = 4096

    OPTIONS = ("cache-mib", "block-kib", "readahead-kib")
    #: the largest value each option takes: a cache of memory, its blocks, a read ahead
    MAXIMA = {"cache-mib": 1 << 16, "block-kib": 1 << 16, "readahead-kib": 1 << 20}

    @classmethod
    def parse(cls, options: Mapping[str, str], scheme: str) -> CacheSettings:
        """From ``-o cache-mib=N,block-kib=N,readahead-kib=N`` (other keys are ignored)."""
        values = {}
        for key in cls.OPTIONS:
            if key in options:
                value = options[key]
                if not value.isdigit():
                    raise UsageError(f"{scheme}: {key}={value!r} is not a whole number")
                if int(value) > cls.MAXIMA[key]:
                    raise UsageError(f"{scheme}: {key}={value} is more than the {cls.MAXIMA[key]} it may be")
                values[key.replace("-", "_")] = int(value)
        if values.get("cache_mib") == 0 or values.get("block_kib") == 0:
            raise UsageError(f"{scheme}: cache-mib and block-kib must be at least 1")
        return cls(**values)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CacheSettings:
        """From ``to_state()``'s keys in a record; missing keys take the defaults."""
        fields = [f.name for f in attrs.fields(cls)]
        return cls(**{name: int(state[name]) for name in fields if name in state})

    def to_state(self) -> dict[str, int]:
        return attrs.asdict(self)

    def wrap(self, source: Source) -> BlockCache:
        return BlockCache(source, block_size=self.block_kib << 10, cache_bytes=self.cache_mib << 20,
                          readahead=self.readahead_kib << 10)


class _Fetch:
    """A range of blocks on its way: what reads that need one of them wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.blocks: dict[int, bytes] = {}


class BlockCache(Filter):
    """A bounded LRU of ``block_size`` blocks; each read costs ``inner`` at most one ``pread``.

    The blocks a read misses are fetched as one range, extended when reads
    run sequentially: by one block at the first such miss, then by twice the
    last extension at each next one, up to ``readahead`` bytes (as the
    kernel's readahead ramps up), so that a run of small files read in order
    costs little more than the files, and a long read soon fetches in large
    ranges. A block that another read is fetching is waited for, not fetched
    again (the kernel sends neighbouring reads at once, and several threads
    serve them). A read inside one cached block is answered with a view of
    it, without a copy.
    """

    def __init__(self, inner: Source, *, block_size: int = 256 << 10, cache_bytes: int = 256 << 20,
                 readahead: int = 4 << 20) -> None:
        super().__init__(inner)
        self.block_size = block_size
        self.max_blocks = max(1, cache_bytes // block_size)
        self.readahead_blocks = readahead // block_size
        self._size = inner.size
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._last_end = -1
        self._ramp = 0  # the blocks the last sequential miss added; 0 once reads stop running in order
        self._fetching: dict[int, _Fetch] = {}  # blocks on their way, each to the fetch that brings it
        self._counters = Counters()

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        if offset < 0 or length <= 0 or offset + length > self._size:
            raise SourceError(f"read of {length} bytes at {offset} is outside the source's {self._size} bytes")
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        with self._lock:  # hold references to what is cached now: an eviction cannot take them away
            have = {}
            for b in range(first, last + 1):
                block = self._blocks.get(b)
                if block is not None:
                    self._blocks.move_to_end(b)
                    have[b] = block
            sequential = offset == self._last_end
            self._last_end = offset + length
            hit = len(have) > last - first
            if not sequential:
                self._ramp = 0
            elif not hit:
                self._ramp = min(max(1, 2 * self._ramp), self.readahead_blocks)
            missing = [b for b in range(first, last + 1) if b not in have]
            awaited = {b: self._fetching[b] for b in missing if b in self._fetching}
            mine = [b for b in missing if b not in awaited]
            if mine:  # one range from the first block this read fetches to its last, and what is read ahead
                lo, hi = mine[0], mine[-1]
                if sequential:
                    hi = min(hi + self._ramp, (self._size - 1) // bs)
                fetch = _Fetch()
                for b in range(lo, hi + 1):
                    self._fetching.setdefault(b, fetch)
        if hit:
            self._counters.add("cache_hits")
        else:
            self._counters.add("cache_misses")
            if mine:
                have.update(self._fetch(lo, hi, fetch))
            for b, other in awaited.items():
                other.done.wait()
                block = other.blocks.get(b)
                have[b] = block if block is not None else self._fetch(b, b)[b]  # that fetch failed: our own
        end = offset + length
        if first == last:  # inside one block: a view of it, not a copy
            block, base = have[first], first * bs
            if offset == base and end == base + len(block):
                return block
            return memoryview(block)[offset - base:end - base]
        return b"".join(memoryview(have[b])[max(offset, b * bs) - b * bs:min(end, (b + 1) * bs) - b * bs]
                        for b in range(first, last + 1))

    def _fetch(self, lo: int, hi: int, claim: _Fetch | None = None) -> dict[int, bytes]:
        """Blocks ``lo`` to ``hi`` in one read, cached; ``claim``: the entry in ``_fetching`` of those that
        other reads wait for, ended (with the blocks, or none when the read failed) whatever happens."""
        bs = self.block_size
        fetched: dict[int, bytes] = {}
        try:
            start, end = lo * bs, min((hi + 1) * bs, self._size)
            data = bytes(self.inner.pread(end - start, start))
            self._counters.add("cache_fetched_bytes", len(data))
            fetched = {b: data[(b - lo) * bs:(b - lo + 1) * bs] for b in range(lo, hi + 1)}
            with self._lock:
                for b, block in fetched.items():
                    self._blocks[b] = block
                    self._blocks.move_to_end(b)
                while len(self._blocks) > self.max_blocks:
                    self._blocks.popitem(last=False)
        finally:
            if claim is not None:
                claim.blocks = fetched
                with self._lock:
                    for b in range(lo, hi + 1):
                        if self._fetching.get(b) is claim:
                            del self._fetching[b]
                claim.done.set()
        return fetched

    def counters(self) -> Mapping[str, int]:
        return self._counters.snapshot(self.inner.counters())

    def clear(self) -> None:
        """Forget every cached block (what was fetched may have been wrong: fetch it again)."""
        with self._lock:
            self._blocks.clear()
            self._last_end = -1
