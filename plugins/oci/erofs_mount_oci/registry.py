"""The registry API: manifests (with digest checks), platform choice, layer choice, blobs."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import attrs
from erofs_mount_tar import ArchiveError, TocPosition

from erofs_mount_core import SourceChangedError, SourceError, UsageError

from . import _http
from .platform import Platform
from .reference import DIGEST, Reference
from .routing import distrust_served

log = logging.getLogger("erofs_mount.oci")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFESTS, *INDEXES))
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 8 << 20
TAR_LAYERS = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
})
FOREIGN_LAYERS = frozenset({"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"})


def is_erofs(media_type: str) -> bool:
    return "erofs" in media_type.lower()


@attrs.frozen
class Layer:
    manifest_digest: str
    digest: str
    size: int
    media_type: str
    index: int
    platform: str
    toc: TocPosition | None = None
    """Where the layer's table of contents is (zstd:chunked), from its descriptor's annotations."""


class Registry:
    def __init__(self, client: Any, ref: Reference, *, insecure: bool) -> None:
        self.client = client
        self.ref = ref
        self.base = f"{'http' if insecure else 'https'}://{ref.api_host}/v2/{ref.repository}"
        self._configs: dict[str, bytes] = {}  # checked against their digests: a mount asks for its config twice

    def blob_url(self, digest: str) -> str:
        return f"{self.base}/blobs/{digest}"

    def manifest(self, reference: str) -> tuple[str, dict[str, Any], str]:
        """(media type, parsed manifest, digest) of a tag or digest, digest verified."""
        what = f"manifest {self.ref.repository}:{reference}" if not reference.startswith("sha") \
            else f"manifest {self.ref.repository}@{reference}"
        for attempt in (1, 2):  # again once if a mirror served other bytes: it is skipped now
            response, body = _http.fetch(self.client, "GET", f"{self.base}/manifests/{reference}", what=what,
                                         headers={"Accept": ACCEPT}, cap=MAX_MANIFEST)
            if response.status_code != 200:
                raise _http.status_error(response, what)
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            claimed = response.headers.get("Docker-Content-Digest")
            lie: SourceError | None = None
            if reference.startswith("sha256:") and digest != reference:
                lie = SourceChangedError(f"{what}: the registry sent a manifest with digest {digest}")
            elif claimed and claimed.startswith("sha256:") and claimed != digest:
                lie = SourceError(f"{what}: body digest {digest} differs from Docker-Content-Digest {claimed}")
            if lie is None:
                break
            if attempt == 2 or not distrust_served(str(lie)):
                raise lie
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise SourceError(f"{what} is not JSON: {str(exc)[:200]}") from None
        if not isinstance(doc, dict):
            raise SourceError(f"{what} is not a JSON object")
        media_type = doc.get("mediaType") or _content_type(response) or _guess(doc)
        if not isinstance(media_type, str):
            raise SourceError(f"{what}: its mediaType is not a string")
        return media_type, doc, digest

    def image_manifest(self, platform: Platform) -> tuple[dict[str, Any], str, str]:
        """The image manifest for ``platform``: (manifest, its digest, platform chosen)."""
        reference = self.ref.digest or self.ref.tag or "latest"
        media_type, doc, digest = self.manifest(reference)
        if media_type in INDEXES or "manifests" in doc:
            entries = _descriptors(doc.get("manifests"), f"oci: {self.ref}: its index")
            candidates = []
            for entry in entries:
                annotations = entry.get("annotations")
                if isinstance(annotations, dict) and \
                        annotations.get("vnd.docker.reference.type") == "attestation-manifest":
                    continue
                p = Platform.from_descriptor(entry)
                if p is not None and p.matches(platform):
                    candidates.append((entry, p))
            if not candidates:
                offered = sorted({str(p) for e in entries if (p := Platform.from_descriptor(e)) and p.os != "unknown"})
                raise UsageError(f"oci: {self.ref} has no image for platform {platform} "
                                 f"(it has: {', '.join(offered) or 'none'}); choose one with -o platform=")
            entry, chosen = candidates[0]
            media_type, doc, digest = self.manifest(entry["digest"])
            if media_type in INDEXES or "manifests" in doc:
                raise SourceError(f"oci: {self.ref}: its index names another index, not an image manifest")
            return doc, digest, str(chosen)
        if media_type not in MANIFESTS and "layers" not in doc:
            raise SourceError(f"oci: {self.ref} is a {media_type}, not an image manifest or index")
        return doc, digest, str(platform)

    def choose_layer(self, manifest: dict[str, Any], digest: str, platform: str, *,
                     index: int | None = None, blob: str | None = None) -> Layer:
        layers = _descriptors(manifest.get("layers"), f"oci: {self.ref}: its manifest")
        if not layers:
            raise SourceError(f"oci: {self.ref} has no layers")

        def layer(i: int) -> Layer:
            d = layers[i]
            if d.get("urls") or d.get("mediaType") in FOREIGN_LAYERS:
                self.tar_layers(manifest, digest, platform, only=i)  # refuses it, naming it
            return Layer(digest, d["digest"], d["size"], str(d.get("mediaType", "")), i, platform)

        if index is not None:
            if not 0 <= index < len(layers):
                raise UsageError(f"oci: layer {index} is out of range: {self.ref} has {len(layers)} layer(s)")
            return layer(index)
        if blob is not None:
            for i, d in enumerate(layers):
                if d.get("digest") == blob:
                    return layer(i)
            raise UsageError(f"oci: {self.ref} has no layer {blob}")
        for i, d in enumerate(layers):
            if is_erofs(str(d.get("mediaType", ""))):
                return layer(i)
        raise UsageError(f"oci: {self.ref} has no layer whose media type says EROFS; "
                         "choose one with -o layer=N or -o blob=sha256:...")

    def tar_layers(self, manifest: dict[str, Any], digest: str, platform: str,
                   only: int | None = None) -> list[Layer]:
        """Every layer of the image (or layer ``only``), each a tar layer kept in the registry: the rest
        is refused, by name."""
        layers = _descriptors(manifest.get("layers"), f"oci: {self.ref}: its manifest")
        if not layers:
            raise SourceError(f"oci: {self.ref} has no layers: there is no filesystem to mount")
        found = []
        for i, d in enumerate(layers):
            if only is not None and i != only:
                continue
            media_type = str(d.get("mediaType", ""))
            name = f"oci: {self.ref}: layer {i} ({d['digest']})"
            if d.get("urls") or media_type in FOREIGN_LAYERS:
                urls = d.get("urls") if isinstance(d.get("urls"), list) else []
                where = f" at {str(urls[0])[:200]}" if urls else ""
                raise SourceError(f"{name} is a foreign layer, kept outside the registry{where}: "
                                  "erofs-mount reads layers from the registry only")
            if media_type not in TAR_LAYERS:
                raise SourceError(f"{name} has media type {media_type or '(none)'!r}, which is neither a tar "
                                  "layer nor EROFS")
            found.append(Layer(digest, d["digest"], d["size"], media_type, i, platform, _toc_position(d, name)))
        return found

    def diff_ids(self, manifest: dict[str, Any], config: bytes | None = None) -> list[str]:
        """The image config's ``rootfs.diff_ids``: the sha256 of each layer's uncompressed tar stream.
        ``config``: the config's bytes, when they were fetched (and checked) already."""
        body = self.config(manifest) if config is None else config
        what = f"oci: {self.ref}: its config"
        try:
            ids = json.loads(body)["rootfs"]["diff_ids"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise SourceError(f"{what} has no rootfs.diff_ids") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) and DIGEST.fullmatch(i) for i in ids):
            raise SourceError(f"{what}: its rootfs.diff_ids are not a list of digests")
        return ids

    def config(self, manifest: dict[str, Any]) -> bytes:
        """The image config's bytes, of the digest the manifest gives for them."""
        (config,) = _descriptors([manifest.get("config")], f"oci: {self.ref}: its manifest's config")
        what = f"oci: {self.ref}: config {config['digest']}"
        if config["digest"] in self._configs:
            return self._configs[config["digest"]]
        if config["size"] > MAX_CONFIG:
            raise SourceError(f"{what} is {config['size']} bytes, more than the {MAX_CONFIG} expected")
        for _attempt in (1, 2):  # again once if a mirror served other bytes: it is skipped now
            response, body = _http.fetch(self.client, "GET", self.blob_url(config["digest"]), what=what,
                                         cap=MAX_CONFIG)
            if response.status_code != 200:
                raise _http.status_error(response, what)
            if "sha256:" + hashlib.sha256(body).hexdigest() == config["digest"]:
                break
            if not distrust_served(f"{what}: bytes of another digest"):
                raise SourceChangedError(f"{what}: the registry served bytes of another digest")
        else:
            raise SourceChangedError(f"{what}: the registry served bytes of another digest")
        self._configs[config["digest"]] = body
        return body

    def manifest_bytes(self, digest: str) -> bytes:
        """Manifest ``digest`` as the registry holds it, byte for byte (what a content store keeps)."""
        what = f"manifest {self.ref.repository}@{digest}"
        response, body = _http.fetch(self.client, "GET", f"{self.base}/manifests/{digest}", what=what,
                                     headers={"Accept": ACCEPT}, cap=MAX_MANIFEST)
        if response.status_code != 200:
            raise _http.status_error(response, what)
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise SourceChangedError(f"{what}: the registry sent a manifest of another digest")
        return body

    OCI_MANIFEST = OCI_MANIFEST

    def manifest_size(self, digest: str) -> int:
        """The size of manifest ``digest`` (for a descriptor of it: a referrer's subject)."""
        what = f"manifest {self.ref.repository}@{digest}"
        response, _ = _http.fetch(self.client, "HEAD", f"{self.base}/manifests/{digest}", what=what,
                                  headers={"Accept": ACCEPT})
        length = response.headers.get("Content-Length")
        if response.status_code != 200 or length is None or not length.isdigit():
            raise _http.status_error(response, what)
        return int(length)

    def blob_size(self, digest: str) -> int:
        what = f"blob {self.ref.repository}@{digest}"
        response, _ = _http.fetch(self.client, "HEAD", self.blob_url(digest), what=what)
        if response.status_code == 404:
            raise SourceChangedError(f"oci: {what} is gone from the registry: refusing to serve other bytes")
        if response.status_code != 200:
            raise _http.status_error(response, what)
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise SourceError(f"{what}: the registry gave no size")
        return int(length)


