"""A layer's TOC index kept in the cache: what every open of the layer after the first loads instead of the TOC.

Reading a TOC (inflating its JSON, checking each entry, building the tree
and the chunk list) is the larger part of a TOC layer's open: a second or
more for a layer of ten thousand files on a small machine, paid again by
the daemon that each mount starts and by every reattach. The index it
gives is kept under ``$EROFS_MOUNT_CACHE_DIR/tar-toc/`` by the layer's
digest and the TOC's pinned checksum, written only after the TOC was
checked against the manifest's pin and read whole, as the archive indexes
beside it are (``index``). The file format (version 1, little-endian)::

    magic "erofs-mount-ttix" | version u32 | payload length u64 | sha256(payload)
    payload: meta length u32 | meta JSON (stream size, entries, codec, chunk count)
             | chunks, 73 bytes each: start, size, blob start, blob end (u64), sha256 (32 bytes),
               zeros (u8), inner offset (u64) | zlib(packed tree)

A file that is missing, damaged, of another version or whose values break
what a TOC read gives (chunks that do not follow each other, one larger
than ``MAX_CHUNK`` or taking more blob bytes than its inflation needs) is
ignored, checksum or not: the TOC is fetched and read again. Its tree is
checked where every kept tree is, when it is first read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

from erofs_mount_core import cache_directory, open_cache_file, write_cache_file

from .chunked_files import MAX_CHUNK, Chunk
from .toc import MAX_TOC, TOC_DIR, TocIndex

MAGIC = b"erofs-mount-ttix"
VERSION = 1
MAX_FILE = 2 * MAX_TOC  # what a TOC gives is smaller than its JSON (a chunk: 73 bytes here, 150 or more there)
MAX_BLOB_SPAN = MAX_CHUNK + (MAX_CHUNK >> 7) + (64 << 10)  # the most blob bytes a chunk's inflation needs
_HEADER = struct.Struct("<16sIQ32s")
_CHUNK = struct.Struct("<QQQQ32sBQ")


def cached_toc(layer_digest: str, checksum: str) -> TocIndex | None:
    """The index of the TOC ``checksum`` of layer ``layer_digest``, if the cache holds it whole."""
    path = _path(layer_digest, checksum)
    fd = open_cache_file(path) if path is not None else None
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE + 1)
    try:
        return _from_bytes(data)
    except ValueError:
        return None


def store_toc(layer_digest: str, checksum: str, index: TocIndex) -> None:
    """Keep ``index``, read from a TOC checked against ``checksum`` (the manifest's pin)."""
    path = _path(layer_digest, checksum)
    if path is not None:
        write_cache_file(path, _to_bytes(index))


def _path(layer_digest: str, checksum: str) -> Path | None:
    """Where the index is kept; None for a digest that is not sha256 (never kept)."""
    names = [d.removeprefix("sha256:") for d in (layer_digest, checksum) if d.startswith("sha256:")]
    if len(names) != 2 or not all(len(n) == 64 and all(c in "0123456789abcdef" for c in n) for n in names):
        return None
    return cache_directory(TOC_DIR) / f"{names[0]}-{names[1]}.tix"


def _to_bytes(index: TocIndex) -> bytes:
    meta = json.dumps({"stream_size": index.stream_size, "entries": index.entries, "codec": index.codec,
                       "chunks": len(index.chunks)}).encode()
    chunks = b"".join(_CHUNK.pack(c.start, c.size, c.blob_start, c.blob_end, c.sha256, c.zeros, c.inner_offset)
                      for c in index.chunks)
    payload = struct.pack("<I", len(meta)) + meta + chunks + zlib.compress(index.tree, 6)
    return _HEADER.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def _from_bytes(data: bytes) -> TocIndex:
    if len(data) < _HEADER.size:
        raise ValueError("too short")
    magic, version, length, checksum = _HEADER.unpack_from(data)
    payload = memoryview(data)[_HEADER.size:]
    if magic != MAGIC or version != VERSION or len(payload) != length or \
            hashlib.sha256(payload).digest() != checksum:
        raise ValueError("not an intact TOC index of this version")
    try:
        (meta_length,) = struct.unpack_from("<I", payload)
        meta = json.loads(bytes(payload[4:4 + meta_length]))
        start = 4 + meta_length
        end = start + int(meta["chunks"]) * _CHUNK.size
        chunks = tuple(Chunk(s, n, bs, be, h, bool(z), i)
                       for s, n, bs, be, h, z, i in _CHUNK.iter_unpack(payload[start:end]))
        index = TocIndex(zlib.decompress(payload[end:]), chunks, int(meta["stream_size"]), int(meta["entries"]),
                         str(meta["codec"]))
    except (KeyError, TypeError, ValueError, struct.error, zlib.error, RecursionError) as exc:
        raise ValueError(f"incomplete ({exc})") from None
    if index.codec not in ("zstd", "gzip") or index.entries < 0:
        raise ValueError("it describes no TOC this version reads")
    at = 0
    for chunk in chunks:  # (the unsigned fields cannot be negative)
        if chunk.start != at or not 0 < chunk.size <= MAX_CHUNK or chunk.inner_offset + chunk.size > MAX_CHUNK or \
                not 0 <= chunk.blob_end - chunk.blob_start <= MAX_BLOB_SPAN:
            raise ValueError("its chunks do not follow each other within their bounds")
        at += chunk.size
    if index.stream_size != at:
        raise ValueError("its chunks do not make its stream")
    return index
