"""A zstd:chunked image that Debian's skopeo made from an ordinary one, through the real nbd driver.

From an empty cache, through a proxy that logs every request: the mount
fetches the manifest, the config and each layer's TOC, no layer; the tree
the kernel shows equals the ordinary image's (the same mount, by the index
path); a daemon killed under readers is replaced and every read is right.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.imagetree import assert_same_tree, file_sha256, make_tree
from tests.vm.conftest import assert_clean, cli, devices
from tests.vm.test_local_mount import Readers, evict, kill_daemon

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_system")]

POSITION = "io.containers.zstd-chunked.manifest-position"


def test_a_zstd_chunked_image_mounts_from_its_tocs_and_survives_kill_9(tmp_path: Path, mountpoint: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from tests.oci.faultproxy import FaultProxy
    from tests.oci.registry import Registry
    from tests.oci.test_tar_images import diff_id, whole_gets

    gzip_layer = "application/vnd.oci.image.layer.v1.tar+gzip"

    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    sums = make_tree(tmp_path / "tree", files=24, max_size=768 << 10)
    (tmp_path / "tree" / "upper").mkdir()
    (tmp_path / "tree" / "upper" / "marker").write_text("the upper layer\n")
    base = subprocess.run(f"tar --numeric-owner -C {tmp_path / 'tree'} --exclude=./upper -cf - . | gzip -c",
                          shell=True, check=True, capture_output=True).stdout
    upper = subprocess.run(f"tar --numeric-owner -C {tmp_path / 'tree'} -cf - ./upper | gzip -c", shell=True,
                           check=True, capture_output=True).stdout
    registry = Registry(tmp_path / "registry")
    proxy = FaultProxy(registry.host)
    try:
        registry.push_image("team/app", "gzip", [(base, gzip_layer), (upper, gzip_layer)],
                            diff_ids=[diff_id(base), diff_id(upper)])
        # to another repository: skopeo reuses a blob the destination repository has, leaving the layer as it is
        subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", "-f", "oci",
                        "--dest-compress-format", "zstd:chunked", f"docker://{registry.host}/team/app:gzip",
                        f"docker://{registry.host}/team/chunked:t"], check=True, capture_output=True)
        manifest = httpx.get(f"http://{registry.host}/v2/team/chunked/manifests/t",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
        tocs = sum(int(d["annotations"][POSITION].split(":")[1]) for d in manifest["layers"])

        device = cli("mount", "--source", f"oci:{proxy.host}/team/chunked:t", "-o", "insecure",
                     str(mountpoint)).out.strip()
        try:
            config = manifest["config"]["digest"].removeprefix("sha256:")
            assert whole_gets(proxy) == [config], "a layer was downloaded"
            asked = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in proxy.ranges if r]
            assert sum(b - a + 1 for a, b in asked) <= 2 * tocs, ("more than the TOCs (the command's open and the "
                                                                  "daemon's, which finds them cached)", asked, tocs)
            for rel, digest in sums.items():
                assert file_sha256(mountpoint / rel) == digest, rel
            assert (mountpoint / "upper" / "marker").read_text() == "the upper layer\n"
            (row,) = devices()
            assert [layer.get("toc") is not None for layer in row["pins"]["layers"]] == [True, True], row["pins"]
            reference = tmp_path / "reference"
            reference.mkdir()
            cli("mount", "--source", f"oci:{registry.host}/team/app:gzip", "-o", "insecure", str(reference))
            try:  # the ordinary image, by the index path, on a device of its own
                assert assert_same_tree(reference, mountpoint) >= 25
            finally:
                cli("umount", str(reference))

            with Readers(mountpoint, sums, pause=0.05) as readers:  # killed under readers: every read right
                readers.wait_for_reads(10)
                evict(mountpoint, device)
                kill_daemon(device)
                proxy.log.clear()
                proxy.ranges.clear()
                cli("reattach", device)
                readers.wait_for_reads(10)
            assert readers.errors == [] and readers.mismatches == []
            assert whole_gets(proxy) == [], "the reattach downloaded something whole"
        finally:
            cli("umount", str(mountpoint))
    finally:
        proxy.stop()
        registry.stop()
    assert_clean()
