"""containerd's ``Snapshots`` service: an overlay snapshotter whose image layers erofs-mount mounts lazily.

Without containerd's remote-snapshot labels it is containerd's overlay
snapshotter: each snapshot a directory (``<root>/snapshots/<id>/fs``, and
``work`` for overlayfs), an active one mounted as overlayfs over its
parents (a bind mount when it has none), a view read-only. A Prepare that
carries the labels of a layer (``containerd.io/snapshot.ref`` and the CRI
image and layer labels, which ``snapshotter pull`` sets too) has
erofs-mount mount that layer (``layers``), records a committed snapshot
named for it and answers ALREADY_EXISTS: containerd then neither fetches
nor unpacks the layer, and a container's rootfs is overlayfs over those
layer mounts and its own upper directory. A layer erofs-mount cannot mount
is prepared as an ordinary snapshot, which containerd fills itself.

Every request is one sqlite transaction (``store``), made before the
directories it names are removed and after those it names are made, so a
kill leaves at worst a directory or a mount no snapshot names, which
``Cleanup`` (and every start) removes. containerd calls Cleanup (its
garbage collector) while other requests run: a snapshot's directories and
a layer's mount exist before their row commits, so Cleanup scans under
the lock that a new snapshot's row and directories are made under, and
passes over the layers a Prepare is mounting (``_claiming``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from . import filters
from ._api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .layers import IMAGE_REF, LAYER_DIGEST, SNAPSHOT_REF, LayerError, Layers
from .store import ACTIVE, COMMITTED, VIEW, Snapshot, Store, StoreError

log = logging.getLogger("erofs_mount.containerd")

BATCH = 100  # snapshots per List message
Reply = TypeVar("Reply")


class Snapshotter(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, root: Path, layers: Layers) -> None:
        self.root, self.layers = root, layers
        (root / "snapshots").mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = Store(root / "metadata.db")
        self._changes = threading.Lock()  # Cleanup's scan, against new rows' directories and layers' claims
        self._claimed: Counter[str] = Counter()  # layers a Prepare is mounting, before their rows commit

    # -- the calls -------------------------------------------------------------------------------

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's names
        def prepare() -> Any:
            labels = dict(request.labels)
            if labels.get(SNAPSHOT_REF) and labels.get(LAYER_DIGEST) and labels.get(IMAGE_REF):
                remote = self._remote(request.key, request.parent, labels)
                if remote is not None:
                    raise StoreError(grpc.StatusCode.ALREADY_EXISTS, f"target snapshot {labels[SNAPSHOT_REF]}: "
                                     f"layer {labels[LAYER_DIGEST]} mounted by erofs-mount ({remote.key})")
            snapshot = self._create(request.key, request.parent, ACTIVE, labels)
            return snapshots_pb2.PrepareSnapshotResponse(mounts=self._mounts(snapshot))
        return _answer(context, prepare)

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def view() -> Any:
            snapshot = self._create(request.key, request.parent, VIEW, dict(request.labels))
            return snapshots_pb2.ViewSnapshotResponse(mounts=self._mounts(snapshot))
        return _answer(context, view)

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, lambda: snapshots_pb2.MountsResponse(mounts=self._mounts(self.store.get(request.key))))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def commit() -> Any:
            active = self.store.get(request.key)
            size, inodes = usage(self._fs(active)) if active.kind == ACTIVE else (0, 0)
            with self.store.transaction() as db:
                self.store.commit(db, request.name, request.key, dict(request.labels), size, inodes)
            return empty_pb2.Empty()
        return _answer(context, commit)

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def remove() -> Any:
            with self.store.transaction() as db:
                gone = self.store.remove(db, request.key)
            if gone.layer is not None:
                self._unmount_unused(gone.layer)
            shutil.rmtree(self._dir(gone), ignore_errors=True)
            return empty_pb2.Empty()
        return _answer(context, remove)

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, lambda: snapshots_pb2.StatSnapshotResponse(info=_info(self.store.get(request.key))))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def update() -> Any:
            with self.store.transaction() as db:
                updated = self.store.update_labels(db, request.info.name, dict(request.info.labels),
                                                   list(request.update_mask.paths))
            return snapshots_pb2.UpdateSnapshotResponse(info=_info(updated))
        return _answer(context, update)

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802
        try:
            match = filters.parse(list(request.filters))
        except StoreError as exc:
            context.abort(exc.code, str(exc))
        found = [_info(s) for s in self.store.all() if match(s)]
        for start in range(0, len(found), BATCH):
            yield snapshots_pb2.ListSnapshotsResponse(info=found[start:start + BATCH])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def measured() -> Any:
            snapshot = self.store.get(request.key)
            if snapshot.kind == ACTIVE:
                size, inodes = usage(self._fs(snapshot))
            else:
                size, inodes = snapshot.size, snapshot.inodes
            return snapshots_pb2.UsageResponse(size=size, inodes=inodes)
        return _answer(context, measured)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _answer(context, lambda: (self.cleanup(), empty_pb2.Empty())[1])

    # -- the work ----------------------------------------------------------------------------------

    def _create(self, key: str, parent: str, kind: int, labels: dict[str, str]) -> Snapshot:
        with self._changes, self.store.transaction() as db:
            snapshot = self.store.create(db, key, parent, kind, labels)
            where = self._dir(snapshot)
            (where / "fs").mkdir(mode=0o755, parents=True, exist_ok=True)  # before the row is committed
            (where / "work").mkdir(mode=0o711, exist_ok=True)
        return snapshot

    def _remote(self, key: str, parent: str, labels: dict[str, str]) -> Snapshot | None:
        """The committed snapshot of the layer ``labels`` name, on ``parent``: found, or mounted and recorded
        now; None when erofs-mount cannot mount it (containerd applies it then)."""
        target = labels[SNAPSHOT_REF]
        name = f"{key.split('/', 1)[0]}/erofs-mount/{target}"  # containerd's namespace, then the chain
        existing = self.store.find(name)
        if existing is not None and existing.parent == parent:
            return existing
        if parent and self.store.find(parent) is None:
            raise StoreError(grpc.StatusCode.NOT_FOUND, f"parent snapshot {parent} does not exist")
        self.layers.mount_ahead(labels)
        digest = labels[LAYER_DIGEST]
        try:
            with self._claiming(digest):
                self.layers.mount(labels)
                with self.store.transaction() as db:
                    return self.store.create(db, name, parent, COMMITTED, labels, layer=digest)
        except LayerError as exc:
            log.warning("%s; containerd applies the layer itself", exc)
            return None
        except BaseException:
            self._unmount_unused(digest)
            raise

    @contextlib.contextmanager
    def _claiming(self, digest: str) -> Iterator[None]:
        """``digest``'s mount kept from Cleanup and Remove while a Prepare mounts it and records its row."""
        with self._changes:
            self._claimed[digest] += 1
        try:
            yield
        finally:
            with self._changes:
                self._claimed[digest] -= 1
                if not self._claimed[digest]:
                    del self._claimed[digest]

    def _unmount_unused(self, digest: str) -> None:
        with self._changes:
            if not self._claimed[digest] and self.store.layer_users(digest) == 0:
                self.layers.unmount(digest)

    def _mounts(self, snapshot: Snapshot) -> list[Any]:
        parents = [self._fs(p) for p in self.store.chain(snapshot)]
        lower = "lowerdir=" + ":".join(str(p) for p in parents)
        if snapshot.kind == ACTIVE:
            if not parents:
                return [_mount("bind", self._fs(snapshot), ["rw", "rbind"])]
            return [_mount("overlay", "overlay", [f"workdir={self._dir(snapshot) / 'work'}",
                                                  f"upperdir={self._fs(snapshot)}", lower])]
        if snapshot.kind == VIEW:
            if not parents:
                return [_mount("bind", self._fs(snapshot), ["ro", "rbind"])]
            if len(parents) == 1:
                return [_mount("bind", parents[0], ["ro", "rbind"])]
            return [_mount("overlay", "overlay", [lower])]
        raise StoreError(grpc.StatusCode.FAILED_PRECONDITION, f"snapshot {snapshot.key} is committed: it has no "
                         "mounts of its own (prepare a view of it)")

    def _dir(self, snapshot: Snapshot) -> Path:
        return self.root / "snapshots" / str(snapshot.id)

    def _fs(self, snapshot: Snapshot) -> Path:
        return self.layers.path(snapshot.layer) if snapshot.layer else self._dir(snapshot) / "fs"

    def cleanup(self) -> None:
        """Directories and layer mounts that no snapshot names (a kill between a change and its files). A
        layer mounted ahead of its Prepare may be one: its Prepare mounts it again."""
        with self._changes:
            known = self.store.all()
            ids = {str(s.id) for s in known}
            orphans = [where for where in (self.root / "snapshots").iterdir()
                       if where.name not in ids and not os.path.ismount(where / "fs")]
            used = {s.layer for s in known if s.layer} | set(self._claimed)
            for digest in self.layers.mounted():
                if digest not in used:
                    log.info("layer %s: mounted, but no snapshot uses it: unmounted", digest)
                    self.layers.unmount(digest)
        for where in orphans:  # (ids are never used again: no new snapshot makes these)
            shutil.rmtree(where, ignore_errors=True)

    def remount(self) -> None:
        """At start: each layer a snapshot uses, mounted again if it is not (the host rebooted)."""
        mounted = set(self.layers.mounted())
        for snapshot in self.store.all():
            if snapshot.layer and snapshot.layer not in mounted:
                try:
                    self.layers.mount(snapshot.labels)
                except LayerError as exc:
                    log.error("%s: snapshot %s cannot be served", exc, snapshot.key)
                    continue
                mounted.add(snapshot.layer)

    def close(self) -> None:
        self.layers.close()
        self.store.close()


