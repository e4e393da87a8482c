"""Layouts kept in the cache by their digest: reattach, and a daemon reopening what its mount just opened,
load the synthesized metadata instead of merging the layers' trees again (or making one layer's).

A layout is named by ``ImageLayout.digest()``, which a record pins as its
``image_sha256``, and by what it was merged from (``made_from``: the
layers' trees and where each stream starts), since its files' extents point
into those streams: a layer now read otherwise (its TOC refused, say) merges
again. One is used only if its bytes still give that digest, so a damaged
or planted file is never served (it is merged again instead).
``$EROFS_MOUNT_CACHE_DIR/tar-layout/<digest>.<made_from>.lay`` holds it,
zlib-compressed.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterable

from erofs_mount_core import ImageLayout, cache_directory, open_cache_file, write_cache_file

LAYOUT_DIR = "tar-layout"
MAX_LAYOUT = 1 << 30  # no image's metadata is near this


def made_from(trees: Iterable[bytes], bases: Iterable[int], merged: bool = True) -> str:
    """What a layout is made from: each layer's packed tree, where its stream starts, and whether the layers
    were merged (or one is taken as it is, its whiteouts in overlayfs form)."""
    whole = hashlib.sha256(b"" if merged else b"as it is")
    for tree, base in zip(trees, bases, strict=True):
        whole.update(hashlib.sha256(tree).digest() + base.to_bytes(8, "little"))
    return whole.hexdigest()


def _path(digest: str, source: str):  # noqa: ANN202 - a Path
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"{digest!r} is not a sha256")
    return cache_directory(LAYOUT_DIR) / f"{digest}.{source[:32]}.lay"


def load_layout(digest: str, source: str) -> ImageLayout | None:
    """The layout whose digest is ``digest``, merged from ``source`` (``made_from``), if the cache holds it whole;
    None otherwise."""
    try:
        fd = open_cache_file(_path(digest, source))
    except ValueError:
        return None
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        packed = f.read(MAX_LAYOUT + 1)
    try:
        inflater = zlib.decompressobj()
        layout = ImageLayout.from_bytes(inflater.decompress(packed, MAX_LAYOUT))
    except (zlib.error, ValueError):
        return None
    return layout if layout.digest() == digest else None


def store_layout(layout: ImageLayout, source: str) -> None:
    """Keep ``layout``, merged from ``source``, under its digest (aside, then renamed: a reader never sees half
    of one)."""
    write_cache_file(_path(layout.digest(), source), zlib.compress(layout.to_bytes(), 6))