def _toc_position(descriptor: dict[str, Any], name: str) -> TocPosition | None:
    """The TOC a layer's annotations place (zstd:chunked, eStargz), None if they place none or place it wrongly
    (the layer is then indexed as any other, and the log says why)."""
    try:
        return TocPosition.of(descriptor.get("annotations"), descriptor["size"], str(descriptor.get("mediaType")))
    except ArchiveError as exc:
        log.warning("%s: %s; indexing the layer instead", name, exc)
        return None


def _descriptors(value: Any, what: str) -> list[dict[str, Any]]:
    """A list of OCI descriptors, each with a well-formed digest and size; SourceError otherwise.

    Everything in a manifest comes from the registry: checked here before a
    digest goes into a URL or a size into arithmetic.
    """
    if not isinstance(value, list):
        raise SourceError(f"{what} has no list of descriptors")
    for d in value:
        if not isinstance(d, dict):
            raise SourceError(f"{what} has a descriptor that is not a JSON object")
        digest, size = d.get("digest"), d.get("size")
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise SourceError(f"{what} has a descriptor without a valid digest")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 63:
            raise SourceError(f"{what}: descriptor {digest} has no valid size")
        if not isinstance(d.get("mediaType", ""), str):
            raise SourceError(f"{what}: descriptor {digest} has a mediaType that is not a string")
    return value


def _content_type(response: Any) -> str:
    return str(response.headers.get("Content-Type", "")).split(";")[0].strip()


def _guess(doc: dict[str, Any]) -> str:
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST
