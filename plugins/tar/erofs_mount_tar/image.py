"""The EROFS image of one archive: its tree read from the headers, its files' blocks from the archive."""

from __future__ import annotations

from typing import Any

from erofs_mount_local import LocalFile

from erofs_mount_core import SynthesizedImage, UsageError

from .tree import read_tree

GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


class TarImage(SynthesizedImage):
    """Served from ``archive`` (a local file, checked by identity on reattach as ``local:`` files are)."""

    def __init__(self, archive: LocalFile) -> None:
        head = archive.pread(min(512, archive.size), 0)
        if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
            kind = "gzip" if head.startswith(GZIP_MAGIC) else "zstd"
            raise UsageError(f"tar: {archive.path} is {kind}-compressed; this release mounts uncompressed "
                             "archives only (decompress it first)")
        with open(archive.fileno(), "rb", closefd=False) as f:
            root = read_tree(f, archive.path)
        super().__init__(root, archive, archive.path)
        self.archive = archive

    def state(self) -> dict[str, Any]:
        return self.archive.state()


def serve_archive(archive: LocalFile) -> TarImage:
    """The archive's image; the archive is closed if it cannot be made."""
    try:
        return TarImage(archive)
    except BaseException:
        archive.close()
        raise
