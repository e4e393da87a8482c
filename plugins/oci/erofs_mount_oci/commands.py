"""``erofs-mount index push``: the commands this plugin adds to ``erofs-mount`` (``erofs_mount_register_commands``)."""

from __future__ import annotations

import sys

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
def push(spec: str, option_pairs: tuple[str, ...], key_file: str | None) -> None:
    """Index every tar layer of an image (from the cache, or downloading it) and push the indexes to its
    repository as one OCI artifact whose subject is the image, for hosts with an empty cache to mount
    it without downloading its layers. Prints the artifact's digest."""
    from . import push_index
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
    digest, count = push_index(location, options, signing_key, progress=sys.stderr.isatty())
    click.echo(digest)
    click.echo(f"{count} layer index(es) pushed{', signed' if signing_key else ', unsigned'}", err=True)
