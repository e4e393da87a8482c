"""OCI 1.1 referrers: what points at a manifest (its ``subject``), found and pushed as distribution-spec 1.1 says.

A registry with the Referrers API answers ``GET /v2/NAME/referrers/DIGEST``
with an image index of the manifests whose subject is DIGEST. One without
it (Debian's docker-registry 2.8 among them) answers 404, and the client
keeps that index itself under the tag ``sha256-HEX`` (the referrers tag
schema): it reads the tag, and a pusher whose manifest the registry did not
acknowledge with ``OCI-Subject`` adds its descriptor there. Everything here
comes from the registry: bodies are bounded, descriptors checked
(``registry._descriptors``), and the filter on ``artifactType`` is applied
here whatever the registry says it applied.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx

from erofs_mount_core import SourceError

from . import _http
from .registry import INDEXES, MAX_MANIFEST, OCI_INDEX, Registry, _descriptors

MAX_REFERRERS = 1024  # descriptors read from one answer; an image has a handful


def referrers(registry: Registry, digest: str, artifact_type: str) -> list[dict[str, Any]]:
    """Descriptors of the manifests whose subject is ``digest`` and whose artifactType is ``artifact_type``."""
    what = f"oci: {registry.ref}: the referrers of {digest}"
    response, body = _http.fetch(registry.client, "GET", f"{registry.base}/referrers/{digest}", what=what,
                                 headers={"Accept": OCI_INDEX}, cap=MAX_MANIFEST)
    if response.status_code != 200:  # no Referrers API: the tag schema
        response, body = _http.fetch(registry.client, "GET", f"{registry.base}/manifests/{tag_of(digest)}",
                                     what=what, headers={"Accept": ", ".join(INDEXES)}, cap=MAX_MANIFEST)
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise _http.status_error(response, what)
    entries = _index_entries(body, what)
    return [d for d in entries if d.get("artifactType") == artifact_type][:MAX_REFERRERS]


def tag_of(digest: str) -> str:
    """The referrers tag schema's tag for ``digest``: ``sha256-HEX``."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}-{encoded}"


def _index_entries(body: bytes, what: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise SourceError(f"{what}: the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{what}: the answer is not an image index")
    return _descriptors(doc.get("manifests", []), what)


def push_blob(registry: Registry, data: bytes, what: str) -> dict[str, Any]:
    """Upload ``data`` as a blob of the repository (unless it is there already); its descriptor's digest and size."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    response, _ = _http.fetch(registry.client, "HEAD", registry.blob_url(digest), what=what)
    if response.status_code == 200:
        return {"digest": digest, "size": len(data)}
    response, _ = _http.fetch(registry.client, "POST", f"{registry.base}/blobs/uploads/", what=what)
    if response.status_code != 202:
        raise _http.status_error(response, f"{what}: starting an upload")
    location = httpx.URL(registry.base).join(response.headers.get("Location", ""))
    if location.host != httpx.URL(registry.base).host or location.scheme != httpx.URL(registry.base).scheme:
        raise SourceError(f"{what}: the registry sent the upload to another host ({location.host}): refused")
    response, _ = _http.fetch(registry.client, "PUT", str(location.copy_merge_params({"digest": digest})), what=what,
                              headers={"Content-Type": "application/octet-stream"}, content=data)
    if response.status_code not in (201, 204):
        raise _http.status_error(response, f"{what}: uploading {digest}")
    return {"digest": digest, "size": len(data)}


def push_manifest(registry: Registry, doc: dict[str, Any], media_type: str, what: str) -> tuple[str, bool]:
    """Put ``doc`` by its digest; (the digest, whether the registry took its subject: ``OCI-Subject``)."""
    body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    response, _ = _http.fetch(registry.client, "PUT", f"{registry.base}/manifests/{digest}", what=what,
                              headers={"Content-Type": media_type}, content=body)
    if response.status_code not in (201, 204):
        raise _http.status_error(response, f"{what}: pushing its manifest")
    return digest, bool(response.headers.get("OCI-Subject"))


def add_to_tag(registry: Registry, subject: str, descriptor: dict[str, Any], what: str) -> None:
    """The referrers tag schema: ``descriptor`` added to the index under ``sha256-HEX`` of ``subject``."""
    tag = tag_of(subject)
    response, body = _http.fetch(registry.client, "GET", f"{registry.base}/manifests/{tag}", what=what,
                                 headers={"Accept": ", ".join(INDEXES)}, cap=MAX_MANIFEST)
    if response.status_code == 200:
        entries = [d for d in _index_entries(body, what) if d.get("digest") != descriptor["digest"]]
    elif response.status_code == 404:
        entries = []
    else:
        raise _http.status_error(response, f"{what}: reading {tag}")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*entries, descriptor]}
    body = json.dumps(index, separators=(",", ":")).encode()
    response, _ = _http.fetch(registry.client, "PUT", f"{registry.base}/manifests/{tag}", what=what,
                              headers={"Content-Type": OCI_INDEX}, content=body)
    if response.status_code not in (201, 204):
        raise _http.status_error(response, f"{what}: updating {tag}")
