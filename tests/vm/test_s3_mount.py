"""Mount an image from S3 (moto's server, in the guest) through the real nbd driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imagetree import file_sha256, make_tree, mkfs
from tests.s3.conftest import ACCESS_KEY, SECRET_KEY, S3Server
from tests.vm.conftest import assert_clean, cli, devices
from tests.vm.test_local_mount import drop_caches, kill_daemon

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_system")]

AWS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@pytest.fixture
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


def test_s3_mount_kill_reattach(s3: S3Server, tmp_path: Path, mountpoint: Path) -> None:
    sums = make_tree(tmp_path / "tree", files=40, max_size=1 << 20)
    image = mkfs(tmp_path / "app.erofs", tmp_path / "tree")
    s3.client.create_bucket(Bucket="images")
    s3.client.put_object(Bucket="images", Key="app.erofs", Body=image.read_bytes())
    device = cli("mount", "--source", "s3:images/app.erofs", "-o", f"endpoint={s3.endpoint}",
                 str(mountpoint), env=AWS).out.strip()
    try:
        for rel, digest in sums.items():
            assert file_sha256(mountpoint / rel) == digest, rel
        (row,) = devices()
        assert SECRET_KEY not in Path(row["record"]).read_text()
        kill_daemon(device)
        drop_caches()
        cli("reattach", device, env=AWS)
        for rel, digest in sums.items():
            assert file_sha256(mountpoint / rel) == digest, rel
    finally:
        cli("umount", str(mountpoint))
    assert_clean()
