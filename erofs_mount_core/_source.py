"""The Source interface: the bytes of one image, wherever they live.

A plugin's ``erofs_mount_open_source`` hook returns a ``Source``; the NBD
server calls ``pread`` from one thread per kernel connection, so
implementations must be safe to call concurrently.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import attrs


class Source(abc.ABC):
    """A read-only, fixed-size byte range served to the kernel."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The image size in bytes. It never changes while the source is open."""

    @abc.abstractmethod
    def pread(self, length: int, offset: int) -> bytes | memoryview:
        """Return exactly ``length`` bytes at ``offset``.

        ``bytes``, or a ``memoryview`` of immutable bytes the source already
        holds (a cache block), which is sent without a copy.

        The server guarantees ``0 <= offset`` and ``offset + length <= size``.
        Raise ``SourceError(transient=True)`` for failures a retry may cure
        (a network hiccup); the server retries those with back-off and
        answers the kernel with EIO only when they persist.
        """

    def fileno(self) -> int | None:
        """A file descriptor whose bytes are the source's at the same offsets, or None.

        ``erofs-mount serve`` then sends data with sendfile(2), without
        copying it through Python. Only sources whose bytes are a local file
        (or block device) have one.
        """
        return None

    def describe(self) -> str:
        """One line for ``erofs-mount list``: what is being served."""
        return type(self).__name__

    def state(self) -> Mapping[str, Any] | None:
        """What reattach needs to open these same bytes again, as a TOML-safe mapping.

        The plugin's ``erofs_mount_deserialize_source`` hook gets it back.
        Record where the bytes are and their identity (inode and mtime, a
        digest, an ETag), never a secret. ``None`` (the default) means the
        plugin still answers the deprecated ``erofs_mount_serialize_source``
        hook instead.
        """
        return None

    def counters(self) -> Mapping[str, int]:
        """What this source has done so far, for ``erofs-mount stats`` and ``metrics``.

        Counters that only grow, named in snake case: ``http_requests``,
        ``http_bytes``, ``cache_hits``, ``decompressed_bytes``... Keep them in
        a ``Counters`` (safe from every serving thread) and return its
        ``snapshot()``. A filter adds its own to its inner source's.
        """
        return {}

    def refusal(self) -> str | None:
        """Why every read fails from now on, or None (the default): a check beside serving found bytes that are
        not the ones pinned (an index whose tree the layer does not hold, say). ``list`` then shows the device
        as ``refused``, with this line."""
        return None

    def start_background(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Start work that runs beside serving (filling a cache), on threads of the source's own.

        Called once by the process that serves the kernel or an NBD client,
        when it starts serving; never for a source opened only to be checked
        (as ``mount`` does before its daemon starts). ``close`` stops it.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release files and connections. Called once, after the last ``pread``."""


@attrs.frozen
class InnerSource:
    """The source that a wrapping scheme's location names (``gz:web:http://host/app.erofs.gz``), opened by the
    host and handed to the wrapping plugin, which owns it (see ``hookspecs.erofs_mount_wrapping_schemes``)."""

    scheme: str
    source: Source
    state: Mapping[str, Any] = attrs.field(repr=False)
    """The inner source's recovery state, taken when it was opened."""

    def record(self) -> dict[str, Any]:
        """What the wrapping source keeps in its state under ``"inner"``, for reattach to open it again."""
        return {"scheme": self.scheme, "state": dict(self.state)}


def split_spec(spec: str) -> tuple[str, str]:
    """``"local:/srv/a.erofs"`` -> ``("local", "/srv/a.erofs")``."""
    from ._errors import UsageError

    scheme, sep, location = spec.partition(":")
    if not sep or not scheme or not location:
        raise UsageError(f"source {spec!r} is not of the form SCHEME:LOCATION (for example local:/srv/app.erofs)")
    if not (scheme[0].isalpha() and all(c.isalnum() or c in "+-." for c in scheme)):
        raise UsageError(f"source {spec!r}: {scheme!r} is not a valid source type name")
    return scheme, location
