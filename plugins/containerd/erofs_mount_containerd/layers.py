"""Layers that erofs-mount serves: one device per layer digest, mounted in overlay form under ``<root>/layers``.

Each is an ordinary ``erofs-mount mount`` of the image's layer (``oci:`` by
the manifest's digest, ``-o blob=DIGEST``): a device with a record, so
``watch`` and ``reattach`` keep it alive under a running container, and
``list`` shows it. Every snapshot of the layer (in any namespace, under any
parent) shares the one mount; the last one removed unmounts it. The commands
run as forks of a ``CommandServer`` started with the snapshotter, not as new
interpreters: a container's start waits for its layers' mounts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from erofs_mount_core import CommandServer

log = logging.getLogger("erofs_mount.containerd")

#: containerd's labels on a layer's Prepare (CRI, and ``snapshotter pull``): what to mount
SNAPSHOT_REF = "containerd.io/snapshot.ref"
IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"  # this layer's digest and the later ones', by commas
AHEAD = 2  # later layers mounted at once while containerd prepares one after another
MOUNT_TIMEOUT = 600  # seconds: a layer with no index and no TOC is downloaded and indexed first


class LayerError(Exception):
    """A layer that erofs-mount could not mount: containerd applies it instead."""


class Layers:
    def __init__(self, root: Path, options: str, commands: CommandServer) -> None:
        """``options``: erofs-mount's ``-o`` for every layer (``insecure``, ``hosts-dir``, ``credentials``...);
        ``commands``: the server that runs erofs-mount's commands (the snapshotter closes it)."""
        self._commands = commands
        self.root, self.options = root / "layers", options
        self.root.mkdir(mode=0o700, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._ahead = ThreadPoolExecutor(max_workers=AHEAD, thread_name_prefix="mount-ahead")
        self._failed: dict[str, LayerError] = {}  # a mount ahead that failed: its layer's Prepare says so

    def path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or len(hexdigest) != 64 or not all(c in "0123456789abcdef" for c in hexdigest):
            raise LayerError(f"layer digest {digest[:80]!r} is not a sha256 digest")
        return self.root / hexdigest

    def _lock(self, digest: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(digest, threading.Lock())

    def mount_ahead(self, labels: dict[str, str]) -> None:
        """Start mounting the image's later layers that ``labels`` list (``cri.image-layers``), a few at once:
        containerd prepares layers one after another, and each waits for the one before."""
        for digest in labels.get(IMAGE_LAYERS, "").split(",")[1:]:
            try:
                target = self.path(digest)
            except LayerError:
                continue  # (its own Prepare says so)
            if not os.path.ismount(target) and not self._lock(digest).locked():
                self._ahead.submit(self._mount_quietly, {**labels, LAYER_DIGEST: digest})

    def _mount_quietly(self, labels: dict[str, str]) -> None:
        try:
            self.mount(labels)
        except LayerError as exc:
            self._failed[labels[LAYER_DIGEST]] = exc

    def mount(self, labels: dict[str, str]) -> str:
        """The layer the labels name, mounted (once: a layer mounted already is shared); its digest."""
        digest, image = labels.get(LAYER_DIGEST, ""), labels.get(IMAGE_REF, "")
        target = self.path(digest)
        with self._lock(digest):
            if os.path.ismount(target):
                return digest
            failed = self._failed.pop(digest, None)
            if failed is not None:  # a mount ahead of it failed just now: not tried twice
                raise failed
            target.mkdir(mode=0o700, exist_ok=True)
            source = f"oci:{pinned(image, labels.get(MANIFEST_DIGEST, ''))}"
            options = ",".join(o for o in (f"blob={digest}", self.options) if o)
            started = time.monotonic()
            result = self._erofs_mount("mount", "--source", source, "-o", options, str(target))
            took = time.monotonic() - started
            if result.returncode != 0:
                with contextlib.suppress(OSError):
                    target.rmdir()
                said = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
                raise LayerError(f"layer {digest} of {image}: {said} (after {took:.1f} s)")
            for line in result.stderr.splitlines()[-20:]:  # what the mount warned of (a layer indexed here, say)
                log.warning("layer %s: %s", digest, line)
            log.info("layer %s of %s mounted at %s in %.1f s", digest, image, target, took)
            return digest

    def unmount(self, digest: str) -> None:
        target = self.path(digest)
        with self._lock(digest):
            if os.path.ismount(target):
                result = self._erofs_mount("umount", str(target))
                if result.returncode != 0:
                    log.warning("layer %s: erofs-mount umount failed: %s", digest, result.stderr.strip())
                    return
            with contextlib.suppress(OSError):
                target.rmdir()

    def close(self) -> None:
        self._ahead.shutdown(wait=True, cancel_futures=True)

    def _erofs_mount(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._commands.run(args, MOUNT_TIMEOUT)

    def mounted(self) -> list[str]:
        """The digests of the layers mounted here now."""
        return [f"sha256:{p.name}" for p in sorted(self.root.iterdir()) if os.path.ismount(p)]


def pinned(image: str, manifest: str) -> str:
    """``image`` (a reference, as CRI labels it) by its manifest's digest when that is known: the layer comes
    from exactly the image containerd resolved, whatever the tag names later."""
    if not manifest:
        return image
    from erofs_mount_oci import pinned_reference

    return pinned_reference(image, manifest)

