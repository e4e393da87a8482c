"""Span hashes: the sha256 of every fixed-size span of a byte stream, taken in one pass and checked on every read.

A source whose bytes come from somewhere that could change or lie (a
registry, a proxy, an archive on disk) records them when it first reads the
stream; ``SpanHashes.verified(source, cache)`` then serves only spans whose
hash matches, so other bytes become I/O errors, never other file contents.
With a ``SpanStore``, the spans checked are also kept on disk, under the
stream's own sha256, and served from there by every later mount of the
same stream (a reattached daemon starts warm).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol

import attrs

from ._errors import SourceError
from ._filters import BlockCache, CacheSettings, Filter
from ._source import Source


class Keeper(Protocol):
    """Where checked spans are kept and served from (``SpanStore``): all ``verified`` needs of one."""

    def persisted(self, inner: Source, spans: SpanHashes, stream: str) -> Source: ...

HASH_SIZE = 32  # one sha256


@attrs.frozen
class SpanHashes:
    span_size: int
    hashes: bytes = attrs.field(repr=False)
    """The sha256 of each span, in order, concatenated (the stream's last span may be short)."""

    @property
    def spans(self) -> int:
        return len(self.hashes) // HASH_SIZE

    def root(self) -> str:
        """One digest for all of them: what a record pins."""
        return hashlib.sha256(self.hashes).hexdigest()

    def check(self, offset: int, data: bytes | memoryview, what: str, *, transient: bool = False) -> None:
        """``data`` starts at a span boundary and holds whole spans (the stream's last may be short).

        ``transient``: a mismatch may pass on a retry (bytes from a network,
        not from a file that changed)."""
        if offset % self.span_size:
            raise ValueError("span checks start at a span boundary")
        view = memoryview(data)
        for start in range(0, len(view), self.span_size):
            n = (offset + start) // self.span_size
            if hashlib.sha256(view[start:start + self.span_size]).digest() != self.hashes[n * HASH_SIZE:
                                                                                         (n + 1) * HASH_SIZE]:
                raise SourceError(f"{what}: span {n} is not the bytes measured when it was first read",
                                  transient=transient)

    def verified(self, source: Source, cache: CacheSettings, what: str, *, transient: bool = False,
                 store: Keeper | None = None, stream: str = "",
                 rejected: Callable[[str], object] | None = None) -> BlockCache:
        """``source`` behind a cache of spans, each checked once when it is fetched.

        ``store`` and ``stream`` (the sha256 of the whole stream, hex): the
        spans checked are kept in the store and served from it. ``rejected``
        hears of each span that did not match, before the read fails.
        """
        checked: Source = _Checked(source, self, what, transient, rejected)
        if store is not None:
            if not stream:
                raise ValueError("a span store keeps spans under the stream's sha256")
            checked = store.persisted(checked, self, stream)
        return BlockCache(checked, block_size=self.span_size, cache_bytes=cache.cache_mib << 20,
                          readahead=cache.readahead_kib << 10)


def checked(source: Source, spans: SpanHashes, what: str) -> Source:
    """``source`` read in whole spans, each checked (a mismatch is transient: a retry may fetch the right bytes)."""
    return _Checked(source, spans, what, True, None)


class SpanHasher:
    """Takes span hashes of a stream fed in order, in pieces of any size."""

    def __init__(self, span_size: int) -> None:
        self.span_size = span_size
        self.length = 0
        self._hashes = bytearray()
        self._span = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = self.span_size - self.length % self.span_size
            self._span.update(view[:take])
            self.length += min(take, len(view))
            view = view[take:]
            if self.length % self.span_size == 0:
                self._hashes += self._span.digest()
                self._span = hashlib.sha256()

    def finish(self) -> SpanHashes:
        if self.length % self.span_size:
            self._hashes += self._span.digest()
            self._span = hashlib.sha256()
        return SpanHashes(self.span_size, bytes(self._hashes))


class _Checked(Filter):
    """Reads of whole spans (as the BlockCache in front asks for them), checked before they go anywhere."""

    def __init__(self, inner: Source, spans: SpanHashes, what: str, transient: bool,
                 rejected: Callable[[str], object] | None) -> None:
        super().__init__(inner)
        self.spans, self.what, self.transient, self.rejected = spans, what, transient, rejected
        if -(-inner.size // spans.span_size) != spans.spans:
            raise SourceError(f"{what}: {inner.size} bytes do not make the {spans.spans} spans measured")

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        data = self.inner.pread(length, offset)
        try:
            self.spans.check(offset, data, self.what, transient=self.transient)
        except SourceError as exc:
            if self.rejected is not None:
                self.rejected(str(exc))
            raise
        return data

    def fileno(self) -> int | None:
        return None  # every byte goes through the check
