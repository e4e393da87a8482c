"""Every source through the real nbd driver: one set of scenarios, run for local, oci (an EROFS layer and a
whole image of tar layers), s3 and tar.

Each source is published by a ``Publisher`` (a file, a registry with its
server running in the guest, an S3 server), mounted, killed and reattached.
What differs is written down in the publisher: a moved name (a replaced
file, a moved tag, an overwritten object) is either pinned (oci reads the
recorded digest) or refused, and never served.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.imagetree import file_sha256, make_tree, mkfs
from tests.vm.conftest import assert_clean, cli, daemon_pids, devices, records
from tests.vm.test_local_mount import Readers, evict, kill_daemon

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_system")]

PASSWORD = "guest pass:w0rd"


@attrs.frozen
class Version:
    """One version of the published bytes: an EROFS image of ``tree``, and the tree itself."""

    image: Path
    tree: Path


class Publisher:
    """Puts a version where a source type reads it (an image, or an archive of its tree), and changes it."""

    name: str
    options: tuple[str, ...] = ()
    env: dict[str, str] = {}
    secrets: tuple[str, ...] = ()
    moved_is_refused_with: str | None
    """What reattach says after ``move``; None if the source pinned the old bytes and serves them."""
    gone_is_refused_with: str

    spec: str

    def publish(self, version: Version) -> None:
        raise NotImplementedError

    def move(self, version: Version) -> None:
        """The same name now holds ``version``'s bytes."""
        raise NotImplementedError

    def delete(self) -> None:
        raise NotImplementedError

    def pinned(self, version: Version) -> str:
        """What ``list`` shows the source serves (a digest, a path)."""
        raise NotImplementedError

    def stop(self) -> None:
        pass


class LocalPublisher(Publisher):
    name = "local"
    moved_is_refused_with = "is no longer the image that was mounted"
    gone_is_refused_with = "no such file"

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "published" / "app.erofs"
        self.path.parent.mkdir()
        self.spec = f"local:{self.path}"

    def publish(self, version: Version) -> None:
        self.path.write_bytes(self.bytes_of(version))

    def move(self, version: Version) -> None:
        staged = self.path.with_name("staged")
        staged.write_bytes(self.bytes_of(version))
        os.replace(staged, self.path)

    def delete(self) -> None:
        self.path.unlink()

    def pinned(self, version: Version) -> str:
        return str(self.path)

    @staticmethod
    def bytes_of(version: Version) -> bytes:
        return version.image.read_bytes()


class TarPublisher(LocalPublisher):
    """The tree as a tar.gz archive, mounted without extracting it."""

    name = "tar"
    moved_is_refused_with = "is no longer the archive that was mounted"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.path = self.path.with_name("rootfs.tar.gz")
        self.spec = f"tar:{self.path}"

    @staticmethod
    def bytes_of(version: Version) -> bytes:
        return subprocess.run(f"tar --numeric-owner -C {version.tree} -cf - . | gzip -c", shell=True,
                              check=True, capture_output=True).stdout


class OciPublisher(Publisher):
    name = "oci"
    moved_is_refused_with = None  # the record pins the blob digest: a moved tag changes nothing
    gone_is_refused_with = "is gone from the registry"
    env = {"EROFS_MOUNT_OCI_USERNAME": "bob", "EROFS_MOUNT_OCI_PASSWORD": PASSWORD}
    secrets = ("bob", PASSWORD)
    options = ("-o", "insecure,credentials=env")

    def __init__(self, tmp_path: Path) -> None:
        from tests.oci.registry import Registry

        self.registry = Registry(tmp_path / "registry", auth="htpasswd", users={"bob": PASSWORD})
        self.spec = f"oci:{self.registry.host}/team/app:stable"
        self.digest = ""

    def publish(self, version: Version) -> None:
        from tests.oci.registry import EROFS_LAYER

        data = version.image.read_bytes()
        self.registry.push_image("team/app", "stable", [(data, EROFS_LAYER)])
        self.digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def move(self, version: Version) -> None:
        from tests.oci.registry import EROFS_LAYER

        self.registry.push_image("team/app", "stable", [(version.image.read_bytes(), EROFS_LAYER)])

    def delete(self) -> None:
        self.registry.delete_blob("team/app", self.digest)

    def pinned(self, version: Version) -> str:
        return f"{self.registry.host}/team/app:stable#{self.digest}"

    def stop(self) -> None:
        self.registry.stop()


