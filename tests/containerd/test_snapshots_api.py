"""The snapshotter's gRPC service, called as containerd calls it: containerd's overlay snapshotter's rules.

These run the service in this process over a real unix socket with
containerd's own API messages; containerd itself drives it in the VM
(``tests/vm/test_containerd.py``).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from erofs_mount_containerd._api import snapshots_pb2, snapshots_pb2_grpc
from erofs_mount_containerd.layers import IMAGE_REF, LAYER_DIGEST, SNAPSHOT_REF, Layers
from erofs_mount_containerd.pull import chain_ids
from erofs_mount_containerd.service import Snapshotter
from google.protobuf import field_mask_pb2

from erofs_mount_core import CommandServer

S = snapshots_pb2


class Client:
    def __init__(self, stub: snapshots_pb2_grpc.SnapshotsStub) -> None:
        self.stub = stub

    def __getattr__(self, name: str):  # noqa: ANN204 - each call of the stub, with the snapshotter's name
        method = getattr(self.stub, name)
        request = getattr(S, {"Prepare": "PrepareSnapshotRequest", "View": "ViewSnapshotRequest",
                              "Mounts": "MountsRequest", "Commit": "CommitSnapshotRequest",
                              "Remove": "RemoveSnapshotRequest", "Stat": "StatSnapshotRequest",
                              "Update": "UpdateSnapshotRequest", "List": "ListSnapshotsRequest",
                              "Usage": "UsageRequest", "Cleanup": "CleanupRequest"}[name])
        return lambda **fields: method(request(snapshotter="erofs-mount", **fields))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Client, Snapshotter]]:
    root = tmp_path / "root"
    root.mkdir()
    commands = CommandServer()
    service = Snapshotter(root, Layers(root, "insecure", commands))
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{tmp_path / 'sock'}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'sock'}")
    try:
        yield Client(snapshots_pb2_grpc.SnapshotsStub(channel)), service
    finally:
        channel.close()
        server.stop(None)
        service.close()
        commands.close()


def code_of(call) -> grpc.StatusCode:  # noqa: ANN001 - a call that must fail
    with pytest.raises(grpc.RpcError) as failed:
        call()
    assert len(failed.value.details().splitlines()) == 1, failed.value.details()
    return failed.value.code()


def test_the_life_of_an_image_s_snapshots_as_containerd_unpacks_and_runs_it(served: tuple[Client, Snapshotter],
                                                                           tmp_path: Path) -> None:
    client, service = served
    first = client.Prepare(key="default/1/extract-a sha256:one", parent="").mounts
    assert [(m.type, list(m.options)) for m in first] == [("bind", ["rw", "rbind"])]
    (Path(first[0].source) / "hello").write_text("layer one\n")
    client.Commit(name="default/2/sha256:one", key="default/1/extract-a sha256:one",
                  labels={"containerd.io/snapshot.ref": "sha256:one"})
    second = client.Prepare(key="default/3/extract-b sha256:two", parent="default/2/sha256:one").mounts
    (mount,) = second
    options = dict(o.split("=", 1) for o in mount.options)
    assert mount.type == "overlay" and options["lowerdir"] == first[0].source
    client.Commit(name="default/4/sha256:two", key="default/3/extract-b sha256:two")
    rootfs = client.Prepare(key="default/5/container", parent="default/4/sha256:two").mounts[0]
    lower = dict(o.split("=", 1) for o in rootfs.options)["lowerdir"].split(":")
    assert lower[1] == first[0].source and len(lower) == 2, "the nearest parent first"

    info = client.Stat(key="default/2/sha256:one").info
    assert info.kind == S.COMMITTED and info.labels["containerd.io/snapshot.ref"] == "sha256:one"
    assert client.Usage(key="default/2/sha256:one").size > 0
    view = client.View(key="default/6/view", parent="default/2/sha256:one").mounts
    assert [(m.type, m.source, list(m.options)) for m in view] == [("bind", first[0].source, ["ro", "rbind"])]

    listed = [i.name for r in client.List(filters=[]) for i in r.info]
    assert len(listed) == 4 and "default/5/container" in listed
    wanted = [i.name for r in client.List(filters=['labels."containerd.io/snapshot.ref"==sha256:one,parent==""'])
              for i in r.info]
    assert wanted == ["default/2/sha256:one"]
    assert [i.name for r in client.List(filters=["kind==active", "name~=view$"]) for i in r.info] == \
        ["default/5/container", "default/6/view"]

    updated = client.Update(info=S.Info(name="default/2/sha256:one", labels={"team": "a"}),
                            update_mask=field_mask_pb2.FieldMask(paths=["labels.team"])).info
    assert updated.labels["team"] == "a" and updated.labels["containerd.io/snapshot.ref"] == "sha256:one"

    for key in ("default/6/view", "default/5/container", "default/4/sha256:two", "default/2/sha256:one"):
        client.Remove(key=key)
    assert [i for r in client.List(filters=[]) for i in r.info] == []
    assert os.listdir(tmp_path / "root" / "snapshots") == [], "a removed snapshot's directory is gone"


def test_bad_requests_are_one_clear_error_each_and_change_nothing(served: tuple[Client, Snapshotter],
                                                                  tmp_path: Path) -> None:
    client, _ = served
    client.Prepare(key="a", parent="")
    client.Commit(name="base", key="a")
    client.View(key="v", parent="base")
    client.Prepare(key="child", parent="base")
    before = sorted((i.name, i.kind) for r in client.List(filters=[]) for i in r.info)
    assert code_of(lambda: client.Stat(key="unknown")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.Mounts(key="unknown")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.Prepare(key="x", parent="missing")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.Prepare(key="y", parent="child")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.Prepare(key="child", parent="")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: client.Commit(name="c", key="v")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: client.Commit(name="base", key="child")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: client.Remove(key="base")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: client.Mounts(key="base")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: client.Update(info=S.Info(name="base"), update_mask=field_mask_pb2.FieldMask(
        paths=["parent"]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: list(client.List(filters=["nosuchfield==1"]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.Prepare(key="z", parent="", labels={"k": "v" * 5000})) == \
        grpc.StatusCode.INVALID_ARGUMENT
    after = sorted((i.name, i.kind) for r in client.List(filters=[]) for i in r.info)
    assert after == before


def test_a_layer_erofs_mount_cannot_mount_is_prepared_for_containerd_to_apply(served: tuple[Client, Snapshotter],
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The labels name a layer of an image no registry serves: the Prepare answers mounts, as an ordinary
    snapshotter's, and says why in one line."""
    client, _ = served
    labels = {SNAPSHOT_REF: "sha256:" + "1" * 64, IMAGE_REF: "127.0.0.1:9/none/such:t",
              LAYER_DIGEST: "sha256:" + "2" * 64}
    with caplog.at_level("WARNING", logger="erofs_mount.containerd"):
        mounts = client.Prepare(key="default/1/extract-x sha256:" + "1" * 64, parent="", labels=labels).mounts
    assert [m.type for m in mounts] == ["bind"]
    assert any("containerd applies the layer itself" in r.getMessage() for r in caplog.records)


