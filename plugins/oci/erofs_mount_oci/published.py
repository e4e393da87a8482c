"""Indexes published to the registry: one OCI artifact per image, found by other hosts through its referrers.

``erofs-mount index push`` indexes an image's tar layers (from the cache
when they are there) and pushes an image manifest of its own
``artifactType`` whose ``subject`` is the image's manifest, with one blob
per layer: the tar index file as the cache keeps it (entries, gzip
checkpoints or zstd frames, the sha256 of every 1 MiB span), and with
``--prefetch-from`` the order in which a mount of the image first read it
(``prefetch``). A mount with an empty cache then fetches those blobs
instead of downloading the layers, and prefetches in that order.

Anyone with push rights to a repository can attach a referrer, so a
published index is used only when it is signed by a key the user trusts
(``-o index-key=PUBKEY``): the signature (ed25519) covers a statement that
binds each layer's digest and diff_id to its index blob's digest (and the
prefetch list's digest, when there is one), for the subject's digest.
Span hashes keep the bytes honest (a span that does not match its hash is
never served), but the index's tree says which bytes
make which file, with which mode: only the signature makes that the
publisher's word. An unsigned index, or one signed by another key, is not
used (the layers are indexed here, and the log says so), unless the mount
asks for it to be proven instead (``-o verify=background``: see
``background_check``); one found false is never used again. Every field of a
fetched artifact and of each index blob is bounded and checked as the
cache's own are, and an index must name its layer's digest, size and
diff_id, or it is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
from erofs_mount_tar import ArchiveIndex

from erofs_mount_core import SourceChangedError, SourceError, UsageError

from . import _http
from .prefetch import MAX_LIST_BYTES, PrefetchList
from .prefetch import MEDIA_TYPE as PREFETCH_MEDIA_TYPE
from .referrers import add_to_tag, push_blob, push_manifest, referrers
from .refused import why_refused
from .registry import MAX_MANIFEST, OCI_MANIFEST, Layer, Registry, _descriptors

log = logging.getLogger("erofs_mount.oci")

ARTIFACT_TYPE = "application/vnd.erofs-mount.tar-index.v1"
INDEX_MEDIA_TYPE = "application/vnd.erofs-mount.tar-index.v1.index"
LAYER_ANNOTATION = "io.erofs-mount.layer.digest"
SIGNATURE_ANNOTATION = "io.erofs-mount.signature.ed25519"
KEY_ANNOTATION = "io.erofs-mount.signature.key"
EMPTY_CONFIG = {"mediaType": "application/vnd.oci.empty.v1+json",
                "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a", "size": 2}
MAX_INDEX_BLOB = 256 << 20  # one layer's index; an index of a million entries is far below
MAX_CANDIDATES = 8  # artifacts tried, newest first
FETCHES = 4  # an artifact's blobs fetched at once (each held whole until checked: at most this many)


@attrs.frozen
class TrustedKeys:
    """The public keys a published index must be signed by, by key id (the sha256 of the raw key)."""

    keys: dict[str, Any] = attrs.field(factory=dict)

    @classmethod
    def load(cls, paths: Sequence[str]) -> TrustedKeys:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        keys = {}
        for path in paths:
            try:
                key = serialization.load_pem_public_key(Path(path).read_bytes())
            except (OSError, ValueError) as exc:
                raise UsageError(f"oci: index-key={path}: not a PEM public key ({exc})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise UsageError(f"oci: index-key={path}: not an ed25519 key")
            keys[key_id(key)] = key
        return cls(keys)

    def verify(self, statement: bytes, annotations: dict[str, Any]) -> bool:
        """Whether ``annotations`` carry a signature of ``statement`` by one of these keys."""
        from cryptography.exceptions import InvalidSignature

        key = self.keys.get(str(annotations.get(KEY_ANNOTATION, "")))
        signature = annotations.get(SIGNATURE_ANNOTATION)
        if key is None or not isinstance(signature, str):
            return False
        try:
            key.verify(base64.b64decode(signature, validate=True), statement)
        except (InvalidSignature, ValueError):
            return False
        return True


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_signing_key(path: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"index push: --sign {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"index push: --sign {path}: not an ed25519 key (openssl genpkey -algorithm ed25519)")
    return key


def statement(subject: str, bound: Sequence[tuple[str, str, str]], prefetch: str | None = None) -> bytes:
    """What a signature covers: the image manifest's digest, for each layer (digest, diff_id, the digest of
    its index blob), and the prefetch list's digest if there is one."""
    return json.dumps({"artifactType": ARTIFACT_TYPE, "subject": subject,
                       "layers": [{"digest": d, "diff_id": i, "index": b} for d, i, b in bound],
                       **({"prefetch": prefetch} if prefetch is not None else {})},
                      separators=(",", ":"), sort_keys=True).encode()


