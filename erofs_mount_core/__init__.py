"""erofs-mount: mount EROFS images through the Linux NBD driver.

The public API for source plugins is what this module exports::

    from erofs_mount_core import Source, SourceError, SourceChangedError, UsageError, hookimpl
"""

from .errors import (
    ErofsMountError,
    SourceChangedError,
    SourceError,
    UsageError,
)
from .hookspecs import hookimpl
from .source import Source

__version__ = "0.1.0"

__all__ = [
    "ErofsMountError",
    "Source",
    "SourceChangedError",
    "SourceError",
    "UsageError",
    "hookimpl",
]
