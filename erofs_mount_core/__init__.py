"""erofs-mount: mount EROFS images through the Linux NBD driver.

The public API for source plugins is what this module exports::

    from erofs_mount_core import Source, SourceError, SourceChangedError, UsageError, hookimpl
    from erofs_mount_core import InnerSource  # the source a wrapping scheme's location names (gz:web:...)
    from erofs_mount_core import CacheSettings, RetryPolicy   # filters a plugin may use
    from erofs_mount_core import check_options  # the host's check of -o names, for callers without the host
    from erofs_mount_core import final_network_error, read_capped  # a failure no retry changes; bounded bodies
    from erofs_mount_core import Counters  # what a source counts, for stats and metrics
    from erofs_mount_core import ImageNode, ImageLayout, SynthesizedImage  # an EROFS image made from a tree
    from erofs_mount_core import SpanHashes, SpanHasher  # reads checked against hashes taken once
    from erofs_mount_core import SpanStore, FillJob  # checked spans kept on disk, shared, kept across reattach
    from erofs_mount_core import cache_directory, cache_room, open_cache_file, write_cache_file  # kept between mounts
    from erofs_mount_core import mounted_source  # what a mounted device serves, for a plugin's commands
    from erofs_mount_core import CommandServer  # erofs-mount commands run as forks of a warm process
    from erofs_mount_core import CommandSocket, run_through  # ...handed to that process by a new one

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
    "CommandServer": "_forkserver",
    "CommandSocket": "_command_socket",
    "Counters": "_metrics",
    "ErofsMountError": "_errors",
    "FillJob": "_span_store",
    "Filter": "_filters",
    "ImageLayout": "_erofs.build",
    "ImageNode": "_erofs.build",
    "InnerSource": "_source",
    "RetryPolicy": "_filters",
    "Source": "_source",
    "SourceChangedError": "_errors",
    "SourceError": "_errors",
    "SpanHashes": "_span_hashes",
    "SpanHasher": "_span_hashes",
    "SpanStore": "_span_store",
    "SynthesizedImage": "_erofs.synthesized",
    "UsageError": "_errors",
    "cache_directory": "_cache",
    "cache_room": "_cache",
    "check_options": "_plugins",
    "final_network_error": "_network",
    "hookimpl": "hookspecs",
    "mounted_source": "_devices",
    "open_cache_file": "_cache",
    "read_capped": "_network",
    "run_through": "_command_socket",
    "write_cache_file": "_cache",
}

__all__ = [
    "BlockCache",
    "CacheSettings",
    "CommandServer",
    "CommandSocket",
    "Counters",
    "ErofsMountError",
    "FillJob",
    "Filter",
    "ImageLayout",
    "ImageNode",
    "InnerSource",
    "RetryPolicy",
    "Source",
    "SourceChangedError",
    "SourceError",
    "SpanHasher",
    "SpanHashes",
    "SpanStore",
    "SynthesizedImage",
    "UsageError",
    "cache_directory",
    "cache_room",
    "check_options",
    "final_network_error",
    "hookimpl",
    "mounted_source",
    "open_cache_file",
    "read_capped",
    "run_through",
    "write_cache_file",
]

if TYPE_CHECKING:
    from ._cache import cache_directory, cache_room, open_cache_file, write_cache_file
    from ._command_socket import CommandSocket, run_through
    from ._devices import mounted_source
    from ._erofs.build import ImageLayout, ImageNode
    from ._erofs.synthesized import SynthesizedImage
    from ._errors import ErofsMountError, SourceChangedError, SourceError, UsageError
    from ._filters import BlockCache, CacheSettings, Filter, RetryPolicy
    from ._forkserver import CommandServer
    from ._metrics import Counters
    from ._source import Source
    from ._span_hashes import SpanHasher, SpanHashes
    from ._span_store import FillJob, SpanStore
    from .hookspecs import hookimpl


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'erofs_mount_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