# -- push -----------------------------------------------------------------------------------------------------


def push(registry: Registry, subject: dict[str, Any], layers: Sequence[Layer], diff_ids: Sequence[str],
         indexes: Sequence[ArchiveIndex], signing_key: Any | None,
         prefetch: PrefetchList | None = None) -> tuple[str, int]:
    """Push the artifact of ``indexes`` (one per layer of ``layers``) and ``prefetch`` with ``subject`` (the
    image manifest's descriptor); (its digest, the number of layers it holds)."""
    what = f"oci: {registry.ref}: index push"
    blobs, bound = [], []
    for layer, diff_id, index in zip(layers, diff_ids, indexes, strict=True):
        if index.unpacked:  # its stream is a file on this host: another host indexes that layer itself
            log.warning("%s: layer %d is one zstd frame, unpacked on this host: not published", what, layer.index)
            continue
        # with the layer's own image: a host that mounts the layer alone (a snapshotter) takes it when signed
        blob = push_blob(registry, index.with_own_layout().to_bytes(), f"{what}: layer {layer.index}'s index")
        blobs.append({"mediaType": INDEX_MEDIA_TYPE, **blob, "annotations": {LAYER_ANNOTATION: layer.digest}})
        bound.append((layer.digest, diff_id, blob["digest"]))
    listed = None
    if prefetch is not None:
        listed = {"mediaType": PREFETCH_MEDIA_TYPE,
                  **push_blob(registry, prefetch.to_bytes(), f"{what}: the prefetch list")}
        blobs.append(listed)
    if not blobs:
        raise SourceError(f"{what}: no layer of the image has an index another host can use")
    annotations = {}
    if signing_key is not None:
        signature = signing_key.sign(statement(subject["digest"], bound, listed["digest"] if listed else None))
        annotations = {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode(),
                       KEY_ANNOTATION: key_id(signing_key.public_key())}
    push_blob(registry, b"{}", f"{what}: the empty config")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE, "config": EMPTY_CONFIG,
           "layers": blobs, "subject": subject, **({"annotations": annotations} if annotations else {})}
    digest, taken = push_manifest(registry, doc, OCI_MANIFEST, what)
    if not taken:  # no Referrers API: the tag schema, by the client
        size = len(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
        add_to_tag(registry, subject["digest"], {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                                                  "artifactType": ARTIFACT_TYPE,
                                                  **({"annotations": annotations} if annotations else {})}, what)
    return digest, len(blobs)


# -- find -----------------------------------------------------------------------------------------------------


@attrs.frozen
class Found:
    """A published artifact: its digest, and the indexes it gave, by layer index; ``signed`` when a trusted key's
    signature covers them (else they are to be proven by a background pass); ``encoded``: each index as the
    artifact holds it, signed, which is what the cache keeps (not encoded once more)."""

    digest: str
    indexes: dict[int, ArchiveIndex]
    prefetch: PrefetchList | None = None
    signed: bool = True
    encoded: dict[int, bytes] = attrs.field(factory=dict, repr=False)


def find(registry: Registry, subject: str, layers: Sequence[Layer], diff_ids: Sequence[str], keys: TrustedKeys,
         pinned: str | None = None, needed: set[int] | None = None, *, unsigned: bool = False) -> Found | None:
    """The indexes of the ``needed`` layers (by index; default all) of the image's tar ``layers`` from the
    newest artifact signed by a trusted key (or exactly the ``pinned`` one, at reattach); None when there is
    none. The signature is checked over every layer the artifact holds, needed or not. ``unsigned``: an
    artifact no trusted key signed is taken too (``Found.signed`` says which it is)."""
    what = f"oci: {registry.ref}: published index"
    for digest, wanted, listed, signed in _trusted(registry, subject, layers, diff_ids, keys, pinned, what,
                                                   unsigned=unsigned):
        rows = [(layer, diff_id, row) for layer, diff_id, row in wanted
                if row is not None and (needed is None or layer.index in needed)]
        if not rows:  # an artifact with none of the layers this host lacks gives nothing to pin
            continue
        # its blobs fetched side by side: one round trip to the registry, not one per layer
        with ThreadPoolExecutor(min(FETCHES, len(rows) + 1), thread_name_prefix="published") as pool:
            listing = pool.submit(_prefetch_blob, registry, listed[0], what) if listed else None
            fetching = [(layer.index, pool.submit(_index_blob, registry, row, layer, diff_id, what, signed))
                        for layer, diff_id, row in rows]
            indexes = {index: future.result() for index, future in fetching}
            return Found(digest, {n: index for n, (index, _) in indexes.items()},
                         listing.result() if listing is not None else None, signed,
                         {n: body for n, (_, body) in indexes.items() if signed})
    return None


def find_prefetch(registry: Registry, subject: str, layers: Sequence[Layer], diff_ids: Sequence[str],
                  keys: TrustedKeys) -> PrefetchList | None:
    """The prefetch list of the newest artifact signed by a trusted key that has one, for an image that needs
    no index (every layer has a TOC); None when there is none."""
    what = f"oci: {registry.ref}: published prefetch list"
    for _digest, _wanted, listed, _signed in _trusted(registry, subject, layers, diff_ids, keys, None, what):
        if listed:
            return _prefetch_blob(registry, listed[0], what)
    return None


def _trusted(registry: Registry, subject: str, layers: Sequence[Layer], diff_ids: Sequence[str], keys: TrustedKeys,
             pinned: str | None, what: str, *,
             unsigned: bool = False) -> Iterator[tuple[str, list[tuple[Layer, str, Any]], list[Any], bool]]:
    """The artifacts of ``subject`` whose signature by a trusted key covers every blob they hold (with
    ``unsigned``, the others too), newest first (or exactly ``pinned``): (digest, (layer, diff_id, its index's
    descriptor or None) for each of ``layers``, the prefetch list's descriptor or none, whether it is signed so).
    Says once how many were passed over for want of a signature; never yields one a background pass found
    false (``refused``), and refuses a pinned one."""
    if pinned is not None:
        candidates = [pinned]
        why = why_refused(pinned)
        if why is not None:
            raise SourceChangedError(f"{what} {pinned} was found false by a background pass: {why}")
    else:
        found = referrers(registry, subject, ARTIFACT_TYPE)
        candidates = [d["digest"] for d in reversed(found)  # the last added first
                      if why_refused(d["digest"]) is None][:MAX_CANDIDATES]
    passed_over = 0
    try:
        for digest in candidates:
            doc = _artifact(registry, digest, subject, what)
            if doc is None:
                continue
            rows = {str(d.get("annotations", {}).get(LAYER_ANNOTATION)): d for d in doc["layers"]
                    if isinstance(d.get("annotations"), dict) and d.get("mediaType") == INDEX_MEDIA_TYPE}
            listed = [d for d in doc["layers"] if d.get("mediaType") == PREFETCH_MEDIA_TYPE]
            wanted = [(layer, diff_id, rows.get(layer.digest))
                      for layer, diff_id in zip(layers, diff_ids, strict=True)]
            bound = [(layer.digest, diff_id, row["digest"]) for layer, diff_id, row in wanted if row is not None]
            signed = keys.verify(_signed_statement(doc, bound, listed), doc.get("annotations") or {})
            if not signed and not unsigned:
                passed_over += 1
                continue
            yield digest, wanted, listed, signed
    finally:
        if passed_over:
            log.warning("%s: %d published index(es) not signed by a key given with -o index-key: not used "
                        "(-o verify=background proves them instead)", what, passed_over)


def _signed_statement(doc: dict[str, Any], bound: list[tuple[str, str, str]], listed: list[dict[str, Any]]) -> bytes:
    """The statement for every blob the artifact holds (a signature covers all of them, or none)."""
    if len(bound) + len(listed) != len(doc["layers"]) or len(listed) > 1:
        return b""  # it holds layers this image does not have, or blobs of no kind of ours: no statement matches
    return statement(doc["subject"]["digest"], bound, listed[0]["digest"] if listed else None)


def _prefetch_blob(registry: Registry, row: dict[str, Any], what: str) -> PrefetchList | None:
    """The published prefetch list; None (and a line that says why) if it is not one: it only saves time."""
    name = f"{what}: prefetch list {row['digest']}"
    try:
        return PrefetchList.from_bytes(_blob(registry, row, MAX_LIST_BYTES, name))
    except (SourceError, ValueError) as exc:
        log.warning("%s; no prefetch", exc)
        return None


def _blob(registry: Registry, row: dict[str, Any], most: int, name: str) -> bytes:
    """The artifact's blob ``row`` (a checked descriptor), of at most ``most`` bytes and of its digest."""
    if row["size"] > most:
        raise SourceError(f"{name} is {row['size']} bytes, more than the {most >> 20} MiB allowed")
    response, body = _http.fetch(registry.client, "GET", registry.blob_url(row["digest"]), what=name,
                                 cap=row["size"])
    if response.status_code != 200:
        raise _http.status_error(response, name)
    if "sha256:" + hashlib.sha256(body).hexdigest() != row["digest"]:
        raise SourceError(f"{name}: the registry sent bytes of another digest")
    return body


def _artifact(registry: Registry, digest: str, subject: str, what: str) -> dict[str, Any] | None:
    """The artifact manifest ``digest``, checked (its digest, its type, its subject), or None if it is none."""
    response, body = _http.fetch(registry.client, "GET", f"{registry.base}/manifests/{digest}", what=what,
                                 headers={"Accept": OCI_MANIFEST}, cap=MAX_MANIFEST)
    if response.status_code != 200:
        raise _http.status_error(response, f"{what} {digest}")
    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        raise SourceError(f"{what} {digest}: the registry sent a manifest of another digest")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("artifactType") != ARTIFACT_TYPE or \
            not isinstance(doc.get("subject"), dict) or doc["subject"].get("digest") != subject:
        return None
    _descriptors(doc.get("layers"), f"{what} {digest}")
    return doc


def _index_blob(registry: Registry, row: dict[str, Any], layer: Layer, diff_id: str, what: str,
                signed: bool) -> tuple[ArchiveIndex, bytes]:
    """The layer's index, and the blob it was read from. The layer's own image (its EROFS metadata, which the
    kernel parses) is taken only when a trusted key signed it; unsigned, it is dropped, and the metadata made
    here from the tree (checked now)."""
    name = f"{what}: layer {layer.index}'s index {row['digest']}"
    body = _blob(registry, row, MAX_INDEX_BLOB, name)
    try:
        index = ArchiveIndex.from_bytes(body, check_tree=not signed)
        if not signed:
            index = attrs.evolve(index, layout=None)
    except ValueError as exc:
        raise SourceError(f"{name} is not an index erofs-mount can read ({exc})") from None
    if f"sha256:{index.archive_sha256}" != layer.digest or index.archive_size != layer.size or \
            f"sha256:{index.stream_sha256}" != diff_id or index.unpacked:
        raise SourceError(f"{name} does not describe that layer (its digest, size or diff_id differ)")
    return index, body
