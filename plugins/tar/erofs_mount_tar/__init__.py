"""erofs-mount source ``tar:PATH``: a tar archive mounted as EROFS, without extracting it.

    erofs-mount mount --source tar:/srv/rootfs.tar /mnt/rootfs

The archive's headers are read once; erofs-mount then serves an EROFS image
made for it: its metadata built in memory, each file's blocks read from the
archive where the file's bytes already are (no copy, no conversion, no
alignment needed, so kernels from 6.1 on mount it). Ownership, modes
(setuid included), nanosecond times, xattrs from PAX headers, hardlinks,
devices and FIFOs are kept; OCI whiteouts become what overlayfs reads
(``.wh.NAME`` a 0/0 character device, ``.wh..wh..opq`` the xattr
``trusted.overlay.opaque=y``), so single layers stack with overlayfs.

The archive is recognized by its content, not its name. This release reads
uncompressed archives; tar.gz and tar.zst are refused with a clear error.

Options: none. Reattach reopens the path and refuses unless it is still the
same file (device, inode, size, modification and change time).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any

from erofs_mount_core import Source, SourceChangedError, SourceError, SynthesizedImage, UsageError, hookimpl

SCHEME = "tar"
_IDENTITY = ("device", "inode", "size", "mtime_ns", "ctime_ns")
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"


class ArchiveFile(Source):
    """The archive's bytes: the stream the image's files are read from."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SourceError(f"{path}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{path}: cannot open: {exc.strerror}") from None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise SourceError(f"{path}: not a regular file")
        self._size = st.st_size
        self.identity = {"device": st.st_dev, "inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                         "ctime_ns": st.st_ctime_ns}

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self.path}: read failed: {exc.strerror}", transient=True) from exc
        if len(data) != length:
            raise SourceError(f"{self.path}: the archive shrank under a read at {offset}")
        return data

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)


class TarImage(SynthesizedImage):
    """The EROFS image of one archive."""

    def __init__(self, archive: ArchiveFile) -> None:
        from .tree import read_tree

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
        return {"path": self.archive.path, **self.archive.identity}


def open_archive(path: str) -> TarImage:
    archive = ArchiveFile(path)
    try:
        return TarImage(archive)
    except BaseException:
        archive.close()
        raise


@hookimpl
def erofs_mount_schemes() -> dict[str, str]:
    return {SCHEME: "a tar archive, mounted as EROFS without extracting it: tar:PATH"}


@hookimpl
def erofs_mount_open_source(location: str, options: Mapping[str, str]) -> Source:
    if options:
        raise UsageError(f"tar: unknown option(s): {', '.join(sorted(options))}")
    return open_archive(location)


@hookimpl
def erofs_mount_deserialize_source(state: Mapping[str, Any]) -> Source:
    try:
        path = str(state["path"])
        recorded = {k: int(state[k]) for k in _IDENTITY}
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"tar: record state is incomplete ({exc})") from exc
    archive = ArchiveFile(path)
    changed = [k for k in _IDENTITY if archive.identity[k] != recorded[k]]
    if changed:
        archive.close()
        raise SourceChangedError(f"{path} is no longer the archive that was mounted ({', '.join(changed)} changed): "
                                 "refusing to serve other bytes under the mounted filesystem")
    try:
        return TarImage(archive)
    except BaseException:
        archive.close()
        raise