class S3Publisher(Publisher):
    name = "s3"
    moved_is_refused_with = "changed since it was mounted"  # the record pins the ETag
    gone_is_refused_with = "does not exist"

    def __init__(self, tmp_path: Path) -> None:
        from tests.s3.conftest import ACCESS_KEY, SECRET_KEY, S3Server

        self.server = S3Server()
        self.server.client.create_bucket(Bucket="images")
        self.spec = "s3:images/app.erofs"
        self.options = ("-o", f"endpoint={self.server.endpoint}")
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.secrets = (SECRET_KEY,)

    def publish(self, version: Version) -> None:
        self.server.client.put_object(Bucket="images", Key="app.erofs", Body=version.image.read_bytes())

    move = publish

    def delete(self) -> None:
        self.server.client.delete_object(Bucket="images", Key="app.erofs")

    def pinned(self, version: Version) -> str:
        return "s3://images/app.erofs"

    def stop(self) -> None:
        self.server.stop()


class OciImagePublisher(OciPublisher):
    """An ordinary image, mounted whole: the tree as a GNU tar + gzip base layer, and a zstd layer over it
    that holds one of its files again and a file of its own. A proxy in front of the registry keeps
    the request log."""

    name = "oci-image"
    moved_is_refused_with = None  # the record pins the manifest and every layer

    def __init__(self, tmp_path: Path) -> None:
        from tests.oci.faultproxy import FaultProxy

        super().__init__(tmp_path)
        self.proxy = FaultProxy(self.registry.host)
        self.spec = f"oci:{self.proxy.host}/team/image:stable"
        self.manifest = ""

    def _push(self, version: Version) -> None:
        from tests.oci.test_tar_images import DOCKER_LAYER, ZSTD_LAYER, Layer, diff_id, zstd_tool

        base = subprocess.run(f"tar --numeric-owner -C {version.tree} -cf - . | gzip -c", shell=True,
                              check=True, capture_output=True).stdout
        again = sorted(p for p in version.tree.rglob("*") if p.is_file())[0]
        upper = zstd_tool(Layer(1_700_000_000).add(str(again.relative_to(version.tree)), data=again.read_bytes(),
                                                   mode=stat.S_IMODE(again.stat().st_mode))
                          .add("extra/marker", data=b"the upper layer\n").bytes())
        layers = [(base, DOCKER_LAYER), (upper, ZSTD_LAYER)]
        self.manifest = self.registry.push_image("team/image", "stable", layers,
                                                 diff_ids=[diff_id(b) for b, _ in layers])
        self.digest = "sha256:" + hashlib.sha256(base).hexdigest()

    def publish(self, version: Version) -> None:
        self._push(version)

    def move(self, version: Version) -> None:
        manifest, digest = self.manifest, self.digest
        self._push(version)
        self.manifest, self.digest = manifest, digest

    def delete(self) -> None:
        self.registry.delete_blob("team/image", self.digest)

    def pinned(self, version: Version) -> str:
        return self.manifest

    def whole_gets(self) -> list[str]:
        from tests.oci.test_tar_images import whole_gets

        return whole_gets(self.proxy)

    def stop(self) -> None:
        self.proxy.stop()
        super().stop()


PUBLISHERS = {p.name: p for p in (LocalPublisher, OciImagePublisher, OciPublisher, S3Publisher, TarPublisher)}


# One publisher (and its server) per source type for the whole module: a registry or an S3
# server takes long to start in the guest. tar: images the project synthesizes itself, so the
# newer kernel reads them too. s3, the plugin written as a third party would, uses nothing of
# the kernel the others do not: it runs in the newer kernel's guest only, whose run is shorter.
# a source's bytes do not depend on the kernel series: each runs in one guest (local and oci in the stock
# kernel's, tar and s3 in the newer one's), but for the image of tar layers, whose span store and fill
# scenarios are split between the two
KERNELS = {"tar": pytest.mark.kernel(newer="only"), "oci-image": pytest.mark.kernel(newer=True),
           "s3": pytest.mark.kernel(newer="only")}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=KERNELS[name]) if name in KERNELS else name
                                        for name in sorted(PUBLISHERS)])
def publisher(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Publisher]:
    p = PUBLISHERS[request.param](tmp_path_factory.mktemp(request.param))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Version, dict[str, str], Version]:
    """The version to mount with its files' sha256, and another one to move the name to (made once:
    publishers copy them, no test changes them)."""
    base = tmp_path_factory.mktemp("versions")
    sums = make_tree(base / "tree", files=16, max_size=512 << 10)
    make_tree(base / "other", files=5, seed=9)
    return (Version(mkfs(base / "v1.erofs", base / "tree"), base / "tree"), sums,
            Version(mkfs(base / "v2.erofs", base / "other"), base / "other"))


