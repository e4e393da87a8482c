"""Lazy from the first read, through the real nbd driver: images with a TOC, and indexes published by another host.

Each from an empty cache, through a proxy that logs every request:

- a zstd:chunked image that Debian's skopeo made from an ordinary one: the
  mount fetches the manifest, the config and each layer's TOC, no layer;
  the tree the kernel shows equals the ordinary image's (the same mount, by
  the index path); a daemon killed under readers is replaced and every read
  is right;
- an ordinary image after ``index push`` from another cache directory: no
  layer downloaded, the files right, kill -9 and reattach read right; then
  a registry that flips bytes in blob bodies gives I/O errors, never a
  wrong byte;
- the same with the publisher's prefetch list (``--prefetch-from`` its live
  mount): the fresh host fetches what the publisher read before the kernel
  asks for it.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.imagetree import assert_same_tree, file_sha256, make_tree
from tests.vm.conftest import assert_clean, cli, devices
from tests.vm.test_local_mount import Readers, evict, kill_daemon

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

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


def test_an_image_whose_index_another_host_pushed_mounts_without_its_layers_and_never_serves_a_flipped_byte(
        tmp_path: Path, mountpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.oci.faultproxy import FaultProxy
    from tests.oci.registry import Registry
    from tests.oci.test_tar_images import diff_id, whole_gets

    sums = make_tree(tmp_path / "tree", files=16, max_size=512 << 10)
    names = sorted(sums)
    half = len(names) // 2
    layers = [subprocess.run(["tar", "--numeric-owner", "-C", str(tmp_path / "tree"), "-cf", "-", *part],
                             check=True, capture_output=True).stdout for part in (names[:half], names[half:])]
    layers = [subprocess.run(["gzip", "-c"], input=layer, check=True, capture_output=True).stdout
              for layer in layers]
    for name in ("index.key", "index.pub"):
        if name.endswith(".key"):
            subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / name)], check=True)
        else:
            subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "index.key"), "-pubout", "-out",
                            str(tmp_path / name)], check=True)
    registry = Registry(tmp_path / "registry")
    proxy = FaultProxy(registry.host)
    try:
        registry.push_image("team/app", "t", [(b, GZIP_LAYER) for b in layers], diff_ids=[diff_id(b) for b in layers])
        pushed = cli("index", "push", f"oci:{registry.host}/team/app:t", "-o", "insecure", "--sign",
                     str(tmp_path / "index.key"), env={"EROFS_MOUNT_CACHE_DIR": str(tmp_path / "publisher")})
        artifact = pushed.out.strip()
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "fresh-host"))
        device = cli("mount", "--source", f"oci:{proxy.host}/team/app:t", "-o",
                     f"insecure,index-key={tmp_path / 'index.pub'},disk-cache-mib=0", str(mountpoint)).out.strip()
        try:
            layer_digests = {hashlib.sha256(b).hexdigest() for b in layers}
            assert not set(whole_gets(proxy)) & layer_digests, "a layer was downloaded"
            (row,) = devices()
            assert row["pins"]["published_index"] == artifact
            for rel, digest in sums.items():
                assert file_sha256(mountpoint / rel) == digest, rel
            evict(mountpoint, device)
            kill_daemon(device)
            cli("reattach", device)
            for rel, digest in sums.items():
                assert file_sha256(mountpoint / rel) == digest, rel

            proxy.inject("blob", *["corrupt"] * 10_000)  # every blob answer has a bit flipped
            evict(mountpoint, device)
            kill_daemon(device)  # a daemon whose memory holds no checked span (and no span store)
            cli("reattach", device)
            failed = 0
            for rel in names[:2]:
                try:
                    assert file_sha256(mountpoint / rel) == sums[rel], f"{rel}: a wrong byte reached a reader"
                except OSError:
                    failed += 1
            assert failed >= 1, "no flipped byte was noticed"  # (a flip in bytes a read does not use is harmless)
            proxy.faults.clear()
            evict(mountpoint, device)
            for rel in names[:2]:
                assert file_sha256(mountpoint / rel) == sums[rel], rel
        finally:
            cli("umount", str(mountpoint))
    finally:
        proxy.stop()
        registry.stop()
    assert_clean()


def test_a_fresh_host_prefetches_what_the_publisher_s_mount_read_before_the_kernel_asks(
        tmp_path: Path, mountpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """index push --prefetch-from the publisher's live mount: a fresh host that uses the index fetches those
    files' spans in the background, and the kernel's reads of them then fetch nothing."""
    import json
    import time

    from tests.oci.faultproxy import FaultProxy
    from tests.oci.registry import Registry
    from tests.oci.test_tar_images import diff_id

    sums = make_tree(tmp_path / "tree", files=24, max_size=2 << 20)
    names = sorted(sums)
    layers = [subprocess.run(["tar", "--numeric-owner", "-C", str(tmp_path / "tree"), "-czf", "-", *part],
                             check=True, capture_output=True).stdout for part in (names[:12], names[12:])]
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "index.key")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "index.key"), "-pubout", "-out",
                    str(tmp_path / "index.pub")], check=True)
    workload = names[3:5] + names[15:17]  # what the image is for: a few of its files
    registry = Registry(tmp_path / "registry")
    proxy = FaultProxy(registry.host)
    publisher = tmp_path / "publisher-mnt"
    publisher.mkdir()
    try:
        registry.push_image("team/app", "t", [(b, GZIP_LAYER) for b in layers], diff_ids=[diff_id(b) for b in layers])
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "publisher"))
        cli("mount", "--source", f"oci:{registry.host}/team/app:t", "-o", "insecure", str(publisher))
        try:
            for rel in workload:
                assert file_sha256(publisher / rel) == sums[rel], rel
            time.sleep(6)  # the daemon keeps its reads every 5 s
            cli("index", "push", f"oci:{registry.host}/team/app:t", "-o", "insecure", "--sign",
                str(tmp_path / "index.key"), "--prefetch-from", str(publisher))
        finally:
            cli("umount", str(publisher))
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "fresh-host"))
        device = cli("mount", "--source", f"oci:{proxy.host}/team/app:t", "-o",
                     f"insecure,index-key={tmp_path / 'index.pub'}", str(mountpoint)).out.strip()
        try:
            deadline = time.monotonic() + 240
            while True:
                counts = json.loads(cli("stats", device, "--json").out)["result"][device.removeprefix("/dev/")]
                counts = counts["source"]
                done = sum(counts.get(k, 0) for k in ("prefetch_units", "prefetch_skipped", "prefetch_passed"))
                if counts.get("prefetch_planned") and done >= counts["prefetch_planned"]:
                    break
                assert time.monotonic() < deadline, counts
                time.sleep(0.5)
            assert counts["prefetch_units"] > 0, counts
            before = len(proxy.log)
            for rel in workload:
                assert file_sha256(mountpoint / rel) == sums[rel], rel
            fetched = [path for _, path, _ in proxy.log[before:] if "/blobs/" in path]
            assert fetched == [], "the kernel's reads fetched what the prefetch had fetched"
            after = json.loads(cli("stats", device, "--json").out)["result"][device.removeprefix("/dev/")]
            assert after["source"]["prefetch_hits"] > 0, after["source"]
        finally:
            cli("umount", str(mountpoint))
    finally:
        proxy.stop()
        registry.stop()
    assert_clean()


@pytest.mark.kernel(newer="only")  # (no kernel series does it otherwise: it runs where the lanes have room)
def test_an_unsigned_index_forged_in_its_tree_alone_is_refused_by_the_daemon_s_background_pass(
        tmp_path: Path, mountpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify=background: the forged index mounts (its span hashes are the layer's); the daemon's pass finds
    its tree false, and from then on every read fails, ``list`` says ``refused`` and why, ``stats`` and
    ``metrics`` count it, and a reattach that pins the artifact is refused in one line."""
    import errno
    import json
    import time

    from tests.oci.registry import Registry
    from tests.oci.test_published_index import push_forged_tree
    from tests.oci.test_tar_images import diff_id

    sums = make_tree(tmp_path / "tree", files=8, max_size=256 << 10)
    names = sorted(sums)
    layers = [subprocess.run(["tar", "--numeric-owner", "-C", str(tmp_path / "tree"), "-czf", "-", *part],
                             check=True, capture_output=True).stdout for part in (names[:4], names[4:])]
    registry = Registry(tmp_path / "registry")
    try:
        registry.push_image("team/forged", "t", [(b, GZIP_LAYER) for b in layers],
                            diff_ids=[diff_id(b) for b in layers])
        reference = f"{registry.host}/team/forged:t"
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "publisher"))
        forged, first_layer = push_forged_tree(reference)
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "fresh-host"))
        device = cli("mount", "--source", f"oci:{reference}", "-o",
                     "insecure,verify=background,verify-rate-mib=1000,disk-cache-mib=0", str(mountpoint)).out.strip()
        try:
            deadline = time.monotonic() + 120
            while (row := devices()[0])["state"] != "refused":
                assert time.monotonic() < deadline, f"never refused: {row}"
                time.sleep(0.5)
            assert forged in row["why"] and first_layer in row["why"], row
            failed = []
            for rel in names:  # (what the kernel read before, it keeps: small files' bytes sit in metadata)
                try:
                    (mountpoint / rel).read_bytes()
                except OSError as exc:
                    failed.append(exc.errno)
            assert failed and set(failed) == {errno.EIO}, failed
            stats = json.loads(cli("stats", "--json").out)["result"]
            assert stats[device.removeprefix("/dev/")]["source"]["background_refused_layers"] == 1
            assert "background_refused_layers" in cli("metrics").out
            kill_daemon(device)
            again = cli("reattach", device, check=False)
            assert again.code != 0 and len(again.err.strip().splitlines()) == 1, again
            assert "found false by a background pass" in again.err, again
        finally:
            cli("umount", str(mountpoint))
    finally:
        registry.stop()
    assert_clean()
