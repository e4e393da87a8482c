"""``-o verify=background``: what an image was made from on another's word, proven beside serving.

A published index that is not signed by a key the host trusts says which
bytes make which file, with which mode, on the word of whoever pushed it.
Span hashes keep every byte served the layer's own, but not the tree. So a
serving daemon streams each such layer once, at a bounded rate, checks its
digest, indexes it here and compares: the tree, the stream's size and
sha256, every span hash. The same index proves it: it is kept in the cache
(later mounts use it as their own). A layer's table of contents is pinned
by the manifest, but it is the image builder's word against the tar stream
every other tool unpacks: it is compared with the stream entry by entry
and chunk by chunk (``erofs_mount_tar.toc_differences``).

Anything else refuses the image: every read of it fails from then on (its
metadata was made from that tree), one line names the layer and what was
false, ``stats`` and ``metrics`` count it, ``list`` shows the device as
``refused``, and the artifact (or the TOC) is kept as refused
(``refused``): no mount uses it again (a TOC's layer is indexed instead),
and a reattach that pins it is refused.

A pass that cannot finish (the registry down, the cache's filesystem full)
proves nothing and refuses nothing: it is said, and tried again later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

import attrs
from erofs_mount_tar import ArchiveIndex, TocIndex, build_index, store_index, toc_differences

from erofs_mount_core import Counters, SourceChangedError, SourceError

from . import refused
from .download import Download
from .registry import Layer, Registry

log = logging.getLogger("erofs_mount.oci")

RATE_MIB = 20  # MiB/s: the default pace of a pass, well below what the reads beside it need
RETRY_AFTER = 60.0  # seconds before a pass that could not finish is tried again


@attrs.frozen
class Claim:
    """A layer's index taken on another's word: ``whose`` says whose (a line names it), ``key`` is what is kept
    as refused if it is false (the artifact's digest, or the TOC's checksum)."""

    layer: Layer
    index: ArchiveIndex | TocIndex
    whose: str
    key: str

    @classmethod
    def published(cls, layer: Layer, index: ArchiveIndex, artifact: str) -> Claim:
        return cls(layer, index, f"the published index {artifact}", artifact)

    @classmethod
    def toc(cls, layer: Layer, index: TocIndex) -> Claim:
        assert layer.toc is not None
        return cls(layer, index, f"its table of contents ({layer.toc.checksum})", layer.toc.checksum)


def differences(claimed: ArchiveIndex, measured: ArchiveIndex) -> list[str]:
    """What of ``claimed`` the layer's own pass (``measured``) does not bear out; empty when it proves it. The
    gzip checkpoints and zstd frames are not compared: bytes they decode wrongly fail their span's hash."""
    said = []
    if (claimed.compression, claimed.archive_sha256, claimed.archive_size) != \
            (measured.compression, measured.archive_sha256, measured.archive_size):
        said.append("the archive it names")
    if (claimed.stream_size, claimed.stream_sha256) != (measured.stream_size, measured.stream_sha256):
        said.append("the stream's size or sha256")
    if claimed.spans != measured.spans:
        said.append("span hashes")
    if claimed.tree != measured.tree:
        said.append("the tree (names, modes, owners, times, sizes, links, xattrs or where files start)")
    return said


class BackgroundCheck:
    """The pass over every claim, one layer after the other, on a thread of its own from ``start``; ``refuse``
    is called (once) with the line that says what was found false."""

    def __init__(self, registry: Registry, claims: list[Claim], rate: int, refuse: Callable[[str], None]) -> None:
        self.registry, self.claims, self.rate, self._refuse = registry, claims, rate, refuse
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._download: Download | None = None
        self._lock = threading.Lock()
        self._counters = Counters()

    def start(self) -> None:
        if self.claims and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="background check", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        for claim in self.claims:
            while not self._stop.is_set():
                try:
                    if not self._prove(claim):
                        return  # refused: the image serves nothing more, the other layers need no pass
                    break
                except SourceError as exc:
                    if self._stop.is_set():
                        return
                    self._counters.add("background_check_failures")
                    log.warning("%s; the background pass is tried again in %.0f s", exc, RETRY_AFTER)
                    self._stop.wait(RETRY_AFTER)

    def _prove(self, claim: Claim) -> bool:
        """Whether the layer bears its claimed index out (then kept as this host's); refuses the image if not."""
        layer = claim.layer
        what = f"oci: layer {layer.index} ({layer.digest[:19]}…), background pass"
        download = Download(self.registry.client, self.registry.blob_url(layer.digest), layer.digest, layer.size,
                            what, rate=self.rate)
        with self._lock:
            self._download = download
        try:
            if self._stop.is_set():
                return True
            try:
                measured = build_index(download, what, digest=download.sha256, layout=False, threads=1)
                if isinstance(claim.index, TocIndex):  # the stream read once more, from the download
                    stream = measured.open_stream(download)
                    try:
                        wrong = toc_differences(claim.index, measured, stream)
                    finally:
                        stream.close()
                else:
                    wrong = [f"{', '.join(found)} differ from the layer's own"
                             for found in [differences(claim.index, measured)] if found]
            except SourceChangedError as exc:  # bytes that are not the layer's: not the index's fault
                raise SourceError(str(exc)) from None
        finally:
            with self._lock:
                self._download = None
            download.close()
        self._counters.add("background_checked_bytes", layer.size)
        if not wrong:
            if isinstance(claim.index, ArchiveIndex):
                store_index(measured)
            self._counters.add("background_proven_layers")
            log.info("oci: layer %d (%s): %s is proven by the layer's own stream", layer.index, layer.digest,
                     claim.whose)
            return True
        line = (f"oci: layer {layer.index} ({layer.digest}): {claim.whose} is false ({'; '.join(wrong)}): "
                "every read of the image fails")
        self._counters.add("background_refused_layers")
        refused.refuse(claim.key, line)
        log.error("%s", line)
        self._refuse(line)
        return False

    def counters(self) -> Mapping[str, int]:
        return self._counters.snapshot()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if self._download is not None:
                self._download.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
