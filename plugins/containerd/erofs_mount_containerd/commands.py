"""``erofs-mount snapshotter``: the commands this plugin adds to ``erofs-mount`` (``erofs_mount_register_commands``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from erofs_mount_core import UsageError

ADDRESS = "/run/erofs-mount/snapshotter.sock"
ROOT = "/var/lib/erofs-mount-snapshotter"
CONTAINERD = "/run/containerd/containerd.sock"
OPTIONS_HELP = ("erofs-mount's oci: options for every layer (insecure, credentials=, hosts-dir=, ca=, "
                "index-key=...), as for mount.")


@click.group(name="snapshotter", invoke_without_command=True)
@click.option("--address", default=ADDRESS, show_default=True, type=click.Path(path_type=Path),
              help="The unix socket containerd's proxy plugin names.")
@click.option("--root", default=ROOT, show_default=True, type=click.Path(path_type=Path),
              help="Where the snapshots' metadata, directories and layer mounts are kept.")
@click.option("-o", "--option", "option_pairs", multiple=True, metavar="KEY[=VALUE][,...]", help=OPTIONS_HELP)
@click.pass_context
def snapshotter(ctx: click.Context, address: Path, root: Path, option_pairs: tuple[str, ...]) -> None:
    """Serve containerd's snapshots API: image layers mounted lazily through erofs-mount.

    \b
    In containerd's config.toml:
      [proxy_plugins.erofs-mount]
        type = "snapshot"
        address = "/run/erofs-mount/snapshotter.sock"

    Then 'erofs-mount snapshotter pull REF' and 'ctr run --snapshotter
    erofs-mount REF ID CMD'. Runs in the foreground until SIGTERM.
    """
    if ctx.invoked_subcommand is not None:
        return
    _require_root("snapshotter")
    from .server import serve

    serve(address, root, ",".join(option_pairs), commands_address(address))


@snapshotter.command()
@click.argument("reference")
@click.option("-o", "--option", "option_pairs", multiple=True, metavar="KEY[=VALUE][,...]",
              help="oci: options for resolving the image (insecure, credentials=, hosts-dir=, platform=...).")
@click.option("--containerd-address", default=CONTAINERD, show_default=True, help="containerd's socket.")
@click.option("-n", "--namespace", default="default", show_default=True, help="containerd's namespace.")
@click.option("--snapshotter-name", "name", default="erofs-mount", show_default=True,
              help="The proxy plugin's name in containerd's config.")
@click.option("--in-process", is_flag=True,
              help="Pull in this process, not in the running snapshotter's (which has its libraries loaded).")
@click.pass_context
def pull(ctx: click.Context, reference: str, option_pairs: tuple[str, ...], containerd_address: str,
         namespace: str, name: str, in_process: bool) -> None:
    """Make REFERENCE an image of containerd whose layers erofs-mount mounts, as CRI does for a remote
    snapshotter: its manifest and config written to containerd's content store, the image created, each
    layer's snapshot prepared with the labels that name it. Prints the image's name.

    The snapshotter at --address runs the pull when it is there (in a fork of a process with gRPC and the
    oci: source loaded, with this command's environment, directory and output); else it runs here."""
    _require_root("snapshotter pull")
    if not in_process:
        from erofs_mount_core import run_through

        args = [reference, "--containerd-address", containerd_address, "--namespace", namespace,
                "--snapshotter-name", name, *(f"--option={pair}" for pair in option_pairs)]
        code = run_through(commands_address(ctx.parent.params["address"]), args)
        if code is not None:
            ctx.exit(code)
    from .pull import pull_image

    options = {}
    for pair in option_pairs:
        for item in filter(None, pair.split(",")):
            key, _, value = item.partition("=")
            options[key] = value
    click.echo(pull_image(reference, options, containerd_address, namespace, name))


def commands_address(address: Path) -> Path:
    """Where the snapshotter serving at ``address`` takes commands handed to it (``snapshotter pull``)."""
    return address.with_name(f"{address.stem}-commands{address.suffix}")


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} needs root: it mounts layers and serves containerd")
