"""The EROFS image of one archive: its layout from the index, its files' bytes from the archive's stream, checked."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from erofs_mount_local import LocalFile

from erofs_mount_core import (
    CacheSettings,
    SourceChangedError,
    SourceError,
    SynthesizedImage,
    open_cache_file,
    write_cache_file,
)

from . import index as indexes


class TarImage(SynthesizedImage):
    """Every span of the stream is checked against the index's hash before a byte of it is served."""

    def __init__(self, archive: LocalFile, index: indexes.ArchiveIndex, cache: CacheSettings) -> None:
        stream = index.open_stream(archive)
        what = f"tar: {archive.path}"
        backing = index.spans.verified(stream, cache, what)
        unpacked = ", unpacked in the cache" if index.unpacked else ""
        super().__init__(index.image_layout(), backing, f"{archive.path} ({index.compression}{unpacked})")
        self.archive, self.index, self.cache = archive, index, cache
        self.image_sha256 = self.layout.digest()

    def state(self) -> dict[str, Any]:
        return {**self.archive.state(), "archive_sha256": self.index.archive_sha256,
                "image_sha256": self.image_sha256, **self.cache.to_state()}

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.index.compression != "tar":  # a plain archive is the stream: closed with it
                self.archive.close()


def mount_archive(archive: LocalFile, cache: CacheSettings, *, progress: bool) -> TarImage:
    """The archive's image, indexed now unless the cache holds this very file's index."""
    try:
        return TarImage(archive, _index_of_file(archive, progress), cache)
    except BaseException:
        archive.close()
        raise


def _index_of_file(archive: LocalFile, progress: bool) -> indexes.ArchiveIndex:
    """The cached index if this very file (device, inode, size, times) was indexed before, else a new one."""
    alias = indexes.alias_path(":".join(str(archive.identity[k]) for k in sorted(archive.identity)))
    fd = open_cache_file(alias)
    if fd is not None:
        with os.fdopen(fd, "rb") as f:
            known = f.read(64).decode("ascii", "replace")
        index = indexes.load(known) if len(known) == 64 else None
        if index is not None and index.archive_size == archive.size:
            return index
    index = indexes.build(archive, archive.path, progress=progress)
    indexes.store(index)
    write_cache_file(alias, index.archive_sha256.encode())
    return index


def reattach_archive(archive: LocalFile, state: Mapping[str, Any]) -> TarImage:
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
            index = indexes.build(archive, archive.path)
            if index.archive_sha256 != sha256:
                raise SourceChangedError(f"tar: {archive.path} is no longer the archive that was mounted "
                                         f"(sha256 {index.archive_sha256[:16]}…, not {sha256[:16]}…)")
            indexes.store(index)
        if index.image_layout().digest() != image:
            raise SourceChangedError(f"tar: {archive.path} now gives another image than the one mounted "
                                     "(the index was made by another erofs-mount version)")
        return TarImage(archive, index, cache)
    except BaseException:
        archive.close()
        raise
