"""erofs-mount source ``oci:REFERENCE``: an image in an OCI registry, read lazily.

    erofs-mount mount --source oci:registry.example.com/team/app:1.4 /mnt/app
    erofs-mount mount --source oci:localhost:5000/app@sha256:... -o layer=1,insecure /mnt/app

An image of ordinary tar layers (tar, tar+gzip, tar+zstd; OCI or Docker)
is mounted whole: its layers merged into one EROFS as a container sees
its root filesystem (later layers win, whiteouts delete, opaque
directories hide what is below). Each layer is downloaded once and
indexed on the way (in parallel, its digest and the config's diff_id
checked); the index is kept in the cache under the layer's digest, so
layers shared with an image mounted before are not downloaded again.
Reads then fetch only the compressed spans they need, one range request
each, and every span is checked against the hash taken when its layer
was indexed. A layer that carries a table of contents (zstd:chunked,
eStargz) is not downloaded at all: its TOC, checked against the pinned
manifest, gives the tree and each chunk's sha256. A host with an empty
cache can take the layers' indexes from an artifact that another host
published to the registry (``erofs-mount index push``), when it is signed
by a key given with ``index-key``. An image whose layers are EROFS images is served as the
layer blob itself.

Options (``-o key=value``, comma-separated or repeated):

    layer=N              only the N-th layer (from 0) of the image manifest: a tar layer as it
                         is, whiteouts in overlayfs form (to stack layers with overlayfs)
    blob=sha256:...      the layer with this digest
                         (default: the whole image, or the first layer whose media type says erofs)
    platform=OS/ARCH[/VARIANT]   which image of a multi-platform index (default: this host's)
    insecure             plain HTTP (registries on loopback or a trusted network)
    hosts-dir=PATH       containerd's hosts directory: mirrors and peer caches to read through, in the
                         order of <PATH>/<registry>/hosts.toml (default /etc/containerd/certs.d when it
                         exists; none: the registry alone)
    ca=PATH              CA bundle for the registry's TLS certificate
    credentials=SOURCE   anonymous | env[:USER_VAR:PASS_VAR] | docker-config[:PATH] | auto (default)
    verify=MODE          (EROFS layers) lazy (default): reads are served as the registry sends them, and the
                         blob's digest is checked once sequential reads have covered it;
                         full: the blob is streamed and checked against its digest before
                         any byte is served, and every later read is checked against the
                         sha256 of its spans (kept in $EROFS_MOUNT_CACHE_DIR, default
                         /var/cache/erofs-mount);
                         (tar layers) background: a published index no index-key signed is used too,
                         and the daemon proves it, and each layer's table of contents (zstd:chunked,
                         eStargz): each such layer streamed once (at verify-rate-mib), indexed and
                         compared; one found false fails every read from then on
    verify-rate-mib=N    the pace of that pass, in MiB/s (default 20)
    disk-cache-mib=N     the span store's bound (default 2048; 0: off): every span checked against its hash
                         (tar layers; EROFS layers under verify=full) is also kept on disk, under
                         the sha256 of its stream, shared by every mount and kept across reattach, so a
                         reattached daemon starts warm; the least recently used spans go first
    fill                 after mount, read every layer into the span store in the background, so that a
                         registry outage later cannot stall reads (the layers must fit disk-cache-mib)
    index=MODE           (tar layers not in the cache) auto (default): use an index published to the
                         registry (erofs-mount index push) when one is signed by an index-key, else
                         index the layers here; off: never look; required: fail unless one is found
    index-key=PATH       a PEM ed25519 public key that published indexes are signed with
    index-keys-dir=PATH  more such keys, each registry's *.pub in a directory named as in
                         hosts-dir (default /etc/erofs-mount/index-keys when it exists; none: no
                         directory); as root, root's alone
    publish-index[=KEY]  after the layers are indexed here, push their indexes for other hosts
                         (as erofs-mount index push does), signed with the PEM private key KEY
    diff-id=MODE         (tar layers) report (default): a layer whose uncompressed stream is not the
                         config's diff_id is said and counted, and served as the manifest pins it
                         (every span checked); strict: such a layer is refused
    cache-mib=N          in-memory block cache bound (default 256)
    block-kib=N          cache block size (default 256)
    readahead-kib=N      the most fetched ahead when reads run in order, ramping up from one block
                         (default 4096, 0 = off)

Passwords never go on the command line: they come from environment
variables or docker's config (and its credential helpers), and the record
names the place, not the secret. The record pins the manifest, the
platform and every blob's digest: reattach reads
``/v2/<repository>/blobs/<digest>`` and never resolves the tag again, so
a moved tag cannot change the bytes; a layer that is gone refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from erofs_mount_core import CacheSettings, Source, SourceChangedError, SourceError, UsageError, check_options, hookimpl

from . import reference as references
from .options import SCHEME, Options, client_for, hosts_dir_of

#: a registry's image or blob as a Source, without the plugin host; an image resolved as a mount resolves it
__all__ = ["ResolvedImage", "blob_chunks", "open_reference", "pinned_reference", "reopen", "resolve_image"]

log = logging.getLogger("erofs_mount.oci")


@attrs.frozen
class ResolvedImage:
    """An image manifest and its config as the registry holds them, each checked against its digest, with
    the manifest's layer descriptors and the config's diff_ids checked as a mount checks them."""

    digest: str
    media_type: str
    manifest: bytes
    config_digest: str
    config: bytes
    layers: list[dict[str, Any]]  # each with a well-formed digest, size and mediaType
    diff_ids: list[str]


def _connect(location: str, options: Mapping[str, str]) -> tuple[Any, Options, Any, str, Any]:
    """The registry ``location`` names, reached as a mount reaches it (the host's checks of ``options`` made
    here too, for callers without the host): (the reference, the options, where credentials come from, the
    hosts directory, the registry); the caller closes the registry's client."""
    from .credentials import CredentialSource
    from .registry import Registry

    check_options(SCHEME, options, Options.names())
    ref = references.parse(location)
    opts = Options.parse(options)
    if opts.insecure and ref.registry == references.DOCKER_HUB:
        raise UsageError("oci: insecure (plain HTTP) is refused for Docker Hub")
    credentials = CredentialSource.parse(opts.credentials, ref.registry)
    hosts_dir = hosts_dir_of(opts.hosts_dir)
    client = client_for(ref, insecure=opts.insecure, ca=opts.ca, credentials=credentials, hosts_dir=hosts_dir)
    return ref, opts, credentials, hosts_dir, Registry(client, ref, insecure=opts.insecure)