def test_a_store_killed_mid_change_is_as_before_or_after(tmp_path: Path) -> None:
    """sqlite's transactions: a change that raised midway left nothing; the file is consistent."""
    from erofs_mount_containerd.store import ACTIVE, Store

    store = Store(tmp_path / "metadata.db")
    with store.transaction() as db:
        store.create(db, "a", "", ACTIVE, {})
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.create(db, "b", "", ACTIVE, {})
        raise RuntimeError("killed")
    assert [s.key for s in store.all()] == ["a"]
    store.close()
    check = sqlite3.connect(tmp_path / "metadata.db")
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_chain_ids_are_containerd_s() -> None:
    # identity.ChainID of two diff_ids: the second is sha256 of "<first> <second>"
    one, two = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    import hashlib

    assert chain_ids([one, two]) == [one, "sha256:" + hashlib.sha256(f"{one} {two}".encode()).hexdigest()]


def test_labels_that_are_not_a_digest_mount_nothing(served: tuple[Client, Snapshotter], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer digest that would name another path, or carry an option, never reaches erofs-mount: the
    snapshot is an ordinary one, and no directory is made outside the snapshotter's own."""
    ran: list[tuple[str, ...]] = []
    client, service = served
    monkeypatch.setattr(service.layers, "_erofs_mount", lambda *args: ran.append(args))
    for n, digest in enumerate(("sha256:../../../etc", "sha256:" + "a" * 64 + ",hosts-dir=/tmp", "md5:abc")):
        labels = {SNAPSHOT_REF: f"sha256:{n}", IMAGE_REF: "127.0.0.1:9/a/b:c", LAYER_DIGEST: digest}
        mounts = client.Prepare(key=f"default/{n}/extract", parent="", labels=labels).mounts
        assert [m.type for m in mounts] == ["bind"] and str(tmp_path / "root" / "snapshots") in mounts[0].source
    assert ran == [] and os.listdir(tmp_path / "root" / "layers") == []


def test_cleanup_while_a_snapshot_is_prepared_leaves_it_whole(served: tuple[Client, Snapshotter],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """containerd's garbage collector calls Cleanup while a container's Prepare runs (``ctr run --rm`` of one
    beside the start of another). A Prepare that lands between Cleanup's read of the rows and its scan of
    the directories keeps its directories: its mounts name them."""
    client, service = served
    read_rows = service.store.all
    prepared: list[Any] = []

    def rows_then_a_prepare() -> list[Any]:
        rows = read_rows()
        beside = threading.Thread(target=lambda: prepared.append(client.Prepare(key="new", parent="").mounts))
        beside.start()
        beside.join(timeout=1)  # as long as it may take; it waits while Cleanup scans
        return rows

    monkeypatch.setattr(service.store, "all", rows_then_a_prepare)
    client.Cleanup()
    monkeypatch.undo()
    for _ in range(50):
        if prepared:
            break
        time.sleep(0.1)
    (mount,) = prepared[0]
    assert Path(mount.source).is_dir() and (Path(mount.source).parent / "work").is_dir()
    assert [i.name for r in client.List(filters=[]) for i in r.info] == ["new"]


def test_cleanup_and_remove_leave_mounted_a_layer_a_prepare_is_recording(served: tuple[Client, Snapshotter],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer's mount exists before the row of the snapshot that uses it: Cleanup, and the Remove of
    another snapshot of the same layer, run in that moment, leave it mounted."""
    client, service = served
    digest = "sha256:" + "2" * 64
    mounted: set[str] = set()
    unmounted: list[str] = []

    def mount_then_others(labels: dict[str, str]) -> str:
        mounted.add(labels[LAYER_DIGEST])
        if labels[SNAPSHOT_REF] == "sha256:second":  # mounted; its row not yet recorded
            for call in (lambda: client.Remove(key="default/erofs-mount/sha256:first"), client.Cleanup):
                beside = threading.Thread(target=call)
                beside.start()
                beside.join(timeout=1)
        return labels[LAYER_DIGEST]

    monkeypatch.setattr(service.layers, "mount", mount_then_others)
    monkeypatch.setattr(service.layers, "mount_ahead", lambda labels: None)
    monkeypatch.setattr(service.layers, "mounted", lambda: sorted(mounted))
    monkeypatch.setattr(service.layers, "unmount", lambda d: (unmounted.append(d), mounted.discard(d)))
    for n, ref in enumerate(("sha256:first", "sha256:second"), 1):
        labels = {SNAPSHOT_REF: ref, IMAGE_REF: "127.0.0.1:9/a/b:c", LAYER_DIGEST: digest}
        prepare = functools.partial(client.Prepare, key=f"default/{n}/extract", parent="", labels=labels)
        assert code_of(prepare) == grpc.StatusCode.ALREADY_EXISTS
    assert unmounted == [] and mounted == {digest}
    assert [i.name for r in client.List(filters=[]) for i in r.info] == ["default/erofs-mount/sha256:second"]


def test_a_layer_s_mount_says_how_long_it_took_and_what_it_warned_of(served: tuple[Client, Snapshotter],
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A mount that succeeds may still warn (no published index: the layer was downloaded and indexed here):
    its lines reach the snapshotter's log, with the time the mount took, for whoever wonders why a pull
    was slow."""
    import subprocess

    _, service = served
    said = "warning: no published index for layer 0; indexing it here"
    monkeypatch.setattr(service.layers, "_erofs_mount", lambda *args: subprocess.CompletedProcess(args, 0, "",
                                                                                                 said + "\n"))
    with caplog.at_level("INFO", logger="erofs_mount.containerd"):
        service.layers.mount({LAYER_DIGEST: "sha256:" + "3" * 64, IMAGE_REF: "127.0.0.1:9/a/b:c"})
    lines = [r.getMessage() for r in caplog.records]
    assert f"layer sha256:{'3' * 64}: {said}" in lines
    assert any(line.endswith(" s") and " mounted at " in line and " in " in line for line in lines), lines
