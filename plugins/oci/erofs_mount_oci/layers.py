"""Tar layers indexed: by their table of contents, from the cache by their digest, or downloaded once each, in
parallel, and indexed on the way.

A layer that carries a table of contents (zstd:chunked) needs no pass: its
TOC is fetched with one range request (or found in the cache), checked
against the sha256 the pinned manifest gives for it, and gives the tree and
every chunk's sha256 (``erofs_mount_tar.toc``). Such a layer's uncompressed
stream is never read whole, so it is not checked against the config's
``diff_id``: what is served is what the TOC pins, chunk by chunk. A TOC
that lacks what the image needs sends its layer down the index path below.

The index of a layer is the tar library's (``erofs_mount_tar.index``),
kept under the layer's sha256, so an image that shares a base layer with
one mounted before indexes only its own layers, and ``tar:`` mounts of
the same blob share it too. Each index is compared with the image
config's ``diff_id`` (the sha256 of the layer's uncompressed stream), the
one a cached index recorded included. A stream that is not the
``diff_id`` is said in one line and served (``diff-id=report``): the
manifest pins the blob, every span served is checked against the hashes
taken from it, and some writers (skopeo's zstd:chunked) rewrite the stream
without changing its entries; ``diff-id=strict`` refuses such a layer.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from erofs_mount_tar import (
    ArchiveError,
    ArchiveIndex,
    Meter,
    Parts,
    Progress,
    TocIndex,
    build_index,
    cached_toc,
    fetch_toc,
    load_index,
    load_toc,
    store_index,
    store_toc,
)

from erofs_mount_core import (
    RetryPolicy,
    SourceChangedError,
    SourceError,
    SpanStore,
    cache_directory,
    cache_room,
)

from . import prefetch
from .blob import BlobSource
from .download import DOWNLOAD_DIR, Download, DownloadStopped
from .published import TrustedKeys
from .refused import why_refused
from .registry import Layer, Registry
from .routing import distrust_served, distrusted

log = logging.getLogger("erofs_mount.oci")

DOWNLOADS = 3  # layer transfers at once, as docker pulls


def passes(layers: int) -> tuple[int, int]:
    """Index passes at once, and the threads each decompresses with: one pass per CPU (up to four), each
    on one thread, outruns fewer passes on more threads each (measured: benches/oci_images.py); a lone
    pass takes every CPU."""
    cpus = os.cpu_count() or 1
    at_once = max(1, min(4, cpus, layers))
    return at_once, max(1, min(4, cpus // at_once))


@attrs.frozen
class PublishedPolicy:
    """Whether and how layers missing from the cache are taken from an index published to the registry."""

    mode: str = "auto"  # auto | off | required
    keys: TrustedKeys = attrs.field(factory=TrustedKeys)
    pinned: str | None = None
    """the artifact a record pins: reattach uses exactly that one"""
    unsigned: bool = False
    """an artifact no trusted key signed is used too, its indexes to be proven (``verify=background``)"""

    @classmethod
    def of(cls, mode: str, key: str, pinned: str | None = None, keys_dir: str = "",
           registry: str = "", *, unsigned: bool = False) -> PublishedPolicy:
        """From ``index=``, ``index-key=`` (a key file's path, "" for none) and ``index-keys-dir=`` (the
        registry's ``*.pub`` there, "" for none)."""
        from .hosts import trusted_files

        paths = [key] if key else []
        if keys_dir and mode != "off":
            paths += [str(p) for p in trusted_files(Path(keys_dir), registry, ".pub",
                                                     "its keys decide whose index root trusts")]
        return cls(mode, TrustedKeys.load(paths) if paths else TrustedKeys(), pinned, unsigned)


@attrs.frozen
class Indexed:
    """Each layer's index, in order; the published artifact that gave some of them, if one did; and the
    layers (by index in the manifest) whose index came from it unsigned: to be proven beside serving."""

    indexes: list[ArchiveIndex | TocIndex]
    published: str | None = None
    unproven: frozenset[int] = frozenset()


#: the whole image's tar layers and their diff_ids, fetched when needed
ImageLayers = Callable[[], tuple[list[Layer], list[str]]]


def image_layers(registry: Registry, manifest: dict[str, Any] | None, digest: str, platform: str) -> ImageLayers:
    """The image's every tar layer and diff_id, from ``manifest`` or (a reattach) its manifest fetched by
    ``digest``: what a layer mount needs to check a published index's signature, which covers them all."""
    def layers() -> tuple[list[Layer], list[str]]:
        doc = manifest if manifest is not None else registry.manifest(digest)[1]
        return registry.tar_layers(doc, digest, platform), registry.diff_ids(doc)
    return layers


def indexed(registry: Registry, layers: list[Layer], diff_ids: list[str], *, progress: bool = False,
            published: PublishedPolicy | None = None, strict_diff_id: bool = False,
            image: ImageLayers | None = None,
            store: SpanStore | None = None) -> Indexed:
    """Each layer's index, in order: its TOC's, or its archive index compared with its ``diff_ids`` entry
    (a mismatch refused when ``strict_diff_id``, else said); and what a published artifact gave, if one
    did. ``image``: the whole image's layers, when ``layers`` are some of them.
    ``store``: where a layer downloaded to be indexed leaves its stream's spans (within half its bound), so
    that the reads after the mount do not download them again."""
    by_toc: dict[int, TocIndex] = {}
    for layer in layers:
        toc = _toc_index(registry, layer) if layer.toc is not None else None
        if toc is not None:
            by_toc[layer.index] = toc
    rest = [(layer, diff_id) for layer, diff_id in zip(layers, diff_ids, strict=True) if layer.index not in by_toc]
    archives = _archive_indexes(registry, [layer for layer, _ in rest], [d for _, d in rest],
                                progress=progress, published=published, strict_diff_id=strict_diff_id,
                                image=image, store=store)
    found: dict[int, ArchiveIndex | TocIndex] = {**by_toc, **{layer.index: index for (layer, _), index
                                                              in zip(rest, archives.indexes, strict=True)}}
    if archives.published is None and published is not None and layers:
        _published_prefetch(registry, layers, diff_ids, published, image)
    return attrs.evolve(archives, indexes=[found[layer.index] for layer in layers])


def _published_prefetch(registry: Registry, layers: list[Layer], diff_ids: list[str],
                        published: PublishedPolicy, image: ImageLayers | None) -> None:
    """An image that needed no published index (every layer has a TOC, or is indexed here) and has no prefetch
    list here takes the one published for it, signed by a trusted key, if there is one: it only saves time,
    so a failure to find it is one line."""
    name = prefetch.list_name(layers[0].manifest_digest)
    if published.mode == "off" or not published.keys.keys or published.pinned is not None or \
            prefetch.cached(name) is not None:
        return
    from . import published as publication

    try:
        signed = image() if image is not None else (layers, diff_ids)
        listed = publication.find_prefetch(registry, layers[0].manifest_digest, *signed, published.keys)
    except SourceError as exc:
        log.warning("%s; no published prefetch list", exc)
        return
    if listed is not None:
        prefetch.keep(name, listed)


def _toc_index(registry: Registry, layer: Layer) -> TocIndex | None:
    """The layer's TOC, checked against the manifest's pin; None when it lacks what the image needs."""
    position = layer.toc
    assert position is not None
    what = f"oci: {registry.ref}: layer {layer.index} ({layer.digest[:19]}…)"
    why = why_refused(position.checksum)
    if why is not None:
        log.warning("%s: its TOC was found false by a background pass (%s); indexing the layer instead", what, why)
        return None
    index = cached_toc(layer.digest, position.checksum)
    if index is not None:  # read from this TOC before, once it was checked against the pin
        return index
    found = None
    for attempt in (1, 2):  # again once if a mirror served other bytes: it is skipped now
        blob = BlobSource(registry.client, registry.blob_url(layer.digest), layer.digest, layer.size,
                          description=what, state={}, digest_along=False, owns_client=False)
        try:
            found = RetryPolicy(quiet=True).call(
                lambda blob=blob: fetch_toc(position, blob.pread, layer.size, what), f"{what}: its TOC")
        except ArchiveError as exc:  # no footer, a TOC member that is none: the layer is indexed
            log.warning("%s; indexing the layer instead", exc)
            return None
        try:
            index = load_toc(found, position, what)
        except ArchiveError as exc:  # authentic (its sha256 is pinned) but not enough: the layer is indexed
            log.warning("%s; indexing the layer instead", exc)
            return None
        except SourceError as exc:  # bytes other than the pinned TOC
            if attempt == 2 or not distrust_served(str(exc)):
                raise SourceChangedError(str(exc)) from None
            continue
        store_toc(layer.digest, position.checksum, index)
        return index
    raise AssertionError("unreachable")


def _archive_indexes(registry: Registry, layers: list[Layer], diff_ids: list[str], *, progress: bool = False,
                     published: PublishedPolicy | None = None, strict_diff_id: bool = False,
                     image: ImageLayers | None = None,
                     store: SpanStore | None = None) -> Indexed:
    """Each layer's archive index, in order, compared with ``diff_ids`` (one per layer): from the cache, a
    published artifact, or a download. An index an artifact gave unsigned is not kept in the cache: it is
    kept once a background pass has proven it."""
    found: dict[int, ArchiveIndex] = {}
    missing = []
    for layer in layers:
        index = load_index(layer.digest.removeprefix("sha256:")) if layer.digest.startswith("sha256:") else None
        if index is None:
            missing.append(layer)
        else:
            found[layer.index] = index
    expected = dict(zip((layer.index for layer in layers), diff_ids, strict=True))

    def check(layer: Layer, index: ArchiveIndex) -> None:
        diff_id = expected[layer.index]
        if f"sha256:{index.stream_sha256}" == diff_id:
            return
        said = (f"oci: {registry.ref}: layer {layer.index} ({layer.digest}) unpacks to a stream whose sha256 is "
                f"not the config's diff_id {diff_id}")
        if strict_diff_id:
            raise SourceChangedError(f"{said} (diff-id=strict)")
        log.warning("%s: served as the manifest pins it, every span checked (diff-id=strict refuses it)", said)

    for layer in layers:
        if layer.index in found:
            check(layer, found[layer.index])
    used, unproven = None, frozenset[int]()
    if missing and published is not None and published.mode != "off":
        from . import published as publication

        signed = (layers, diff_ids)
        if image is not None:
            try:
                signed = image()
            except SourceError as exc:  # a layer mount of an image with layers of other kinds: no index fits it
                log.warning("%s; no published index for its layer", exc)
        artifact = publication.find(registry, missing[0].manifest_digest, *signed, published.keys,
                                    published.pinned, needed={layer.index for layer in missing},
                                    unsigned=published.unsigned)
        if artifact is not None:
            for layer in missing:
                index = artifact.indexes.get(layer.index)
                if index is not None:
                    check(layer, index)
                    if artifact.signed:
                        store_index(index, artifact.encoded.get(layer.index))
                    found[layer.index] = index
            if not artifact.signed:
                unproven = frozenset(artifact.indexes)
            missing = [layer for layer in missing if layer.index not in found]
            used = artifact.digest
            image = prefetch.list_name(layers[0].manifest_digest)
            if artifact.prefetch is not None and prefetch.cached(image) is None:
                prefetch.keep(image, artifact.prefetch)  # what the serving daemon replays
            log.info("%s: %d layer index(es) from the published index %s%s", registry.ref, len(artifact.indexes),
                     artifact.digest, "" if artifact.signed else ", signed by no trusted key: to be proven by a "
                     "background pass (verify=background)")
        elif published.mode == "required" or published.pinned is not None:
            whose = "" if published.unsigned else " signed by a key given with index-key"
            lacking = "" if published.keys.keys or published.unsigned else ": no index-key was given"
            raise SourceError(f"oci: {registry.ref}: no published index{whose} (index=required){lacking}")
    if missing:
        total = sum(layer.size for layer in missing)
        before = distrusted()
        for attempt in (1, 2):  # again once if a mirror served other bytes: it is skipped now
            parts = Parts(Progress(f"indexing {len(missing)} layer(s) of {registry.ref}", total,
                                   enabled=progress and sys.stderr.isatty()))
            try:
                found.update(_index_all(registry, missing, parts, check, store))
                break
            except SourceChangedError as exc:
                if attempt == 2 or distrusted() == before:
                    raise
                log.warning("%s; indexing again from the next host", exc)
            finally:
                parts.close()
    return Indexed([found[layer.index] for layer in layers], used, unproven)


def _index_all(registry: Registry, layers: list[Layer], parts: Parts,
               check: Callable[[Layer, ArchiveIndex], None], store: SpanStore | None) -> dict[int, ArchiveIndex]:
    """Every layer's download starts at once (``DOWNLOADS`` transfer at a time); the index passes read them
    as they arrive, ``passes()`` at once. The first failure stops the others, and is the one reported. With
    ``store``, each pass leaves its stream's spans there (``_Kept``)."""
    what = {layer.index: f"oci: layer {layer.index} ({layer.digest[:19]}…)" for layer in layers}
    total, directory = sum(layer.size for layer in layers), cache_directory(DOWNLOAD_DIR)
    if total > cache_room(directory):
        raise SourceError(f"oci: {registry.ref}: its layers' {total >> 20} MiB would leave the cache's filesystem "
                          f"({directory}) with less than its reserve free")
    slots = threading.Semaphore(DOWNLOADS)
    downloads: dict[int, Download] = {}
    try:
        for layer in layers:
            downloads[layer.index] = Download(registry.client, registry.blob_url(layer.digest), layer.digest,
                                              layer.size, what[layer.index], slots=slots)

        kept = _Kept(store) if store is not None else None

        def one(layer: Layer, meter: Meter) -> ArchiveIndex:
            download = downloads[layer.index]
            passing = kept.passing(layer) if kept is not None else None
            try:
                try:
                    index = build_index(download, what[layer.index], progress=meter, digest=download.sha256,
                                          layout=False,  # merged with the others: its own image is made if asked
                                          threads=threads, spans_to=passing)
                except SourceError:
                    download.sha256()  # bytes other than the layer's are the better reason, when they are the cause
                    raise
                check(layer, index)  # before the index is kept: under diff-id=strict, a layer that is not the
                # config's is not cached
                store_index(index)
                if passing is not None:
                    passing.done(index)
                return index
            except BaseException:
                for other in downloads.values():
                    other.stop()
                raise
            finally:
                if passing is not None:
                    passing.drop()
                download.close()

        at_once, threads = passes(len(layers))
        with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="index") as pool:
            futures = [(layer, pool.submit(one, layer, parts.meter())) for layer in layers]
            results: dict[int, Any] = {}
            first: BaseException | None = None
            for layer, future in futures:
                try:
                    results[layer.index] = future.result()
                except BaseException as exc:  # noqa: BLE001 - the first in time is raised below
                    if first is None or (isinstance(first, DownloadStopped)
                                         and not isinstance(exc, DownloadStopped)):
                        first = exc
    finally:
        for download in downloads.values():
            download.close()
    if first is not None:
        raise first
    return results



