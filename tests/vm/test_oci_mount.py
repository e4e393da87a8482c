"""Mount an EROFS layer from a real registry running in the guest, through the real nbd driver."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imagetree import file_sha256, make_tree, mkfs
from tests.oci.registry import EROFS_LAYER, Registry
from tests.vm.conftest import assert_clean, cli, devices
from tests.vm.test_local_mount import drop_caches, kill_daemon

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_system")]

PASSWORD = "guest pass:w0rd"
CREDS = {"EROFS_MOUNT_OCI_USERNAME": "bob", "EROFS_MOUNT_OCI_PASSWORD": PASSWORD}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    r = Registry(tmp_path / "registry", auth="htpasswd", users={"bob": PASSWORD})
    yield r
    r.stop()


def test_oci_mount_survives_kill_and_a_moved_tag(registry: Registry, tmp_path: Path, mountpoint: Path) -> None:
    sums = make_tree(tmp_path / "tree", files=60, max_size=2 << 20)
    image = mkfs(tmp_path / "v1.erofs", tmp_path / "tree")
    registry.push_image("team/app", "stable", [(image.read_bytes(), EROFS_LAYER)])
    spec = f"oci:{registry.host}/team/app:stable"
    device = cli("mount", "--source", spec, "-o", "insecure,credentials=env", str(mountpoint),
                 env=CREDS).out.strip()
    try:
        for rel, digest in sums.items():
            assert file_sha256(mountpoint / rel) == digest, rel
        (row,) = devices()
        layer_digest = "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()
        assert row["serving"] == f"{registry.host}/team/app:stable#{layer_digest}"
        assert layer_digest in cli("list").out
        record = Path(row["record"])
        text = record.read_text()
        assert PASSWORD not in text and "bob" not in text
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        kill_daemon(device)
        make_tree(tmp_path / "tree2", files=10, seed=5)
        other = mkfs(tmp_path / "v2.erofs", tmp_path / "tree2")
        registry.push_image("team/app", "stable", [(other.read_bytes(), EROFS_LAYER)])  # the tag moves
        drop_caches()
        cli("reattach", device, env=CREDS)
        for rel, digest in sums.items():
            assert file_sha256(mountpoint / rel) == digest, rel
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


def test_oci_reattach_refuses_when_the_blob_is_gone(registry: Registry, tmp_path: Path, mountpoint: Path) -> None:
    make_tree(tmp_path / "tree", files=5)
    data = mkfs(tmp_path / "v1.erofs", tmp_path / "tree").read_bytes()
    registry.push_image("team/gone", "v1", [(data, EROFS_LAYER)])
    device = cli("mount", "--source", f"oci:{registry.host}/team/gone:v1", "-o", "insecure,credentials=env",
                 str(mountpoint), env=CREDS).out.strip()
    (row,) = devices()
    state = json.dumps(row)
    assert PASSWORD not in state
    kill_daemon(device)
    import hashlib

    registry.delete_blob("team/gone", "sha256:" + hashlib.sha256(data).hexdigest())
    result = cli("reattach", device, check=False, env=CREDS)
    assert result.code != 0 and "is gone from the registry" in result.err
    assert len(result.err.strip().splitlines()) == 1
    cli("umount", device)
    assert not os.path.ismount(mountpoint)
    assert_clean()
