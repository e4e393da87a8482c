"""The EROFS image of tar streams: one archive as it is, or an image's layers merged, every span checked.

This is the one place where the chain is written: an archive's index gives
the metadata, its uncompressed stream (``ArchiveIndex.open_stream``) gives
the files' bytes, each span checked against the hash the index holds
(``verified_stream``) before a byte of it is served, and the image is pinned
by its layout's digest (``image_sha256``), which a reopen must give again.
The ``tar:`` source serves one archive this way and the ``oci`` source an
image's layers; a plugin for another layered format builds on it the same
way, through the package's face::

    from erofs_mount_tar import TarImage, verified_stream

    streams = [verified_stream(index, index.open_stream(blob), cache, "layer 0") for ...]
    image = TarImage(indexes, streams, description="...", merged=True, state={...}, pinned=None)
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from erofs_mount_core import (
    CacheSettings,
    Counters,
    ImageLayout,
    Source,
    SourceChangedError,
    SourceError,
    SpanStore,
    SynthesizedImage,
)

from .entries import Tree
from .index import ArchiveIndex
from .layouts import load_layout, made_from, store_layout
from .merge import merge


class LayerIndex(Protocol):
    """What the image needs of a layer: its tree (an ``ArchiveIndex``, or a ``TocIndex`` of a layer that
    carries a table of contents)."""

    tree: bytes
    """the tree, packed (what a merged layout is made from)"""

    def read_tree(self, base: int = 0) -> Tree: ...

    def image_layout(self) -> ImageLayout: ...


def verified_stream(index: ArchiveIndex, stream: Source, cache: CacheSettings, what: str, *,
                    transient: bool = False, store: SpanStore | None = None) -> Source:
    """``stream`` (the archive's uncompressed stream) read only in spans that match the index's hashes;
    with ``store``, the spans checked are kept on disk under the stream's sha256 and served from there."""
    return index.spans.verified(stream, cache, what, transient=transient, store=store,
                                stream=index.stream_sha256 if store is not None else "")


class Layered(Source):
    """Streams end to end: offset ``base[i] + n`` is byte n of stream i (a file's bytes never straddle two)."""

    def __init__(self, streams: list[Source]) -> None:
        self.streams = streams
        self.bases = []
        base = 0
        for stream in streams:
            self.bases.append(base)
            base += stream.size
        self._size = base

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        i = bisect_right(self.bases, offset) - 1
        into = offset - self.bases[i]
        if into + length > self.streams[i].size:
            raise SourceError(f"a read of {length} bytes at {offset} runs past layer {i}'s stream")
        return self.streams[i].pread(length, into)

    def counters(self) -> Mapping[str, int]:
        return Counters().snapshot(*(stream.counters() for stream in self.streams))

    def close(self) -> None:
        for stream in self.streams:
            stream.close()


class TarImage(SynthesizedImage):
    """The image of ``indexes``' archives, their checked streams ``streams`` in the same order.

    ``merged``: the layers applied in order as the OCI image spec says (the
    root filesystem a container sees). Otherwise one archive as it is
    (whiteouts in overlayfs form, for stacking: a snapshotter's layer). Either
    layout is kept in the cache by its digest, so that a reopen (the daemon
    after its mount, a reattach) loads it instead of making it again. ``pinned``:
    the ``image_sha256`` a record holds; an image that comes out otherwise
    is refused (SourceChangedError), since serving other metadata under a
    mounted filesystem corrupts it. ``closing``: sources the image owns
    besides the streams (an archive under its decoder), closed with it.
    """

    def __init__(self, indexes: Sequence[LayerIndex], streams: list[Source], *, description: str, merged: bool,
                 state: Mapping[str, Any], pinned: str | None = None, closing: Iterable[Source] = ()) -> None:
        self._closing = list(closing)
        backing: Source = streams[0] if len(streams) == 1 and not merged else Layered(streams)
        try:
            if len(indexes) != len(streams) or not streams or (len(streams) > 1 and not merged):
                raise ValueError("one checked stream per index, and several only when merged")
            layout = _layout(indexes, backing, merged, pinned)
            if pinned is not None and layout.digest() != pinned:
                raise SourceChangedError(f"{description} now gives another image than the one mounted "
                                         "(its archives were indexed by another erofs-mount version)")
        except BaseException:
            self._close_all(backing)
            raise
        super().__init__(layout, backing, description)
        self.indexes = indexes
        self.image_sha256 = layout.digest()
        self._state = {**state, "image_sha256": self.image_sha256}

    def state(self) -> dict[str, Any]:
        return dict(self._state)

    def close(self) -> None:
        try:
            super().close()
        finally:
            for source in self._closing:
                source.close()

    def _close_all(self, backing: Source) -> None:
        try:
            backing.close()
        finally:
            for source in self._closing:
                source.close()


def _layout(indexes: Sequence[LayerIndex], backing: Source, merged: bool, pinned: str | None) -> ImageLayout:
    """The image's layout: kept in its index (a tar archive's), kept in the cache, or made (and kept)."""
    own = getattr(indexes[0], "layout", None)  # (an archive index may keep its archive's; a TOC never does)
    if not merged and own is not None:
        return own
    bases = backing.bases if isinstance(backing, Layered) else [0]
    source = made_from((index.tree for index in indexes), bases, merged)
    layout = load_layout(pinned, source) if pinned is not None else None
    if layout is None:
        layout = ImageLayout.of(merge([index.read_tree(base) for index, base in zip(indexes, bases, strict=True)])) \
            if merged else indexes[0].image_layout()
        store_layout(layout, source)
    return layout
