"""``erofs-mount index push``: the commands this plugin adds to ``erofs-mount`` (``erofs_mount_register_commands``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import click

from erofs_mount_core import UsageError


@click.group(name="index")
def index() -> None:
    """Indexes of registry images, published for other hosts."""


@index.command(name="push")
@click.argument("spec", metavar="oci:REFERENCE")
@click.option("-o", "--option", "option_pairs", multiple=True, metavar="KEY[=VALUE][,...]",
              help="oci: options (insecure, credentials=, platform=, hosts-dir=, ca=...), as for mount.")
@click.option("--sign", "key_file", metavar="KEYFILE",
              help="Sign the index with this ed25519 private key (PEM): hosts that mount with "
                   "-o index-key=PUBKEY then use it.")
@click.option("--prefetch-from", "prefetch_from", metavar="MOUNTPOINT",
              help="Add the order in which the mount of this image at MOUNTPOINT first read it (as its daemon "
                   "kept it a few seconds ago): hosts that use the index prefetch in that order.")
def push(spec: str, option_pairs: tuple[str, ...], key_file: str | None, prefetch_from: str | None) -> None:
    """Index every tar layer of an image (from the cache, or downloading it) and push the indexes to its
    repository as one OCI artifact whose subject is the image, for hosts with an empty cache to mount
    it without downloading its layers. Prints the artifact's digest."""
    from .published import load_signing_key

    scheme, _, location = spec.partition(":")
    if scheme != "oci" or not location:
        raise UsageError(f"index push: {spec!r} is not oci:REFERENCE")
    signing_key = load_signing_key(key_file) if key_file else None
    options = {}
    for pair in option_pairs:
        for item in filter(None, pair.split(",")):
            key, _, value = item.partition("=")
            options[key] = value
    digest, count = push_index(location, options, signing_key, progress=sys.stderr.isatty(),
                               prefetch_from=prefetch_from)
    click.echo(digest)
    click.echo(f"{count} layer index(es) pushed{', with a prefetch list' if prefetch_from else ''}"
               f"{', signed' if signing_key else ', unsigned'}", err=True)


def prefetch_list_of(mountpoint: str, manifest_digest: str) -> Any:
    """The order in which the whole-image mount at ``mountpoint`` first read the image ``manifest_digest``."""
    from erofs_mount_core import mounted_source

    from .prefetch import cached, list_name

    scheme, state = mounted_source(mountpoint)
    if scheme != "oci" or state.get("kind") != "image":
        raise UsageError(f"index push: --prefetch-from {mountpoint}: not a mount of a whole oci: image")
    if state.get("manifest_digest") != manifest_digest:
        raise UsageError(f"index push: --prefetch-from {mountpoint}: it serves image {state.get('manifest_digest')}, "
                         f"not {manifest_digest}")
    found = cached(list_name(manifest_digest))
    if found is None or not found.entries:
        raise UsageError(f"index push: --prefetch-from {mountpoint}: its daemon has kept no reads yet "
                         "(it keeps them every few seconds): read what the image is for first")
    return found


def push_index(location: str, options: Mapping[str, str], signing_key: Any, *, progress: bool,
               prefetch_from: str | None = None) -> tuple[str, int]:
    """``erofs-mount index push``: index the image's tar layers (those with a TOC need none) and push the
    indexes as one artifact whose subject is the image manifest, with the order in which the mount at
    ``prefetch_from`` read it; (its digest, how many layers it holds)."""
    from erofs_mount_core import check_options

    from . import reference as references
    from .credentials import CredentialSource
    from .layers import indexed
    from .options import SCHEME, Options, client_for, hosts_dir_of
    from .platform import Platform
    from .published import push
    from .registry import Registry

    check_options(SCHEME, options, Options.names())
    ref = references.parse(location)
    opts = Options.parse(options)
    if opts.layer is not None or opts.blob is not None:
        raise UsageError("index push: an index is pushed for the whole image: layer= and blob= do not apply")
    credentials = CredentialSource.parse(opts.credentials, ref.registry)
    platform = Platform.parse(opts.platform) if opts.platform else Platform.host()
    client = client_for(ref, insecure=opts.insecure, ca=opts.ca, credentials=credentials,
                     hosts_dir=hosts_dir_of(opts.hosts_dir))
    try:
        registry = Registry(client, ref, insecure=opts.insecure)
        manifest, digest, chosen = registry.image_manifest(platform)
        layers = [layer for layer in registry.tar_layers(manifest, digest, chosen) if layer.toc is None]
        if not layers and not prefetch_from:
            raise UsageError(f"index push: every layer of {ref} carries a table of contents: it needs no index "
                             "(--prefetch-from publishes its prefetch list alone)")
        diff_ids = registry.diff_ids(manifest)
        ids = [diff_ids[layer.index] for layer in layers]
        listed = prefetch_list_of(prefetch_from, digest) if prefetch_from else None
        found = indexed(registry, layers, ids, progress=progress).indexes
        subject = {"mediaType": manifest.get("mediaType") or registry.OCI_MANIFEST, "digest": digest,
                   "size": registry.manifest_size(digest)}
        return push(registry, subject, layers, ids, found, signing_key, listed)
    finally:
        client.close()