def resolve_image(location: str, options: Mapping[str, str]) -> ResolvedImage:
    """The image manifest ``location`` names for this host's platform (or ``-o platform=``), resolved as a
    mount resolves it (credentials, hosts directory, ``insecure``), and its config."""
    from .platform import Platform
    from .registry import OCI_MANIFEST, _descriptors

    ref, opts, _, _, registry = _connect(location, options)
    try:
        manifest, digest, _ = registry.image_manifest(Platform.parse(opts.platform) if opts.platform
                                                      else Platform.host())
        layers = _descriptors(manifest.get("layers"), f"oci: {ref}: its manifest")
        config = registry.config(manifest)
        return ResolvedImage(digest, str(manifest.get("mediaType") or OCI_MANIFEST), registry.manifest_bytes(digest),
                             manifest["config"]["digest"], config, layers, registry.diff_ids(manifest, config))
    finally:
        registry.client.close()


def blob_chunks(location: str, options: Mapping[str, str], digest: str, size: int) -> Iterator[bytes]:
    """Blob ``digest`` of the repository ``location`` names, streamed in one GET through the hosts a mount
    would use; at most ``size`` bytes, and its end raises unless they were exactly that blob's."""
    import hashlib

    from . import _http

    ref, _, _, _, registry = _connect(location, options)
    what = f"oci: {ref}: blob {digest}"
    try:
        response = _http.attempt(registry.client, "GET", registry.blob_url(digest), what=what,
                                 headers={"Accept-Encoding": "identity"}, stream=True, body_limit=size)
        try:
            if response.status_code != 200:
                raise _http.status_error(response, what)
            whole, got = hashlib.sha256(), 0
            for chunk in response.iter_bytes(1 << 20):
                got += len(chunk)
                if got > size:
                    raise SourceChangedError(f"{what}: the registry sent more than its {size} bytes")
                whole.update(chunk)
                yield chunk
            if got != size or f"sha256:{whole.hexdigest()}" != digest:
                raise SourceChangedError(f"{what}: the registry sent {got} bytes of another digest")
        except _http.HTTPError as exc:
            raise SourceError(f"{what}: {type(exc).__name__}: {exc}", transient=True) from None
        finally:
            response.close()
    finally:
        registry.client.close()


