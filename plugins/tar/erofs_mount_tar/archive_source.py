"""The ``tar:`` source: an archive, a local file or another source's bytes, indexed once and served as a TarImage.

An index is found again without reading the archive by a key that pins the
archive's bytes: a local file's identity (device, inode, size, times) or,
for an archive that is another source's bytes, that source's record, which
every source keeps precise enough for reattach to refuse other bytes. A
key that still led to another archive's index would be caught anyway: the
sizes must agree, and every span is checked against the index's hash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from erofs_mount_core import CacheSettings, Source, SourceChangedError, SourceError, open_cache_file, write_cache_file

from . import index as indexes
from .assembly import TarImage, verified_stream


def mount_archive(archive: Source, cache: CacheSettings, *, progress: bool,
                  inner: Mapping[str, Any] | None = None) -> TarImage:
    """The archive's image, indexed now unless the cache holds this very archive's index. ``inner``: the
    record of the source whose bytes the archive is (None: a local file, whose state is the archive's)."""
    try:
        return _image(archive, _index_of(archive, inner, progress), cache, inner)
    except BaseException:
        archive.close()
        raise


def reattach_archive(archive: Source, state: Mapping[str, Any], inner: Mapping[str, Any] | None = None) -> TarImage:
    """The image served at mount: the cached index if it is there, else the archive indexed again,
    and refused unless it gives the very same image."""
    try:
        try:
            sha256, image = str(state["archive_sha256"]), str(state["image_sha256"])
            cache = CacheSettings.from_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"tar: record state is incomplete ({exc})") from None
        index = indexes.load(sha256)
        if index is None:
            index = indexes.build(archive, archive.describe())
            if index.archive_sha256 != sha256:
                raise SourceChangedError(f"tar: {archive.describe()} is no longer the archive that was mounted "
                                         f"(sha256 {index.archive_sha256[:16]}…, not {sha256[:16]}…)")
            indexes.store(index)
    except BaseException:
        archive.close()
        raise
    return _image(archive, index, cache, inner, pinned=image)


def _image(archive: Source, index: indexes.ArchiveIndex, cache: CacheSettings, inner: Mapping[str, Any] | None,
           pinned: str | None = None) -> TarImage:
    where = archive.describe()
    stream = verified_stream(index, index.open_stream(archive), cache, f"tar: {where}")
    own = {"inner": dict(inner)} if inner is not None else dict(archive.state() or {})
    unpacked = ", unpacked in the cache" if index.unpacked else ""
    return TarImage([index], [stream], description=f"{where} ({index.compression}{unpacked})", merged=False,
                    state={**own, "archive_sha256": index.archive_sha256, **cache.to_state()}, pinned=pinned,
                    # a plain archive is its own stream, closed with it
                    closing=[archive] if index.compression != "tar" else [])


def _index_of(archive: Source, inner: Mapping[str, Any] | None, progress: bool) -> indexes.ArchiveIndex:
    """The cached index if this very archive was indexed before (by its key), else a new one."""
    alias = indexes.alias_path(_key(archive, inner))
    fd = open_cache_file(alias)
    if fd is not None:
        with os.fdopen(fd, "rb") as f:
            known = f.read(64).decode("ascii", "replace")
        index = indexes.load(known) if len(known) == 64 else None
        if index is not None and index.archive_size == archive.size:
            return index
    index = indexes.build(archive, archive.describe(), progress=progress)
    indexes.store(index)
    write_cache_file(alias, index.archive_sha256.encode())
    return index


def _key(archive: Source, inner: Mapping[str, Any] | None) -> str:
    if inner is None:
        identity = getattr(archive, "identity", {})
        return ":".join(str(identity[k]) for k in sorted(identity))
    # the source's record, without the cache settings that do not change its bytes
    pinned = {**inner, "state": {k: v for k, v in dict(inner["state"]).items() if k not in _CACHE_KEYS}}
    return "source:" + json.dumps(pinned, sort_keys=True, default=str)


_CACHE_KEYS = frozenset(CacheSettings().to_state())
