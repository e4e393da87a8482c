"""A registry blob as a Source: one HTTP range request per read, checked span by span under verify=full.

The core's ``BlockCache`` in front of it (see ``open_reference``) turns the
kernel's reads into block-aligned ranges with readahead, and the core's
``Retrying`` filter retries what fails transiently; each ``pread`` here is
one attempt. A registry that ignores Range and sends the whole blob is read
once into a temporary file, which then serves every read. The blob's digest
is checked when sequential reads have passed over all of it (unless the
caller checks every read itself against span hashes: tar layers, verify=full).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from erofs_mount_core import Counters, Source, SourceError

from . import _http

log = logging.getLogger("erofs_mount.oci")


class BlobSource(Source):
    def __init__(self, client: Any, url: str, digest: str, size: int, *, description: str,
                 state: Mapping[str, Any], digest_along: bool = True, owns_client: bool = True) -> None:
        self.client, self.url, self.digest, self._size = client, url, digest, size
        self.description = description
        self.owns_client = owns_client
        self._state = dict(state)
        self._lock = threading.Lock()
        self._full: Any = None  # a temp file holding the whole blob, if the registry ignored Range
        self._hasher = hashlib.new(digest.split(":")[0])
        self._hashed = 0 if digest_along else size  # off: the caller checks what it reads another way
        self._bad_digest: str | None = None
        self._counters = Counters()

    @property
    def size(self) -> int:
        return self._size

    def describe(self) -> str:
        return self.description

    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def counters(self) -> dict[str, int]:
        """``http_requests`` (range requests made) and ``http_bytes`` (the bytes they brought)."""
        return self._counters.snapshot()

    def pread(self, length: int, offset: int) -> bytes:
        if self._bad_digest:
            raise SourceError(self._bad_digest)
        if offset < 0 or length <= 0 or offset + length > self._size:
            raise SourceError(f"blob {self.digest}: read of {length} bytes at {offset} is outside "
                              f"its {self._size} bytes")
        if self._full is None:
            start, end = offset, offset + length
            what = f"blob {self.digest[:19]}… bytes {start}-{end - 1}"
            self._counters.add("http_requests")
            try:
                data = _http.read_range(self.client, self.url, start, end - start, what=what, whole=self._size)
            except _http.FullBody as full:
                self._take_full_body(full.response)
            else:
                self._counters.add("http_bytes", len(data))
                with self._lock:
                    self._hash_along(start, data)
                return data
        return os.pread(self._full.fileno(), length, offset)

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
                    if spool.tell() + len(chunk) > self._size:  # bounded by the size the manifest gave
                        spool.close()
                        raise SourceError(f"blob {self.digest}: the registry sent more than its {self._size} bytes")
                    spool.write(chunk)
                    hasher.update(chunk)
            except _http.HTTPError as exc:
                spool.close()
                raise SourceError(f"blob {self.digest}: download failed: {exc}", transient=True) from exc
            finally:
                response.close()
            self._counters.add("http_bytes", spool.tell())
            if spool.tell() != self._size:
                spool.close()
                raise SourceError(f"blob {self.digest}: got {spool.tell()} of {self._size} bytes", transient=True)
            self._check(hasher.hexdigest())
            self._full = spool

    def close(self) -> None:
        if self._full is not None:
            self._full.close()
        if self.owns_client:
            self.client.close()