def pinned_reference(location: str, digest: str) -> str:
    """``location`` (a reference) by the manifest digest ``digest``: what it names whatever its tag names later."""
    ref = references.parse(location)
    return f"{ref.registry}/{ref.repository}@{digest}"


def open_reference(location: str, options: Mapping[str, str]) -> Source:
    """The image (or blob) ``location`` names, as the ``oci:`` source serves it (the host's checks of
    ``options`` made here too, for callers without the host)."""
    from .platform import Platform
    from .registry import TAR_LAYERS, is_erofs

    ref, opts, credentials, hosts_dir, registry = _connect(location, options)
    try:
        platform = Platform.parse(opts.platform) if opts.platform else Platform.host()
        manifest, digest, chosen = registry.image_manifest(platform)
        common = {"reference": location, "registry": ref.registry, "repository": ref.repository,
                  "manifest_digest": digest, "platform": chosen, "insecure": opts.insecure, "ca": opts.ca or "",
                  "credentials": credentials.to_record(), "hosts_dir": hosts_dir, **opts.cache.to_state(),
                  "disk_cache_mib": opts.disk_cache_mib, "fill": opts.fill}
        if opts.layer is None and opts.blob is None:
            descriptors = manifest.get("layers") if isinstance(manifest.get("layers"), list) else []
            if not any(isinstance(d, dict) and is_erofs(str(d.get("mediaType", ""))) for d in descriptors):
                return _open_image(registry, registry.tar_layers(manifest, digest, chosen), manifest, common,
                                   opts, whole=True)
        layer = registry.choose_layer(manifest, digest, chosen, index=opts.layer, blob=opts.blob)
        if layer.media_type in TAR_LAYERS:
            (layer,) = registry.tar_layers(manifest, digest, chosen, only=layer.index)
            return _open_image(registry, [layer], manifest, common, opts, whole=False)
        return _open_blob(registry, layer, common, opts)
    except BaseException:
        registry.client.close()
        raise


def _open_image(registry: Any, layers: list[Any], manifest: dict[str, Any], common: dict[str, Any],
                opts: Options, *, whole: bool) -> Source:
    """Tar layers: the whole image merged, or one layer as it is, from the layers' indexes."""
    import sys

    from .layers import PublishedPolicy, image_layers, indexed
    from .layers_image import LayersImage, claims_of, layer_state
    from .options import index_keys_dir_of

    if opts.verify == "full":
        raise UsageError("oci: verify=full is for EROFS layers: every span of a tar layer is always checked "
                         "(verify=background proves published indexes and tables of contents)")
    diff_ids = registry.diff_ids(manifest)
    if len(diff_ids) != len(manifest["layers"]):
        raise SourceError(f"oci: {registry.ref}: its config names {len(diff_ids)} layer(s), its manifest "
                          f"{len(manifest['layers'])}")
    if not whole:
        diff_ids = [diff_ids[layers[0].index]]
    signing_key = None
    if opts.publish_index is not None:
        from .published import load_signing_key

        if not whole:
            raise UsageError("oci: publish-index is for the whole image, not layer= or blob=")
        signing_key = load_signing_key(opts.publish_index) if opts.publish_index else None
    store = _span_store(common)
    keys_dir = index_keys_dir_of(opts.index_keys_dir)
    background = opts.verify == "background"
    found = indexed(registry, layers, diff_ids, progress=sys.stderr.isatty(), store=store,
                    published=PublishedPolicy.of(opts.index, opts.index_key or "", keys_dir=keys_dir,
                                                 registry=common["registry"], unsigned=background),
                    strict_diff_id=opts.diff_id == "strict",
                    image=None if whole else image_layers(registry, manifest, common["manifest_digest"],
                                                          common["platform"]))
    if opts.publish_index is not None and found.published is None:
        _publish(registry, manifest, common["manifest_digest"], layers, diff_ids, found.indexes, signing_key)
    state = {**common, "kind": "image" if whole else "tar-layer", "layers": layer_state(layers, diff_ids),
             "index": opts.index, "index_key": opts.index_key or "", "index_keys_dir": keys_dir,
             "diff_id": opts.diff_id,
             **({"verify": "background", "verify_rate_mib": opts.verify_rate_mib} if background else {}),
             **({"published_index": found.published} if found.published else {})}
    image = LayersImage(registry, layers, found.indexes, opts.cache, state, whole=whole,
                        description=_image_description(state), store=store,
                        claims=claims_of(layers, found, background=background))
    return image.filling() if opts.fill else image


