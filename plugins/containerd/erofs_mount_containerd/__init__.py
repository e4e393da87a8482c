"""erofs-mount for containerd: a snapshotter (``erofs-mount snapshotter``) whose image layers erofs-mount mounts.

containerd reaches it as a proxy plugin over gRPC (``service``); a layer
whose Prepare carries the remote-snapshot labels is an ordinary
erofs-mount device (``layers``), so ``watch`` and ``reattach`` keep it
alive under running containers; ``snapshotter pull`` makes an image of
containerd whose layers are prepared so (``pull``).
"""

from __future__ import annotations

from typing import Any

from erofs_mount_core import hookimpl

__all__: list[str] = []  # a plugin only: nothing for other code to import


@hookimpl
def erofs_mount_register_commands(cli: Any) -> None:
    from .commands import snapshotter

    cli.add_command(snapshotter)