class _Kept:
    """The spans index passes leave in the span store: at most half its bound in all, so that a large image
    does not push out what the store held for every other mount."""

    def __init__(self, store: SpanStore) -> None:
        self.store = store
        self.room = store.max_bytes // 2
        self._lock = threading.Lock()

    def passing(self, layer: Layer) -> _Passing:
        return _Passing(self, self.store.passing(layer.digest.removeprefix("sha256:")[:16]))

    def take(self, size: int) -> bool:
        with self._lock:
            if size > self.room:
                return False
            self.room -= size
            return True


class _Passing:
    """One pass's spans, under a temporary name until the pass is done and its stream's sha256 known."""

    def __init__(self, kept: _Kept, where: Any) -> None:
        self.kept, self.where = kept, where
        self.full = False

    def __call__(self, n: int, data: bytes) -> None:
        if not self.full and self.kept.take(len(data)):
            self.kept.store.put(self.where, n, data)
        else:
            self.full = True  # a stream's spans are kept from its start, without a gap, or not at all

    def done(self, index: ArchiveIndex) -> None:
        """The pass is done: its spans are its stream's (not kept twice for a zstd layer unpacked on disk)."""
        if not index.unpacked:
            self.kept.store.adopt(self.where, index.stream_sha256, index.spans.span_size)

    def drop(self) -> None:
        self.kept.store.drop(self.where)
