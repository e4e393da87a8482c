"""The snapshots' metadata, in sqlite: every change one transaction, so a kill at any moment leaves either the
state before it or the state after it.

A snapshot is a row: its key (containerd's), its parent's key, its kind
(containerd's numbers: view 1, active 2, committed 3), its labels, its
times, and for a layer that erofs-mount serves, that layer's digest (its
mount is shared by every snapshot of the layer: ``layers``). Its
directories are named by its id, which a commit keeps. The rules are
containerd's own snapshotters' (``snapshots/storage``): a key is unique,
a parent must exist and be committed, only an active snapshot commits,
only a childless one is removed; a rule broken raises ``StoreError`` with
the gRPC code containerd maps to its errdefs.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import grpc

VIEW, ACTIVE, COMMITTED = 1, 2, 3
KINDS = {"view": VIEW, "active": ACTIVE, "committed": COMMITTED}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL CHECK (kind IN (1, 2, 3)),
    labels TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    layer TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE INDEX IF NOT EXISTS snapshots_layer ON snapshots(layer);
"""


class StoreError(Exception):
    """A request containerd may not make, or one about a snapshot that is not there: its gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class Snapshot:
    id: int
    key: str
    parent: str
    kind: int
    labels: dict[str, str]
    created: float
    updated: float
    layer: str | None
    """the digest of the layer erofs-mount serves for it, if it is one"""
    size: int = 0
    inodes: int = 0


class Store:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()  # one writer at a time, and reads never see a half-made change

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: str) -> Snapshot:
        with self._lock:
            return self._get(self._db, key)

    def find(self, key: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return _snapshot(row) if row else None

    def all(self) -> list[Snapshot]:
        with self._lock:
            return [_snapshot(row) for row in self._db.execute(_SELECT + " ORDER BY s.id")]

    def chain(self, snapshot: Snapshot) -> list[Snapshot]:
        """``snapshot``'s parents, the nearest first."""
        found = []
        with self._lock:
            while snapshot.parent:
                snapshot = self._get(self._db, snapshot.parent)
                found.append(snapshot)
        return found

    def layer_users(self, layer: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM snapshots WHERE layer = ?", (layer,)).fetchone()[0]

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> Snapshot:
        row = db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise StoreError(grpc.StatusCode.NOT_FOUND, f"snapshot {key} does not exist")
        return _snapshot(row)

    # -- changes (each in the caller's transaction) --------------------------------------------------

    def create(self, db: sqlite3.Connection, key: str, parent: str, kind: int, labels: dict[str, str], *,
               layer: str | None = None) -> Snapshot:
        if not key:
            raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, "a snapshot needs a key")
        if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone():
            raise StoreError(grpc.StatusCode.ALREADY_EXISTS, f"snapshot {key} already exists")
        parent_id = None
        if parent:
            found = db.execute("SELECT id, kind FROM snapshots WHERE key = ?", (parent,)).fetchone()
            if found is None:
                raise StoreError(grpc.StatusCode.NOT_FOUND, f"parent snapshot {parent} does not exist")
            if found[1] != COMMITTED:
                raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, f"parent {parent} is not a committed snapshot")
            parent_id = found[0]
        now = time.time()
        check_labels(labels)
        db.execute("INSERT INTO snapshots (key, parent_id, kind, labels, created, updated, layer) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (key, parent_id, kind, json.dumps(labels), now, now, layer))
        return self._get(db, key)

    def commit(self, db: sqlite3.Connection, name: str, key: str, labels: dict[str, str], size: int,
               inodes: int) -> Snapshot:
        active = self._get(db, key)
        if active.kind != ACTIVE:
            raise StoreError(grpc.StatusCode.FAILED_PRECONDITION, f"snapshot {key} is not active: only an active "
                             "snapshot commits")
        if db.execute("SELECT 1 FROM snapshots WHERE key = ?", (name,)).fetchone():
            raise StoreError(grpc.StatusCode.ALREADY_EXISTS, f"snapshot {name} already exists")
        merged = {**active.labels, **labels}
        check_labels(merged)
        db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ?, size = ?, inodes = ? "
                   "WHERE id = ?", (name, COMMITTED, json.dumps(merged), time.time(), size, inodes, active.id))
        return self._get(db, name)

    def remove(self, db: sqlite3.Connection, key: str) -> Snapshot:
        snapshot = self._get(db, key)
        if db.execute("SELECT 1 FROM snapshots WHERE parent_id = ?", (snapshot.id,)).fetchone():
            raise StoreError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot remove snapshot {key}: it has children")
        db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot.id,))
        return snapshot

    def update_labels(self, db: sqlite3.Connection, key: str, labels: dict[str, str],
                      paths: list[str]) -> Snapshot:
        """containerd's rule: no paths replaces the labels; ``labels`` does too; ``labels.K`` sets (or, absent
        from ``labels``, removes) one; any other path is refused."""
        snapshot = self._get(db, key)
        now = dict(snapshot.labels)
        if not paths:
            now = dict(labels)
        for path in paths:
            if path == "labels":
                now = dict(labels)
            elif path.startswith("labels."):
                name = path.removeprefix("labels.")
                if name in labels:
                    now[name] = labels[name]
                else:
                    now.pop(name, None)
            else:
                raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot update {path!r} of snapshot {key}")
        check_labels(now)
        db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                   (json.dumps(now), time.time(), snapshot.id))
        return self._get(db, key)


def check_labels(labels: dict[str, str]) -> None:
    """containerd's bound: a label's key and value, 4096 bytes at most together."""
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > 4096:
            raise StoreError(grpc.StatusCode.INVALID_ARGUMENT, f"label {key[:64]!r} is longer than 4096 bytes")


_SELECT = ("SELECT s.id, s.key, COALESCE(p.key, ''), s.kind, s.labels, s.created, s.updated, s.layer, s.size, "
           "s.inodes FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id")


def _snapshot(row: Any) -> Snapshot:
    return Snapshot(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7], row[8], row[9])
