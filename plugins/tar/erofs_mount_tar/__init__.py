"""erofs-mount source ``tar:PATH`` or ``tar:SOURCE``: a tar archive mounted as EROFS, without extracting it.

    erofs-mount mount --source tar:/srv/rootfs.tar.gz /mnt/rootfs
    erofs-mount mount --source tar:s3:bucket/rootfs.tar.gz -o endpoint=http://127.0.0.1:9000 /mnt/rootfs

The archive is a local file, or the bytes of any other installed source
when the location starts with its scheme (``s3:``, ``local:``...): that
source takes the options tar does not, and the record keeps its state.

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
image; another source is reopened from its own state, and refuses the same
way when its bytes changed.

The image assembly is public, for plugins that read tar layers (oci):
``TarImage`` and ``verified_stream`` (see ``erofs_mount_tar.assembly``),
with the index's ``build_index``, ``load_index`` and ``store_index``, and
for layers that carry a table of contents (zstd:chunked, eStargz)
``TocPosition``, ``fetch_toc``, ``load_toc`` and ``TocIndex`` (see
``erofs_mount_tar.toc``), with ``cached_toc`` and ``store_toc``, which keep
a TOC's index (``erofs_mount_tar.toc_cache``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from erofs_mount_core import CacheSettings, InnerSource, Source, hookimpl

#: the tar library's public face, for the plugins that read tar layers (oci): what it names loads on first use,
#: so that loading this plugin imports none of it
_EXPORTS = {
    "ArchiveError": ("streams", "ArchiveError"),
    "ArchiveIndex": ("index", "ArchiveIndex"),
    "Meter": ("progress", "Meter"),
    "Parts": ("progress", "Parts"),
    "Progress": ("progress", "Progress"),
    "TarImage": ("assembly", "TarImage"),
    "TocIndex": ("toc", "TocIndex"),
    "TocLacks": ("toc", "TocLacks"),
    "TocPosition": ("toc", "TocPosition"),
    "build_index": ("index", "build"),
    "cached_toc": ("toc_cache", "cached_toc"),
    "fetch_toc": ("toc", "fetch_toc"),
    "load_toc": ("toc", "load_toc"),
    "store_toc": ("toc_cache", "store_toc"),
    "load_index": ("index", "load"),
    "store_index": ("index", "store"),
    "toc_differences": ("toc_check", "differences"),
    "verified_stream": ("assembly", "verified_stream"),
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
    return {SCHEME: "a tar archive (plain, gzip, zstd), mounted as EROFS without extracting it: "
                   "tar:PATH or tar:SCHEME:LOCATION"}


@hookimpl
def erofs_mount_source_options() -> tuple[str, ...]:
    return OPTIONS


@hookimpl
def erofs_mount_wrapping_schemes() -> tuple[str, ...]:
    return (SCHEME,)


@hookimpl
def erofs_mount_open_source(location: str, options: Mapping[str, str], inner: InnerSource | None) -> Source:
    import sys

    from .archive_source import mount_archive  # the indexer and the image builder load only when opened

    cache = CacheSettings.parse(options, SCHEME)  # (the host refused names it does not declare)
    if inner is not None:
        return mount_archive(inner.source, cache, progress=sys.stderr.isatty(), inner=inner.record())
    from erofs_mount_local import LocalFile

    return mount_archive(LocalFile(location), cache, progress=sys.stderr.isatty())


@hookimpl
def erofs_mount_deserialize_source(state: Mapping[str, Any], inner: InnerSource | None) -> Source:
    from .archive_source import reattach_archive

    if inner is not None:
        return reattach_archive(inner.source, state, inner=inner.record())
    from erofs_mount_local import reopen

    return reattach_archive(reopen(state, what="archive"), state)