def mount(p: Publisher, mountpoint: Path) -> str:
    return cli("mount", "--source", p.spec, *p.options, str(mountpoint), env=p.env).out.strip()


def assert_files(mountpoint: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert file_sha256(mountpoint / rel) == digest, rel


def assert_no_secret_in_the_daemon_s_environ(p: Publisher) -> None:
    """Credentials given through the environment reach the daemon's memory, not /proc/PID/environ."""
    (row,) = devices()
    environ = Path(f"/proc/{row['daemon_pid']}/environ").read_bytes()
    assert not [s for s in p.secrets if s.encode() in environ], "a secret is in the daemon's environ"
    assert b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\0" in environ


def daemon_read_bytes() -> int:
    """All the daemon has read so far (its code included), from /proc/PID/io."""
    (row,) = devices()
    for line in Path(f"/proc/{row['daemon_pid']}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def assert_refused(p: Publisher, device: str, words: str) -> None:
    result = cli("reattach", device, check=False, env=p.env)
    assert result.code != 0 and words in result.err, result
    assert len(result.err.strip().splitlines()) == 1
    # the record (lock, log, socket) stays for a later reattach, with why this one was refused (for list)
    assert daemon_pids() == [] and len(records()) == 5 and any(n.endswith(".retry") for n in records()), records()
    cli("umount", device)


def test_mount_kill_reattach_reads_the_same_bytes(publisher: Publisher, images: tuple[Version, dict[str, str], Version],
                                                  mountpoint: Path) -> None:
    image, sums, _other = images
    publisher.publish(image)
    device = mount(publisher, mountpoint)
    try:
        started = daemon_read_bytes()  # a daemon that has read no file yet
        assert_files(mountpoint, sums)
        (row,) = devices()
        assert row["source"] == publisher.spec and publisher.pinned(image) in row["serving"]
        if isinstance(publisher, OciImagePublisher):  # list --json: every layer the record pins
            assert [layer["digest"] for layer in row["pins"]["layers"]][0] == publisher.digest
        record = Path(row["record"])
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
        assert not [s for s in publisher.secrets if s in record.read_text()], "a secret reached the record"
        assert_no_secret_in_the_daemon_s_environ(publisher)
        evict(mountpoint, device)
        kill_daemon(device)
        if isinstance(publisher, OciImagePublisher):
            publisher.proxy.log.clear()
            publisher.proxy.ranges.clear()
        cli("reattach", device, env=publisher.env)
        reattached = daemon_read_bytes()
        if isinstance(publisher, OciImagePublisher):  # the layers' indexes are cached: no layer is downloaded
            assert publisher.whole_gets() == [], publisher.proxy.log
            assert (mountpoint / "extra" / "marker").read_bytes() == b"the upper layer\n"
        if publisher.name == "tar":  # the index is in the cache: the new daemon reads none of the archive
            archive = publisher.path.stat().st_size  # indexing it again would read it twice (pass, sha256)
            print(f"bytes read by the daemon before any file read: at mount {started}, at reattach {reattached}; "
                  f"the archive is {archive}")
            # the reattach's daemon loads the tar plugin's code (1.6 MB here), which the mount's, a fork of the
            # command that opened the source, had in memory: one more read of the archive would pass the bound
            assert reattached < started + archive, (started, reattached, archive)
        assert_files(mountpoint, sums)
        assert_no_secret_in_the_daemon_s_environ(publisher)
        if publisher.name in ("tar", "oci-image"):  # killed again under readers: every read they make is right
            with Readers(mountpoint, sums, pause=0.05) as readers:
                readers.wait_for_reads(10)
                evict(mountpoint, device)
                kill_daemon(device)
                cli("reattach", device, env=publisher.env)
                readers.wait_for_reads(10)
            assert readers.errors == [] and readers.mismatches == []
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


def test_a_moved_name_never_changes_the_bytes(publisher: Publisher, images: tuple[Version, dict[str, str], Version],
                                              mountpoint: Path) -> None:
    image, sums, other = images
    publisher.publish(image)
    device = mount(publisher, mountpoint)
    evict(mountpoint, device)
    kill_daemon(device)
    publisher.move(other)
    if publisher.moved_is_refused_with is None:
        cli("reattach", device, env=publisher.env)
        assert_files(mountpoint, sums)
        cli("umount", str(mountpoint))
    else:
        assert_refused(publisher, device, publisher.moved_is_refused_with)
    assert not os.path.ismount(mountpoint)
    assert_clean()


def test_reattach_refuses_when_the_bytes_are_gone(publisher: Publisher, images: tuple[Version, dict[str, str], Version],
                                                  mountpoint: Path) -> None:
    image, _sums, _other = images
    publisher.publish(image)
    device = mount(publisher, mountpoint)
    kill_daemon(device)
    publisher.delete()
    assert_refused(publisher, device, publisher.gone_is_refused_with)
    assert not os.path.ismount(mountpoint)
    assert_clean()


def test_a_reattached_daemon_serves_from_the_span_store_checks_it_and_holds_its_bound(
        publisher: Publisher, images: tuple[Version, dict[str, str], Version], mountpoint: Path) -> None:
    if not isinstance(publisher, OciImagePublisher):
        pytest.skip("the span store keeps what is checked against span hashes: here, the image of tar layers")
    if not os.uname().release.startswith("6.1."):
        pytest.skip("the span store does not depend on the kernel series: tested in the stock kernel's guest")
    import json
    import shutil

    from tests.vm.test_operations import stats

    store = Path(json.loads(cli("cache", "list", "--json").out)["result"]["directory"]) / "spans"
    shutil.rmtree(store, ignore_errors=True)
    image, sums, _other = images
    publisher.publish(image)
    proxy = publisher.proxy

    def kill_and_reattach(device: str) -> None:
        evict(mountpoint, device)
        kill_daemon(device)
        proxy.log.clear()
        proxy.ranges.clear()
        cli("reattach", device, env=publisher.env)

    device = mount(publisher, mountpoint)
    try:
        assert_files(mountpoint, sums)
        kill_and_reattach(device)
        assert_files(mountpoint, sums)
        counts = stats(device)["source"]
        print(f"after kill -9 and reattach, every file read: {counts}")
        assert proxy.ranges == [], "the new daemon fetched nothing: every span came from the store"
        assert counts["span_store_hits"] > 0 and counts.get("http_requests", 0) == 0, counts

        victim = sorted(p for p in store.glob("*/*") if not p.name.startswith("."))[0]
        damaged = bytearray(victim.read_bytes())
        damaged[len(damaged) // 3] ^= 0x01
        victim.write_bytes(damaged)
        kill_and_reattach(device)
        assert_files(mountpoint, sums)
        counts = stats(device)["source"]
        assert counts["span_store_corrupt"] == 1 and proxy.ranges, (counts, proxy.ranges)
        assert victim.read_bytes() != damaged, "fetched again, checked, and stored again"
    finally:
        cli("umount", str(mountpoint))
    assert_clean()

    shutil.rmtree(store)
    bound = 2 << 20  # the image's layers hold more than twice this: every read past it evicts
    device = cli("mount", "--source", publisher.spec, *publisher.options, "-o", f"disk-cache-mib={bound >> 20}",
                 str(mountpoint), env=publisher.env).out.strip()
    try:
        assert_files(mountpoint, sums)
        held = sum(p.stat().st_blocks * 512 for p in store.glob("*/*") if not p.name.startswith("."))
        written = stats(device)["source"]["span_store_written_bytes"]
        print(f"span store bound {bound}: {held} bytes held after {written} bytes were stored")
        assert 0 < held <= bound < written
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


def test_a_filled_image_survives_a_registry_outage_and_a_daemon_death_together(
        publisher: Publisher, images: tuple[Version, dict[str, str], Version], mountpoint: Path) -> None:
    if not isinstance(publisher, OciImagePublisher):
        pytest.skip("fill keeps what is checked against span hashes: here, the image of tar layers")
    if os.uname().release.startswith("6.1."):
        pytest.skip("fill and outage do not depend on the kernel series: tested in the newer kernel's guest")
    import time

    image, sums, _other = images
    publisher.publish(image)
    proxy = publisher.proxy
    device = cli("mount", "--source", publisher.spec, *publisher.options, "-o", "fill", str(mountpoint),
                 env=publisher.env).out.strip()
    try:
        (row,) = devices()
        log = Path(row["record"]).with_suffix(".log")
        deadline = time.monotonic() + 300
        while log.read_text().count("every span is in the span store") < 2:  # both layers, read by no one
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        proxy.log.clear()
        proxy.outage = True  # the registry goes down, and then the daemon dies
        kill_daemon(device)
        cli("reattach", device, env=publisher.env)
        assert_files(mountpoint, sums)
        assert (mountpoint / "extra" / "marker").read_bytes() == b"the upper layer\n"
        asked = [(method, what) for method, path, what in proxy.log if "/blobs/" in path]
        assert ("HEAD", "503") in asked and all(what == "503" for _m, what in asked), asked
    finally:
        proxy.outage = False
        cli("umount", str(mountpoint))
    assert_clean()
