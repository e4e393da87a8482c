"""Images of tar layers: the whole image merged into one EROFS, or one layer as it is.

Both are synthesized images (see ``erofs_mount_core.SynthesizedImage``)
whose metadata comes from the layers' indexes and whose files' blocks come
from the layers' uncompressed streams, each stream read from its blob with
range requests and every span of it checked against the hash taken when
the layer was indexed. The whole image lays the layers' streams end to end
in one backing: a block goes to the layer that holds it. With a span store,
the spans checked are kept on disk under the layer's diff_id (the sha256 of
its stream), for every later mount of an image that holds the same layer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from erofs_mount_tar import ArchiveIndex, TarImage, TocIndex, TocPosition, verified_stream

from erofs_mount_core import (
    BlockCache,
    CacheSettings,
    Counters,
    FillJob,
    Filter,
    Source,
    SourceChangedError,
    SourceError,
    SpanStore,
)

from .background_check import RATE_MIB, BackgroundCheck, Claim
from .blob import BlobSource
from .prefetch import TOC_UNIT, Fetcher, LayerUnits, ReadOrder, cached, list_name
from .registry import Layer, Registry
from .routing import distrust_served

if TYPE_CHECKING:
    from .layers import Indexed

log = logging.getLogger("erofs_mount.oci")

COMPRESSED_BLOCK = 64 << 10
FILL_BLOCK, FILL_READAHEAD = 1 << 20, 4 << 20  # a fill reads the compressed layer this many bytes at a time


class _Forgetting(Filter):
    """A failed read (a span that did not match its hash, a stream that would not inflate) drops what was
    made of the bytes below it: the compressed bytes cached, and the stream's decoder (rapidgzip keeps
    chunks it decoded, and a flipped byte in a stored block decodes without an error). The retry fetches
    the bytes again, and not from the mirror that served them (``routing.distrust_served``)."""

    #: decoders replaced after failures, kept until close (another thread may be reading with one)
    RETIRED = 8

    def __init__(self, open_verified: Callable[[], Source], compressed: BlockCache) -> None:
        super().__init__(open_verified())
        self._open, self.compressed = open_verified, compressed
        self._retired: list[Source] = []
        self._stale = False
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        if self._stale:
            self._reopen()
        try:
            return self.inner.pread(length, offset)
        except SourceError as exc:
            self.compressed.clear()
            distrust_served(str(exc))
            self._stale = True  # the next read (the retry) starts with a new decoder
            raise

    def _reopen(self) -> None:
        with self._lock:
            if not self._stale:
                return
            try:
                fresh = self._open()  # reads the stream's first bytes: they may fail too
            except SourceError as exc:
                raise SourceError(str(exc), transient=True) from None
            self._retired.append(self.inner)
            self.inner, self._stale = fresh, False
            if len(self._retired) > self.RETIRED:
                self._retired.pop(0).close()

    def close(self) -> None:
        for old in self._retired:
            old.close()
        super().close()


def _open_stream(index: ArchiveIndex, compressed: BlockCache, what: str) -> Source:
    """A stream reads its first bytes as it opens: bytes that will not open (from a mirror that lies) are
    dropped, their mirror distrusted, and fetched once more, from the next host."""
    try:
        return index.open_stream(compressed)
    except SourceError as exc:
        compressed.clear()
        distrust_served(f"{what}: {exc}")
    return index.open_stream(compressed)


class _Deferred(Source):
    """A layer's stream, opened at its first read, or beside serving (``opened``) when the span store lacks some
    of it: a daemon whose reads all come from the span store never fetches a byte to open a decoder, and one
    that will fetch does not make the kernel's first read wait for the decoder's start (a range request,
    and every checkpoint of the layer loaded: most of a second for a large layer on a small machine)."""

    def __init__(self, open_stream: Callable[[], Source], size: int) -> None:
        self._open, self._size = open_stream, size
        self._stream: Source | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def opened(self) -> Source:
        """The decoder, opened now if it is not yet (a read that comes meanwhile waits for this one)."""
        stream = self._stream
        if stream is None:
            with self._lock:
                if self._closed:
                    raise SourceError("the layer's stream is closed")
                if self._stream is None:
                    try:
                        self._stream = self._open()
                    except SourceError as exc:
                        raise SourceError(str(exc), transient=True) from None  # a new decoder may open
                    if self._closed:  # closed while it opened (close does not wait for an opening)
                        self.close()
                        raise SourceError("the layer's stream is closed")
                stream = self._stream
        return stream

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        return self.opened().pread(length, offset)

    def counters(self) -> Mapping[str, int]:
        return self._stream.counters() if self._stream is not None else {}

    def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


def _open_quietly(decoders: list[tuple[_Deferred, ArchiveIndex, SpanStore | None]]) -> None:
    """Each decoder whose layer the span store does not hold whole opened, in layer order; one that will not
    open now is opened again by its first read (which then says why)."""
    for decoder, index, kept in decoders:
        if kept is None or not kept.holds(index.stream_sha256, index.spans):
            with contextlib.suppress(SourceError):
                decoder.opened()


class LayersImage(TarImage):
    """The image of ``layers``: merged (``whole``) or, for one layer, as it is (whiteouts in overlayfs form)."""

    def __init__(self, registry: Registry, layers: list[Layer], found: list[ArchiveIndex | TocIndex],
                 cache: CacheSettings, state: Mapping[str, Any], *, whole: bool, description: str,
                 store: SpanStore | None = None, claims: Sequence[Claim] = ()) -> None:
        """``claims``: layers whose index an artifact gave unsigned, proven by a pass beside serving at the
        record's ``verify_rate_mib``; one found false refuses every read."""
        share = max(16, cache.cache_mib // len(layers))  # of the memory cache-mib allows, per layer:
        per_layer = CacheSettings(share - share // 4, cache.block_kib, cache.readahead_kib)  # decompressed spans
        streams: list[Source] = []
        self.fill_jobs: list[FillJob] = []
        self.store = store
        self.registry = registry
        units: list[LayerUnits] = []
        fetchers: list[Fetcher | None] = []
        budgets: list[int] = []
        self._prefetching: list[Source] = []  # the prefetch's own decoders: closed with the image
        #: the kernel's decoders, opened beside serving once it starts
        self._to_open: list[tuple[_Deferred, ArchiveIndex, SpanStore | None]] | None = []
        claimed = {int(row["index"]): str(row["diff_id"]) for row in state.get("layers", ())}
        #: layers served although their stream is not the config's diff_id (diff-id=report): ``stats`` counts them
        self.diff_id_mismatches = sum(1 for layer, index in zip(layers, found, strict=True)
                                      if isinstance(index, ArchiveIndex)
                                      and claimed.get(layer.index) not in (None, f"sha256:{index.stream_sha256}"))
        try:
            for layer, index in zip(layers, found, strict=True):
                if isinstance(index, TocIndex):  # its chunks fetched and checked one by one: no decoder, no store
                    blob = BlobSource(registry.client, registry.blob_url(layer.digest), layer.digest, layer.size,
                                      description=f"{registry.ref} layer {layer.index}", state={},
                                      digest_along=False, owns_client=False)
                    chunks = index.open_stream(blob, share << 18, f"oci: layer {layer.index} ({layer.digest[:19]}…)",
                                               rejected=distrust_served)
                    streams.append(per_layer.wrap(chunks))  # checked bytes kept, read ahead when sequential
                    units.append(LayerUnits(layer.digest, "toc", TOC_UNIT))
                    fetchers.append(_units_of(chunks, TOC_UNIT))  # no lock held while it fetches
                    budgets.append(share << 18)  # what its chunk cache holds
                    continue
                blob = BlobSource(registry.client, registry.blob_url(layer.digest), layer.digest, layer.size,
                                  description=f"{registry.ref} layer {layer.index}", state={},
                                  digest_along=False)
                # and compressed bytes: reads of neighbouring spans start from the same checkpoint
                compressed = BlockCache(blob, block_size=COMPRESSED_BLOCK, cache_bytes=(share // 4) << 20,
                                        readahead=0)
                what = f"oci: layer {layer.index} ({layer.digest[:19]}…)"
                # a zstd layer without frames is unpacked on this disk already: not kept twice
                kept = None if index.unpacked else store

                def open_verified(index: ArchiveIndex = index, compressed: BlockCache = compressed,
                                  what: str = what, kept: SpanStore | None = kept) -> Source:
                    stream = _Deferred(lambda: _open_stream(index, compressed, what), index.stream_size)
                    if self._to_open is not None:  # (one made again after a failure opens at its read)
                        self._to_open.append((stream, index, kept))
                    return verified_stream(index, stream, per_layer, what, transient=True, store=kept)

                streams.append(_Forgetting(open_verified, compressed))
                units.append(LayerUnits(layer.digest, "archive", index.spans.span_size))
                if kept is not None:
                    job = FillJob(_fill_from(index, registry, layer, what), index.spans, index.stream_sha256, what)
                    self.fill_jobs.append(job)
                    # a decoder of its own (the kernel's reads never wait on it) over the same compressed bytes
                    # (fetched once, whichever decoder asks first; the cache fetches without holding its lock)
                    prefetching = verified_stream(
                        index, _Deferred(lambda index=index, compressed=compressed, what=what:
                                         _open_stream(index, compressed, what), index.stream_size),
                        CacheSettings(1, cache.block_kib, 0), what, transient=True, store=kept)
                    self._prefetching.append(prefetching)
                    fetchers.append(_units_of(prefetching, index.spans.span_size))  # into the span store
                    budgets.append(kept.max_bytes // 2)
                else:
                    fetchers.append(None)  # nowhere the kernel's reads would find what it fetched
                    budgets.append(0)
            # the order a daemon of this image read it in, here or (with its index) on the host that published it
            image = list_name(str(state.get("manifest_digest", "")))
            name = image if whole else list_name(str(state["manifest_digest"]), layers[0].index)
            self.order = ReadOrder(name, units, cached(name) or cached(image), fetchers, budgets)
            streams = [self.order.recorded(n, stream) for n, stream in enumerate(streams)]
        except BaseException:
            for stream in [*streams, *self._prefetching]:
                stream.close()
            registry.client.close()
            raise
        self._refused: str | None = None
        self.check = BackgroundCheck(registry, list(claims), int(state.get("verify_rate_mib", RATE_MIB)) << 20,
                                     self._refuse)
        pinned = state.get("image_sha256")
        own = {k: v for k, v in state.items() if k != "image_sha256"}
        try:
            super().__init__(found, streams, description=description, merged=whole, state=own,
                             pinned=pinned if isinstance(pinned, str) else None)
        except BaseException:
            for stream in self._prefetching:
                stream.close()
            registry.client.close()
            raise

    def filling(self) -> Source:
        """This image, which fills the span store with every layer's stream once it serves."""
        if self.store is None:
            return self
        total = sum(job.spans.spans * job.spans.span_size for job in self.fill_jobs)
        if total > self.store.max_bytes:
            self.close()
            raise SourceError(f"oci: fill: the layers' {total >> 20} MiB do not fit the span store's "
                              f"{self.store.max_bytes >> 20} MiB (disk-cache-mib)")
        return self.store.filling(self, self.fill_jobs)

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        if self._refused is not None:  # (the line that says why was logged once)
            raise SourceError("refused: a background pass found what the image was made from false")
        return super().pread(length, offset)

    def _refuse(self, why: str) -> None:
        self._refused = why

    def refusal(self) -> str | None:
        return self._refused

    def start_background(self) -> None:
        super().start_background()
        to_open, self._to_open = self._to_open or [], None
        if to_open:
            threading.Thread(target=_open_quietly, args=(to_open,), name="open-decoders", daemon=True).start()
        self.order.start()
        self.check.start()

    def counters(self) -> Mapping[str, int]:
        # what the prefetch found in the span store (a span changed on disk, say); its decoders read the same
        # compressed bytes as the kernel's reads, whose traffic is counted there already
        stored = [{k: v for k, v in stream.counters().items() if k.startswith("span_store_")}
                  for stream in self._prefetching]
        counted = Counters().snapshot(super().counters(), self.order.counters(), self.check.counters(), *stored)
        return {**counted, "diff_id_mismatches": self.diff_id_mismatches} if self.diff_id_mismatches else counted

    def close(self) -> None:
        try:
            self.check.close()
            self.order.close()
            for stream in self._prefetching:
                stream.close()
            super().close()
        finally:
            self.registry.client.close()


def _units_of(stream: Source, unit: int) -> Fetcher:
    """Prefetch of ``count`` units of ``stream`` from unit ``first`` on, in one read through it, which keeps
    what it checked where reads look."""
    def fetch(first: int, count: int) -> int:
        start = first * unit
        if start >= stream.size:
            return 0
        return len(stream.pread(min(count * unit, stream.size - start), start))
    return fetch


def _fill_from(index: ArchiveIndex, registry: Registry, layer: Layer, what: str) -> Callable[[], Source]:
    """A layer's stream decoded by a decoder of its own, over large range requests of the blob (the
    client is serving's: closing the fill's sources leaves it open)."""
    def opened() -> Source:
        blob = BlobSource(registry.client, registry.blob_url(layer.digest), layer.digest, layer.size,
                          description=what, state={}, digest_along=False, owns_client=False)
        compressed = BlockCache(blob, block_size=FILL_BLOCK, cache_bytes=FILL_READAHEAD + FILL_BLOCK,
                                readahead=FILL_READAHEAD)
        return _open_stream(index, compressed, what)
    return opened


def layer_state(layers: list[Layer], diff_ids: list[str]) -> list[dict[str, Any]]:
    return [{"digest": layer.digest, "size": layer.size, "media_type": layer.media_type, "index": layer.index,
             "diff_id": diff_id, **({"toc": layer.toc.to_state()} if layer.toc is not None else {})}
            for layer, diff_id in zip(layers, diff_ids, strict=True)]


def layers_of_state(state: Mapping[str, Any]) -> tuple[list[Layer], list[str]]:
    try:
        rows = list(state["layers"])
        layers = [Layer(str(state["manifest_digest"]), str(r["digest"]), int(r["size"]), str(r["media_type"]),
                        int(r["index"]), str(state["platform"]),
                        TocPosition.from_state(r["toc"]) if "toc" in r else None) for r in rows]
        ids = [str(r["diff_id"]) for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"oci: record state is incomplete ({exc})") from None
    if not layers:
        raise SourceError("oci: record state names no layers")
    return layers, ids


def reopen_layers(registry: Registry, state: Mapping[str, Any], cache: CacheSettings, *, whole: bool,
                  description: str, store: SpanStore | None = None) -> LayersImage:
    """The image the record pins: every layer still in the registry (by digest), indexed as before,
    and the very same image made of them; refused otherwise."""
    layers, diff_ids = layers_of_state(state)
    unreachable: dict[int, SourceError] = {}
    for n, layer in enumerate(layers):
        try:
            found = registry.blob_size(layer.digest)  # a blob that is gone refuses the reattach here
        except SourceError as exc:
            if not exc.transient or store is None:
                raise
            unreachable[n] = exc  # the registry is down: enough if the span store holds all of the layer
            continue
        if found != layer.size:
            raise SourceChangedError(f"oci: layer {layer.index} ({layer.digest}) is {found} bytes now, "
                                     f"{layer.size} when mounted")
    from .layers import PublishedPolicy, image_layers, indexed

    pinned = state.get("published_index")
    found = indexed(registry, layers, diff_ids, published=PublishedPolicy.of(
        str(state.get("index", "auto")), str(state.get("index_key", "")), pinned if isinstance(pinned, str) else None,
        keys_dir=str(state.get("index_keys_dir", "")), registry=str(state.get("registry", "")),
        unsigned=state.get("verify") == "background"),
        strict_diff_id=state.get("diff_id") == "strict", store=store,
        image=None if whole else image_layers(registry, None, layers[0].manifest_digest, layers[0].platform))
    for n, exc in unreachable.items():
        index = found.indexes[n]
        if store is None or isinstance(index, TocIndex) or index.unpacked or \
                not store.holds(index.stream_sha256, index.spans):
            raise exc
        log.warning("oci: layer %d: %s; every span of it is in the span store: served from there",
                    layers[n].index, exc)
    if not isinstance(state.get("image_sha256"), str):
        raise SourceError("oci: record state is incomplete (image_sha256)")
    return LayersImage(registry, layers, found.indexes, cache, state, whole=whole, description=description,
                       store=store, claims=claims_of(layers, found, background=state.get("verify") == "background"))


def claims_of(layers: list[Layer], found: Indexed, *, background: bool) -> list[Claim]:
    """Under ``verify=background``, what is to be proven: the layers whose index ``found`` took from an
    artifact no trusted key signed, and those mounted by their TOC."""
    if not background:
        return []
    claims = []
    for layer, index in zip(layers, found.indexes, strict=True):
        if isinstance(index, TocIndex):
            claims.append(Claim.toc(layer, index))
        elif layer.index in found.unproven:
            claims.append(Claim.published(layer, index, found.published or ""))
    return claims
