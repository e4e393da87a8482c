"""``erofs-mount snapshotter`` as a process: ready told to systemd once it listens, a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
from erofs_mount_containerd._api import snapshots_pb2, snapshots_pb2_grpc

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))


def test_it_says_ready_when_it_listens_serves_root_alone_and_stops_clean(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(120)
    address, root = tmp_path / "run" / "snapshotter.sock", tmp_path / "root"
    proc = subprocess.Popen([EROFS_MOUNT, "snapshotter", "--address", str(address), "--root", str(root)],
                            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        said = notify.recv(4096).decode()
        assert "READY=1" in said.splitlines(), said
        assert stat.S_IMODE(address.stat().st_mode) == 0o600 and stat.S_IMODE(root.stat().st_mode) == 0o700
        with grpc.insecure_channel(f"unix:{address}") as channel:
            listed = snapshots_pb2_grpc.SnapshotsStub(channel).List(snapshots_pb2.ListSnapshotsRequest())
            assert [i for r in listed for i in r.info] == []
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notify.recv(4096).decode()
        assert proc.wait(timeout=60) == 0
        assert not address.exists() and (root / "metadata.db").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
