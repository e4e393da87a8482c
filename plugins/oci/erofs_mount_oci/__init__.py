"""erofs-mount source ``oci:REFERENCE``: an EROFS layer blob in an OCI registry.

    erofs-mount mount --source oci:registry.example.com/team/app:1.4 /mnt/app
    erofs-mount mount --source oci:localhost:5000/app@sha256:... -o layer=1,insecure /mnt/app

Options (``-o key=value``, comma-separated or repeated):

    layer=N              the N-th layer (from 0) of the image manifest
    blob=sha256:...      the layer with this digest
                         (default: the first layer whose media type says erofs)
    platform=OS/ARCH[/VARIANT]   which image of a multi-platform index (default: this host's)
    insecure             plain HTTP (registries on loopback or a trusted network)
    ca=PATH              CA bundle for the registry's TLS certificate
    credentials=SOURCE   anonymous | env[:USER_VAR:PASS_VAR] | docker-config[:PATH] | auto (default)
    verify=MODE          lazy (default): reads are served as the registry sends them, and the
                         blob's digest is checked once sequential reads have covered it;
                         full: the blob is streamed and checked against its digest before
                         any byte is served, and every later read is checked against the
                         sha256 of its spans (kept in $EROFS_MOUNT_CACHE_DIR, default
                         /var/cache/erofs-mount)
    cache-mib=N          in-memory block cache bound (default 256)
    block-kib=N          cache block size (default 256)
    readahead-kib=N      extra bytes fetched when reads run sequentially (default 4096, 0 = off)

Passwords never go on the command line: they come from environment
variables or docker's config (and its credential helpers), and the record
names the place, not the secret. The record pins the manifest and blob
digests: reattach reads ``/v2/<repository>/blobs/<digest>`` and never
resolves the tag again, so a moved tag cannot change the bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from erofs_mount_core import CacheSettings, Source, SourceChangedError, SourceError, UsageError, hookimpl

from . import reference as references

SCHEME = "oci"


@attrs.frozen
class Options:
    layer: int | None = None
    blob: str | None = None
    platform: str | None = None
    insecure: bool = False
    ca: str | None = None
    credentials: str | None = None
    verify: str = "lazy"
    cache: CacheSettings = CacheSettings()

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> Options:
        known = {f.name.replace("_", "-") for f in attrs.fields(cls) if f.name != "cache"} | set(CacheSettings.OPTIONS)
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"oci: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {"cache": CacheSettings.parse(options, SCHEME)}
        for key, value in options.items():
            name = key.replace("-", "_")
            if key in CacheSettings.OPTIONS:
                continue
            if name == "insecure":
                values[name] = value.lower() not in ("0", "no", "false")
            elif name == "layer":
                if not value.isdigit():
                    raise UsageError(f"oci: {key}={value!r} is not a whole number")
                values[name] = int(value)
            else:
                values[name] = value
        if values.get("verify", "lazy") not in ("lazy", "full"):
            raise UsageError(f"oci: verify={values['verify']!r}: use lazy or full")
        if "layer" in values and "blob" in values:
            raise UsageError("oci: give layer= or blob=, not both")
        if "blob" in values:
            if not values["blob"].startswith("sha"):
                values["blob"] = "sha256:" + values["blob"]
            if not references.DIGEST.fullmatch(values["blob"]):
                raise UsageError(f"oci: blob={options['blob']!r} is not a sha256 digest")
        return cls(**values)


def _client(registry: str, *, insecure: bool, ca: str | None, credentials: Any) -> Any:
    from . import _http

    creds = credentials.lookup(registry)
    auth = _http.RegistryAuth(registry, insecure=insecure, username=creds.username, password=creds.password,
                              identity_token=creds.identity_token)
    return _http.make_client(insecure=insecure, ca_bundle=ca, auth=auth)


def open_reference(location: str, options: Mapping[str, str]) -> Source:
    from . import spans
    from .blob import BlobSource
    from .credentials import CredentialSource
    from .platform import Platform
    from .registry import Registry

    ref = references.parse(location)
    opts = Options.parse(options)
    if opts.insecure and ref.registry == references.DOCKER_HUB:
        raise UsageError("oci: insecure (plain HTTP) is refused for Docker Hub")
    credentials = CredentialSource.parse(opts.credentials, ref.registry)
    platform = Platform.parse(opts.platform) if opts.platform else Platform.host()
    client = _client(ref.api_host, insecure=opts.insecure, ca=opts.ca, credentials=credentials)
    try:
        registry = Registry(client, ref, insecure=opts.insecure)
        manifest, digest, chosen = registry.image_manifest(platform)
        layer = registry.choose_layer(manifest, digest, chosen, index=opts.layer, blob=opts.blob)
    except BaseException:
        client.close()
        raise
    state = {
        "reference": location, "registry": ref.registry, "repository": ref.repository,
        "manifest_digest": layer.manifest_digest, "blob_digest": layer.digest, "blob_size": layer.size,
        "media_type": layer.media_type, "layer_index": layer.index, "platform": layer.platform,
        "insecure": opts.insecure, "ca": opts.ca or "", "credentials": credentials.to_record(),
        **opts.cache.to_state(),
    }
    url = registry.blob_url(layer.digest)
    found = None
    if opts.verify == "full":
        try:
            found = spans.measure(client, url, layer.digest, layer.size, opts.cache.block_kib << 10)
            spans.store(layer.digest, found)
        except BaseException:
            client.close()
            raise
        state.update(verify="full", span_size=found.span_size, spans_sha256=found.root())
    blob = BlobSource(client, url, layer.digest, layer.size, description=f"{ref}#{layer.digest}", state=state,
                      spans=found)
    return opts.cache.wrap(blob)


def reopen(state: Mapping[str, Any]) -> Source:
    """Rebuild from a record: the blob by digest, its size checked, no tag lookup."""
    from .blob import BlobSource
    from .credentials import CredentialSource
    from .reference import Reference
    from .registry import Registry

    try:
        ref = Reference(str(state["registry"]), str(state["repository"]), None, str(state["manifest_digest"]))
        digest, size = str(state["blob_digest"]), int(state["blob_size"])
        insecure, ca = bool(state["insecure"]), str(state.get("ca") or "") or None
        credentials = CredentialSource.from_record(dict(state["credentials"]))
        cache = CacheSettings.from_state(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"oci: record state is incomplete ({exc})") from exc
    client = _client(ref.api_host, insecure=insecure, ca=ca, credentials=credentials)
    try:
        registry = Registry(client, ref, insecure=insecure)
        found = registry.blob_size(digest)
        if found != size:
            raise SourceChangedError(f"oci: blob {digest} is {found} bytes now, {size} when mounted")
        verified = _verified_spans(client, registry.blob_url(digest), digest, size, state)
    except BaseException:
        client.close()
        raise
    blob = BlobSource(client, registry.blob_url(digest), digest, size,
                      description=f"{state['reference']}#{digest}", state=state, spans=verified)
    return cache.wrap(blob)


def _verified_spans(client: Any, url: str, digest: str, size: int, state: Mapping[str, Any]) -> Any:
    """Under verify=full, the span hashes measured at mount: from the cache, or measured again."""
    from . import spans

    if state.get("verify") != "full":
        return None
    try:
        span_size, root = int(state["span_size"]), str(state["spans_sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"oci: record state is incomplete ({exc})") from exc
    found = spans.load(digest, span_size, root)
    if found is None:  # not cached, or not the same: one more streamed pass, digest checked again
        found = spans.measure(client, url, digest, size, span_size)
        if found.root() != root:
            raise SourceChangedError(f"oci: blob {digest} no longer gives the span hashes measured at mount")
        spans.store(digest, found)
    return found


@hookimpl
def erofs_mount_schemes() -> dict[str, str]:
    return {SCHEME: "EROFS layer in an OCI registry, read lazily: oci:[REGISTRY/]REPOSITORY[:TAG][@DIGEST]"}


@hookimpl
def erofs_mount_open_source(location: str, options: Mapping[str, str]) -> Source:
    return open_reference(location, options)


@hookimpl
def erofs_mount_deserialize_source(state: Mapping[str, Any]) -> Source:
    return reopen(state)
