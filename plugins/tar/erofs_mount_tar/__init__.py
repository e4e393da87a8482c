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

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from erofs_mount_core import Source, UsageError, hookimpl

if TYPE_CHECKING:
    from .image import TarImage

SCHEME = "tar"


def open_archive(path: str) -> TarImage:
    from erofs_mount_local import LocalFile

    from .image import serve_archive  # the image builder loads only when an archive is opened

    return serve_archive(LocalFile(path))


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
    from erofs_mount_local import reopen

    from .image import serve_archive

    return serve_archive(reopen(state, what="archive"))