def usage(path: Path) -> tuple[int, int]:
    """Bytes and inodes under ``path`` (as containerd's ``fs.DiskUsage``: each inode once)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for top, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                st = os.lstat(os.path.join(top, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
    return size, len(seen)


def _mount(kind: str, source: Path | str, options: list[str]) -> Any:
    return mount_pb2.Mount(type=kind, source=str(source), options=options)


def _info(snapshot: Snapshot) -> Any:
    def stamp(seconds: float) -> Any:
        t = timestamp_pb2.Timestamp()
        t.FromNanoseconds(int(seconds * 1e9))
        return t
    return snapshots_pb2.Info(name=snapshot.key, parent=snapshot.parent, kind=snapshot.kind,
                              created_at=stamp(snapshot.created), updated_at=stamp(snapshot.updated),
                              labels=snapshot.labels)


def _answer(context: grpc.ServicerContext, call: Callable[[], Reply]) -> Reply:
    """The call's reply, or its one-line error with the gRPC code containerd maps to its errdefs."""
    try:
        return call()
    except StoreError as exc:
        context.abort(exc.code, str(exc))
    except OSError as exc:
        log.error("%s", exc)
        context.abort(grpc.StatusCode.INTERNAL, f"{exc.strerror}: {exc.filename}")
    raise AssertionError("unreachable")  # (abort raises)
