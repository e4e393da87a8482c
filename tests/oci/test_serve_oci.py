"""``erofs-mount serve`` of an oci: source behaves as of a local file (tests/test_serve.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imagetree import file_sha256
from tests.oci.registry import EROFS_LAYER, Registry
from tests.test_serve import Server, check_nbdfuse_mount


@pytest.fixture
def served(registry: Registry, layer: tuple[bytes, dict[str, str]], tmp_path: Path) -> Iterator[Server]:
    registry.push_image("served/app", "v1", [(layer[0], EROFS_LAYER)])
    (tmp_path / "layer.erofs").write_bytes(layer[0])
    server = Server(f"oci:{registry.host}/served/app:v1", tmp_path / "nbd.sock", "-o", "insecure")
    yield server
    if server.proc.poll() is None:
        server.stop()


def test_nbdinfo_and_nbdcopy(served: Server, layer: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    out = subprocess.run(["nbdinfo", "--json", served.uri], check=True, capture_output=True, text=True).stdout
    (export,) = json.loads(out)["exports"]
    assert export["export-size"] == len(layer[0]) and export["is_read_only"] is True
    subprocess.run(["nbdcopy", served.uri, str(tmp_path / "copy.img")], check=True)
    assert file_sha256(tmp_path / "copy.img") == file_sha256(tmp_path / "layer.erofs")


def test_nbdfuse_mounts_the_oci_export(served: Server, layer: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    check_nbdfuse_mount(served, layer[1], tmp_path)
