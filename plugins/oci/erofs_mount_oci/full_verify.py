"""``-o verify=full``: a blob checked whole before any byte of it is served, then span by span.

Mounting streams the blob once, checks its digest, and keeps the sha256 of
every span (one cache block, 256 KiB by default). Each later range read is
checked against those hashes before it is served, so a registry or proxy
that sends other bytes causes an I/O error, never other bytes. The hashes
are kept in a root-only cache directory, under the blob's digest; the record
pins their own sha256, so reattach reuses them only if they are the ones
measured at mount, and streams the blob again otherwise. The spans read are
kept in the span store (``disk-cache-mib``) under the blob's digest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from erofs_mount_core import (
    BlockCache,
    CacheSettings,
    FillJob,
    Source,
    SourceChangedError,
    SourceError,
    SpanHasher,
    SpanHashes,
    SpanStore,
    cache_directory,
    open_cache_file,
    write_cache_file,
)

from . import _http
from .blob import BlobSource
from .routing import distrust_served

Spans = SpanHashes  # what this plugin calls the hashes it keeps
FILL_READAHEAD = 4 << 20  # a fill's range requests: this much at a time


def served(blob: BlobSource, spans: Spans, cache: CacheSettings, store: SpanStore | None, *,
           fill: bool) -> Source:
    """The blob read in spans, each checked (a mirror that sent other bytes is skipped for the retry), kept
    in ``store`` and, with ``fill``, every span stored in the background."""
    what = f"blob {blob.digest[:19]}…"
    stream = blob.digest.removeprefix("sha256:")
    source: Source = spans.verified(blob, cache, what, transient=True, store=store, stream=stream,
                                    rejected=distrust_served)
    if store is None or not fill:
        return source
    if blob.size > store.max_bytes:
        raise SourceError(f"oci: fill: the layer's {blob.size >> 20} MiB do not fit the span store's "
                          f"{store.max_bytes >> 20} MiB (disk-cache-mib)")

    def fill_from() -> Source:  # a blob source of its own, sharing the client (which it must not close)
        own = BlobSource(blob.client, blob.url, blob.digest, blob.size, description=what, state={},
                         digest_along=False, owns_client=False)
        return BlockCache(own, block_size=spans.span_size, cache_bytes=spans.span_size, readahead=FILL_READAHEAD)

    return store.filling(source, [FillJob(fill_from, spans, stream, what)])


def measure(client: Any, url: str, digest: str, size: int, span_size: int) -> Spans:
    """Stream the whole blob once: its digest checked, its span hashes taken."""
    what = f"blob {digest[:19]}… (verify=full)"

    def one_pass() -> Spans:
        response = _http.attempt(client, "GET", url, what=what, headers={"Accept-Encoding": "identity"},
                                 stream=True, body_limit=size)
        whole, spans = hashlib.sha256(), SpanHasher(span_size)
        try:
            if response.status_code != 200:
                raise _http.status_error(response, what)
            for chunk in response.iter_bytes(1 << 20):
                if spans.length + len(chunk) > size:
                    raise SourceError(f"{what}: the registry sent more than the blob's {size} bytes")
                whole.update(chunk)
                spans.update(chunk)
        except _http.HTTPError as exc:
            distrust_served(f"{what}: {exc}", lied=False)  # a mirror that breaks off: the next pass asks the next host
            raise SourceError(f"{what}: {type(exc).__name__}: {exc}", transient=True) from None
        finally:
            response.close()
        if spans.length != size:
            raise SourceError(f"{what}: got {spans.length} of {size} bytes", transient=True)
        if f"sha256:{whole.hexdigest()}" != digest:
            message = f"{what}: the registry served bytes with digest sha256:{whole.hexdigest()}"
            # a mirror's bytes: the pass is made again, of the next host; the registry's: they are refused
            raise SourceError(message, transient=True) if distrust_served(message) else SourceChangedError(message)
        return spans.finish()

    if not digest.startswith("sha256:"):
        raise SourceError(f"oci: verify=full checks sha256 blobs only, not {digest.split(':')[0]}")
    return _http.RETRY.call(one_pass, what)


def _file(digest: str, span_size: int) -> Path:
    return cache_directory("oci-spans") / f"{digest.replace(':', '-')}.{span_size}"


def store(digest: str, spans: Spans) -> None:
    write_cache_file(_file(digest, spans.span_size), spans.hashes)


def load(digest: str, span_size: int, root: str) -> Spans | None:
    """The spans measured at mount, if the cache still holds exactly them."""
    fd = open_cache_file(_file(digest, span_size))
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        spans = Spans(span_size, f.read(64 << 20))
    return spans if spans.root() == root else None
