"""erofs-mount source ``tar:PATH``: a tar archive mounted as EROFS, without extracting it.

    erofs-mount mount --source tar:/srv/rootfs.tar.gz /mnt/rootfs

The archive (plain, gzip or zstd, recognized by its content, not its name)
is read once, in one pass: its headers give the tree, and the sha256 of
every 1 MiB span of its uncompressed stream is taken, with what random
access needs (gzip checkpoints, zstd frames). That index is kept in the
cache directory ($EROFS_MOUNT_CACHE_DIR, default /var/cache/erofs-mount),
so mounting the same file again and every reattach start without reading
the archive. erofs-mount then serves an EROFS image made for it: its
metadata from the index, each file's blocks from the archive's stream where
the file's bytes already are (no copy, no alignment needed, so kernels from
6.1 on mount it), every span checked against its hash before it is served.
Ownership, modes (setuid included), nanosecond times, xattrs from PAX
headers, hardlinks, devices and FIFOs are kept; OCI whiteouts become what
overlayfs reads (``.wh.NAME`` a 0/0 character device, ``.wh..wh..opq`` the
xattr ``trusted.overlay.opaque=y``), so single layers stack with overlayfs.

Options: ``cache-mib=N`` (decompressed spans kept in memory, default 256),
``readahead-kib=N`` (read ahead on sequential reads, default 4096).
Reattach reopens the path and refuses unless it is still the same file
(device, inode, size, modification and change time) and gives the same
image.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from erofs_mount_core import CacheSettings, Source, hookimpl

#: the tar library's public face, for the plugins that read tar layers (oci): what it names loads on first use,
#: so that loading this plugin imports none of it
_EXPORTS = {
    "ArchiveError": ("streams", "ArchiveError"),
    "ArchiveIndex": ("index", "ArchiveIndex"),
    "Meter": ("progress", "Meter"),
    "Parts": ("progress", "Parts"),
    "Progress": ("progress", "Progress"),
    "build_index": ("index", "build"),
    "load_index": ("index", "load"),
    "load_layout": ("layouts", "load_layout"),
    "merge_layers": ("merge", "merge"),
    "store_index": ("index", "store"),
    "store_layout": ("layouts", "store_layout"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'erofs_mount_tar' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


SCHEME = "tar"
OPTIONS = ("cache-mib", "readahead-kib")


@hookimpl
def erofs_mount_schemes() -> dict[str, str]:
    return {SCHEME: "a tar archive (plain, gzip, zstd), mounted as EROFS without extracting it: tar:PATH"}


@hookimpl
def erofs_mount_source_options() -> tuple[str, ...]:
    return OPTIONS


@hookimpl
def erofs_mount_open_source(location: str, options: Mapping[str, str]) -> Source:
    import sys

    from erofs_mount_local import LocalFile

    from .tar_image import mount_archive  # the indexer and the image builder load only when an archive is opened

    cache = CacheSettings.parse(options, SCHEME)  # (the host refused names it does not declare)
    return mount_archive(LocalFile(location), cache, progress=sys.stderr.isatty())


@hookimpl
def erofs_mount_deserialize_source(state: Mapping[str, Any]) -> Source:
    from erofs_mount_local import reopen

    from .tar_image import reattach_archive

    return reattach_archive(reopen(state, what="archive"), state)
