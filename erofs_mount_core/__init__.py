"""erofs-mount: mount EROFS images through the Linux NBD driver.

The public API for source plugins is what this module exports::

    from erofs_mount_core import Source, SourceError, SourceChangedError, UsageError, hookimpl
    from erofs_mount_core import CacheSettings, RetryPolicy   # filters a plugin may use
    from erofs_mount_core import ImageNode, SynthesizedImage  # an EROFS image made from a tree

with the hook specifications in ``erofs_mount_core.hookspecs`` and the
contract kit in ``erofs_mount_core.testing``. Every other module is private
(its name starts with ``_``) and may change in any release.

Names load on first use, so that ``erofs-mount --help`` does not pay for pluggy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BlockCache": "_filters",
    "CacheSettings": "_filters",
    "ErofsMountError": "_errors",
    "Filter": "_filters",
    "ImageNode": "_erofs.build",
    "RetryPolicy": "_filters",
    "Source": "_source",
    "SourceChangedError": "_errors",
    "SourceError": "_errors",
    "SynthesizedImage": "_erofs.image",
    "UsageError": "_errors",
    "hookimpl": "hookspecs",
}

__all__ = [
    "BlockCache",
    "CacheSettings",
    "ErofsMountError",
    "Filter",
    "ImageNode",
    "RetryPolicy",
    "Source",
    "SourceChangedError",
    "SourceError",
    "SynthesizedImage",
    "UsageError",
    "hookimpl",
]

if TYPE_CHECKING:
    from ._erofs.build import ImageNode
    from ._erofs.image import SynthesizedImage
    from ._errors import ErofsMountError, SourceChangedError, SourceError, UsageError
    from ._filters import BlockCache, CacheSettings, Filter, RetryPolicy
    from ._source import Source
    from .hookspecs import hookimpl


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'erofs_mount_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