def _publish(registry: Any, manifest: dict[str, Any], digest: str, layers: list[Any], diff_ids: list[str],
             found: list[Any], signing_key: Any) -> None:
    """``-o publish-index``: push the indexes this mount made or found in the cache, for other hosts; a push
    that fails (no push rights, a registry that refuses) is one warning, and the mount goes on."""
    from erofs_mount_tar import ArchiveIndex

    from .published import push

    kept = [(layer, diff_id, index) for layer, diff_id, index in zip(layers, diff_ids, found, strict=True)
            if isinstance(index, ArchiveIndex)]
    if not kept:
        return
    try:
        subject = {"mediaType": manifest.get("mediaType") or registry.OCI_MANIFEST, "digest": digest,
                   "size": registry.manifest_size(digest)}
        artifact, count = push(registry, subject, *map(list, zip(*kept, strict=True)), signing_key)
    except SourceError as exc:
        log.warning("oci: publish-index: %s: the mount goes on without publishing", exc)
        return
    log.info("oci: published the index of %d layer(s) of %s as %s", count, registry.ref, artifact)


def _image_description(state: Mapping[str, Any]) -> str:
    layers = state["layers"]
    where = f"{state['registry']}/{state['repository']}@{state['manifest_digest']}"
    if state["kind"] == "image":
        return f"{where} ({len(layers)} tar layer(s), merged)"
    return f"{where} layer {layers[0]['index']} ({layers[0]['digest']}, as a layer)"


def _span_store(state: Mapping[str, Any]) -> Any:
    """The span store the record's ``disk_cache_mib`` asks for, or None (records made before it: none)."""
    from erofs_mount_core import SpanStore

    mib = int(state.get("disk_cache_mib", 0))
    return SpanStore(mib << 20) if mib else None


def _open_blob(registry: Any, layer: Any, common: dict[str, Any], opts: Options) -> Source:
    """An EROFS layer: its blob served as it is, by range requests."""
    from . import full_verify as spans
    from .blob import BlobSource

    if opts.verify == "background":
        raise UsageError("oci: verify=background proves what tar layers are mounted by (published indexes, "
                         "tables of contents): an EROFS layer has neither (verify=full checks it whole)")
    if opts.fill and opts.verify != "full":
        raise UsageError("oci: fill keeps checked spans: for an EROFS layer it needs verify=full")
    ref, client = registry.ref, registry.client
    state = {**common, "blob_digest": layer.digest, "blob_size": layer.size, "media_type": layer.media_type,
             "layer_index": layer.index}
    url = registry.blob_url(layer.digest)
    found = None
    if opts.verify == "full":
        found = spans.measure(client, url, layer.digest, layer.size, opts.cache.block_kib << 10)
        spans.store(layer.digest, found)
        state.update(verify="full", span_size=found.span_size, spans_sha256=found.root())
    blob = BlobSource(client, url, layer.digest, layer.size, description=f"{ref}#{layer.digest}", state=state,
                      digest_along=found is None)
    if found is None:
        return opts.cache.wrap(blob)
    return spans.served(blob, found, opts.cache, _span_store(state), fill=opts.fill)


