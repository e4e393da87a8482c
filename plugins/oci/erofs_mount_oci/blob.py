"""A registry blob as a Source: lazy range reads through a bounded block cache.

Each NBD read costs at most one HTTP request: the missing blocks it touches
are fetched as one range (plus readahead when reads run sequentially).
A registry that ignores Range and sends the whole blob is read once into a
temporary file, which then serves every read. The blob's digest is checked
when a sequential pass has read it all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from typing import Any

from erofs_mount_core import Source, SourceError

from . import _http

log = logging.getLogger("erofs_mount.oci")


class BlobSource(Source):
    def __init__(self, client: Any, url: str, digest: str, size: int, *, description: str,
                 block_size: int = 256 << 10, cache_bytes: int = 256 << 20,
                 readahead: int = 4 << 20) -> None:
        self.client, self.url, self.digest, self._size = client, url, digest, size
        self.description = description
        self.block_size = block_size
        self.max_blocks = max(1, cache_bytes // block_size)
        self.readahead_blocks = readahead // block_size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._last_end = -1
        self._full: Any = None  # a temp file holding the whole blob, if the registry ignored Range
        self._hasher = hashlib.new(digest.split(":")[0])
        self._hashed = 0
        self._bad_digest: str | None = None
        self.requests = 0
        self.bytes_fetched = 0

    @property
    def size(self) -> int:
        return self._size

    def describe(self) -> str:
        return self.description

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        if self._bad_digest:
            raise SourceError(self._bad_digest)
        if offset < 0 or length <= 0 or offset + length > self._size:
            raise SourceError(f"blob {self.digest}: read of {length} bytes at {offset} is outside "
                              f"its {self._size} bytes")
        if self._full is not None:
            return self._read_full(length, offset)
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        with self._lock:
            missing = [b for b in range(first, last + 1) if b not in self._cache]
            sequential = offset == self._last_end
            self._last_end = offset + length
        if missing:
            lo, hi = missing[0], missing[-1]
            if sequential and self.readahead_blocks:
                hi = min(hi + self.readahead_blocks, (self._size - 1) // bs)
            self._fetch(lo, hi)
            if self._full is not None:
                return self._read_full(length, offset)
        end = offset + length
        with self._lock:
            parts = []
            for b in range(first, last + 1):
                block = self._cache.get(b)
                if block is None:  # evicted by a concurrent reader: fetch just it
                    self._lock.release()
                    try:
                        self._fetch(b, b)
                    finally:
                        self._lock.acquire()
                    block = self._cache[b]
                self._cache.move_to_end(b)
                base = b * bs
                lo, hi = max(offset, base) - base, min(end, base + len(block)) - base
                parts.append(block if lo == 0 and hi == len(block) else memoryview(block)[lo:hi])
        # a read inside one cached block is a view of it, not a copy; across blocks, one copy
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def _fetch(self, lo: int, hi: int) -> None:
        bs = self.block_size
        start, end = lo * bs, min((hi + 1) * bs, self._size)
        what = f"blob {self.digest[:19]}… bytes {start}-{end - 1}"
        self.requests += 1
        try:
            data = _http.read_range(self.client, self.url, start, end - start, what=what)
        except _http.FullBody as full:
            self._take_full_body(full.response)
            return
        self.bytes_fetched += len(data)
        with self._lock:
            for i, b in enumerate(range(lo, hi + 1)):
                self._cache[b] = data[i * bs:(i + 1) * bs]
                self._cache.move_to_end(b)
            while len(self._cache) > self.max_blocks:
                self._cache.popitem(last=False)
            self._hash_along(start, data)

    def _hash_along(self, start: int, data: bytes) -> None:
        """Feed the digest with data that continues where the last feed ended."""
        if self._hashed < start or self._hashed >= start + len(data):
            return
        self._hasher.update(memoryview(data)[self._hashed - start:])
        self._hashed = start + len(data)
        if self._hashed == self._size:
            self._check(self._hasher.hexdigest())

    def _check(self, hexdigest: str) -> None:
        got = f"{self.digest.split(':')[0]}:{hexdigest}"
        if got != self.digest:
            self._bad_digest = f"blob {self.digest}: the registry served bytes with digest {got}"
            log.error("%s", self._bad_digest)
            raise SourceError(self._bad_digest)
        log.info("blob %s: digest verified", self.digest)

    def _take_full_body(self, response: Any) -> None:
        """Keep the whole blob the registry insisted on sending, in a temporary file."""
        with self._lock:
            if self._full is not None:
                response.close()
                return
            log.warning("the registry ignored Range for %s; keeping the whole blob in a temporary file",
                        self.digest)
            spool = tempfile.TemporaryFile(prefix="erofs-mount-oci-")
            hasher = hashlib.new(self.digest.split(":")[0])
            try:
                for chunk in response.iter_bytes(1 << 20):
                    spool.write(chunk)
                    hasher.update(chunk)
            except _http.HTTPError as exc:
                spool.close()
                raise SourceError(f"blob {self.digest}: download failed: {exc}", transient=True) from exc
            finally:
                response.close()
            self.bytes_fetched += spool.tell()
            if spool.tell() != self._size:
                spool.close()
                raise SourceError(f"blob {self.digest}: got {spool.tell()} of {self._size} bytes", transient=True)
            self._check(hasher.hexdigest())
            self._full = spool
            self._cache.clear()

    def _read_full(self, length: int, offset: int) -> bytes:
        return os.pread(self._full.fileno(), length, offset)

    def close(self) -> None:
        if self._full is not None:
            self._full.close()
        self.client.close()
