"""erofs-mount: mount EROFS images through the Linux NBD driver.

The public API for source plugins is what this module exports::

    from erofs_mount_core import Source, SourceError, SourceChangedError, UsageError, hookimpl

Names load on first use, so that ``erofs-mount --help`` does not pay for pluggy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ErofsMountError": "errors",
    "SourceChangedError": "errors",
    "SourceError": "errors",
    "UsageError": "errors",
    "hookimpl": "hookspecs",
    "Source": "source",
}

__all__ = ["ErofsMountError", "Source", "SourceChangedError", "SourceError", "UsageError", "hookimpl"]

if TYPE_CHECKING:
    from .errors import ErofsMountError, SourceChangedError, SourceError, UsageError
    from .hookspecs import hookimpl
    from .source import Source


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'erofs_mount_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