def reopen(state: Mapping[str, Any]) -> Source:
    """Rebuild from a record: blobs by digest, their sizes checked, no tag lookup."""
    from .credentials import CredentialSource
    from .reference import Reference
    from .registry import Registry

    try:
        ref = Reference(str(state["registry"]), str(state["repository"]), None, str(state["manifest_digest"]))
        insecure, ca = bool(state["insecure"]), str(state.get("ca") or "") or None
        credentials = CredentialSource.from_record(dict(state["credentials"]))
        cache = CacheSettings.from_state(state)
        kind = str(state.get("kind", "blob"))
        hosts_dir = str(state.get("hosts_dir", ""))  # records made before hosts.toml: the registry alone
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"oci: record state is incomplete ({exc})") from exc
    client = client_for(ref, insecure=insecure, ca=ca, credentials=credentials, hosts_dir=hosts_dir)
    try:
        registry = Registry(client, ref, insecure=insecure)
        if kind in ("image", "tar-layer"):
            from .layers_image import reopen_layers

            image = reopen_layers(registry, state, cache, whole=kind == "image",
                                  description=_image_description({**state, "kind": kind}), store=_span_store(state))
            return image.filling() if state.get("fill") else image
        return _reopen_blob(registry, state, cache)
    except BaseException:
        client.close()
        raise


def _reopen_blob(registry: Any, state: Mapping[str, Any], cache: CacheSettings) -> Source:
    from .blob import BlobSource

    client = registry.client
    try:
        digest, size = str(state["blob_digest"]), int(state["blob_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"oci: record state is incomplete ({exc})") from exc
    from . import full_verify as spans

    try:
        found = registry.blob_size(digest)
    except SourceError as exc:  # the registry is down: enough if the span store holds the whole blob
        verified = _stored_whole(digest, state) if exc.transient else None
        if verified is None:
            raise
        log.warning("oci: %s; every span of blob %s is in the span store: served from there", exc, digest)
    else:
        if found != size:
            raise SourceChangedError(f"oci: blob {digest} is {found} bytes now, {size} when mounted")
        verified = _verified_spans(client, registry.blob_url(digest), digest, size, state)
    blob = BlobSource(client, registry.blob_url(digest), digest, size,
                      description=f"{state['reference']}#{digest}", state=state, digest_along=verified is None)
    if verified is None:
        return cache.wrap(blob)
    return spans.served(blob, verified, cache, _span_store(state), fill=bool(state.get("fill")))


def _stored_whole(digest: str, state: Mapping[str, Any]) -> Any:
    """Under verify=full, the span hashes measured at mount if the span store holds every span; else None."""
    from . import full_verify as spans

    store = _span_store(state)
    if store is None or state.get("verify") != "full":
        return None
    found = spans.load(digest, int(state["span_size"]), str(state["spans_sha256"]))
    return found if found is not None and store.holds(digest.removeprefix("sha256:"), found) else None


def _verified_spans(client: Any, url: str, digest: str, size: int, state: Mapping[str, Any]) -> Any:
    """Under verify=full, the span hashes measured at mount: from the cache, or measured again."""
    from . import full_verify as spans

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
def erofs_mount_register_commands(cli: Any) -> None:
    from .commands import index  # click commands: loaded only when a command not the core's is asked for

    cli.add_command(index)


@hookimpl
def erofs_mount_warm_up() -> None:
    from . import _http

    _http.warm_up()


@hookimpl
def erofs_mount_schemes() -> dict[str, str]:
    return {SCHEME: "an image in an OCI registry (tar or EROFS layers), read lazily: "
                    "oci:[REGISTRY/]REPOSITORY[:TAG][@DIGEST]"}


@hookimpl
def erofs_mount_source_options() -> set[str]:
    return Options.names()


@hookimpl
def erofs_mount_open_source(location: str, options: Mapping[str, str]) -> Source:
    return open_reference(location, options)


@hookimpl
def erofs_mount_deserialize_source(state: Mapping[str, Any]) -> Source:
    return reopen(state)
