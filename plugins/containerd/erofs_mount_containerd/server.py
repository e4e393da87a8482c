"""The snapshotter as a process: the gRPC server on a unix socket, ready told to systemd, stopped by a signal."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from erofs_mount_core import CommandServer, CommandSocket, ErofsMountError

from ._api import snapshots_pb2_grpc
from .layers import Layers
from .service import Snapshotter

log = logging.getLogger("erofs_mount.containerd")

WORKERS = 8  # calls served at once: containerd unpacks one layer of an image at a time, images in parallel
GRACE = 10.0  # seconds a call under way may take to finish at a stop


def serve(address: Path, root: Path, options: str, commands_address: Path) -> None:
    """Serve until SIGTERM or SIGINT; ``snapshotter pull`` runs here too, handed over at ``commands_address``."""
    _log_to_stderr()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    commands = CommandServer()  # before any thread: it forks
    snapshotter = Snapshotter(root, Layers(root, options, commands))
    snapshotter.remount()
    snapshotter.cleanup()
    address.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pulls = CommandSocket(commands_address, commands, ["snapshotter", "pull", "--in-process"])
    address.unlink(missing_ok=True)  # a socket left by a snapshotter that was killed
    server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="snapshots"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(snapshotter, server)
    old = os.umask(0o177)  # the socket is root's alone: it mounts and unmounts
    try:
        if server.add_insecure_port(f"unix:{address}") == 0:
            raise ErofsMountError(f"snapshotter: cannot listen on {address}")
        server.start()
    finally:
        os.umask(old)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("serving containerd's snapshots API on %s (root %s)", address, root)
    _notify("READY=1", f"STATUS=serving on {address}")
    stop.wait()
    _notify("STOPPING=1")
    pulls.close()
    server.stop(GRACE).wait()
    snapshotter.close()
    commands.close()
    address.unlink(missing_ok=True)


def _log_to_stderr() -> None:
    """erofs-mount's lines from INFO on stderr: the journal's under systemd, which stamps them; stamped here
    otherwise. Other libraries' reach it from WARNING, through Python's last resort."""
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{stamp}erofs-mount snapshotter: %(message)s"))
    ours = logging.getLogger("erofs_mount")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def _notify(*states: str) -> None:
    """sd_notify(3), when systemd runs the snapshotter as a Type=notify service."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto("\n".join(states).encode(), "\0" + where[1:] if where.startswith("@") else where)
