"""Published indexes that a background pass found false, kept in the cache by the artifact's digest.

A mount never uses such an artifact again (it looks for another, or
indexes the layers here), and a reattach that pins one is refused with
the line the pass wrote: the bytes it would serve are not the image's.
"""

from __future__ import annotations

import os
from pathlib import Path

from erofs_mount_core import cache_directory, open_cache_file, write_cache_file

REFUSED_DIR = "oci-refused"
MAX_WHY = 4096  # the line kept; a file longer than an artifact's line is not one of ours


def _path(artifact: str) -> Path:
    return cache_directory(REFUSED_DIR) / artifact.replace(":", "-")


def refuse(artifact: str, why: str) -> None:
    write_cache_file(_path(artifact), why.encode()[:MAX_WHY])


def why_refused(artifact: str) -> str | None:
    """The line kept when ``artifact`` was found false, or None if it never was."""
    fd = open_cache_file(_path(artifact))
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_WHY).decode(errors="replace") or "refused by a background pass"
