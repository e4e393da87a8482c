"""Ordinary registry images (tar, tar+gzip, tar+zstd layers) from the real registry, whole or layer by layer.

The layers are written as real images have them: the base by GNU tar and
gzip, the others by Python's tarfile, plain, gzip in several members and
zstd by the zstd tool; the upper layers delete files and directories
(whiteouts), hide a directory (opaque), replace a file by a symlink and a
directory by a file, and delete one name of a hardlink. What the test
expects is the OCI flattening computed here: GNU tar extracts the layers in
order into a directory, each layer's whiteouts applied first.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from erofs_mount_oci import open_reference, reopen

from erofs_mount_core import SourceChangedError, SourceError
from tests.imagetree import assert_same_tree
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import Registry
from tests.terminal import stderr_on_a_terminal

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LONG = "long-" + "n" * 150
ODD = "données/naïve-文件 with spaces"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One cache for the module (layers indexed once); tests that need a cold one set their own."""
    path = tmp_path_factory.getbasetemp() / "tar-images-cache"
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(path))
    return path


# -- the layers ------------------------------------------------------------------------------------


def base_layer(root: Path) -> bytes:
    """Layer 0: a directory written by GNU tar (posix format, xattrs), compressed by gzip."""
    rng = random.Random(7)
    tree = root / "base"
    for d in ("etc", "usr/bin", "data", "wh_dir/sub", "opaque/sub", "dir_to_file", "deep/" + LONG,
              ODD.split("/")[0]):
        (tree / d).mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc" / "gone").write_text("deleted by layer 1\n")
    (tree / "etc" / "hostname").write_text("base\n")
    os.setxattr(tree / "etc" / "hostname", "user.color", b"blue")
    (tree / "usr" / "bin" / "tool").write_bytes(rng.randbytes(50_000))
    (tree / "usr" / "bin" / "setuid").write_bytes(rng.randbytes(3000))
    os.chmod(tree / "usr" / "bin" / "setuid", 0o4755)
    (tree / "usr" / "big").write_bytes(rng.randbytes(3 << 20) + bytes(1 << 20))  # spans several spans
    for name in ("h1", "h3"):
        (tree / "data" / name).write_bytes(rng.randbytes(5000))
    os.link(tree / "data" / "h1", tree / "data" / "h2")  # layer 1 deletes this name
    os.link(tree / "data" / "h3", tree / "data" / "h4")
    for d in ("wh_dir", "wh_dir/sub", "opaque", "opaque/sub"):
        (tree / d / "file").write_text(f"{d}\n")
    (tree / "dir_to_file" / "inner").write_text("inner\n")
    (tree / "file_to_symlink").write_text("a file, then a symlink\n")
    (tree / "deep" / LONG / "leaf").write_text("long names\n")
    (tree / ODD).write_bytes(rng.randbytes(2000))
    os.mknod(tree / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(tree / "fifo")
    os.chown(tree / "data" / "h3", 1000, 100)
    stream = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--format=posix", "--numeric-owner", "-C",
                             str(tree), "-cf", "-", "."], check=True, capture_output=True).stdout
    return subprocess.run(["gzip", "-c"], input=stream, check=True, capture_output=True).stdout


class Layer:
    """A layer written by Python's tarfile; every entry's parent directories are named before it
    (as docker writes a layer: a directory whose contents changed is in the layer)."""

    def __init__(self, mtime: int) -> None:
        self.out = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.out, mode="w", format=tarfile.PAX_FORMAT)
        self.mtime = mtime
        self.named: set[str] = set()

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int = 0o644,
            link: str = "", xattrs: dict[str, str] | None = None) -> Layer:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.named:
                self.add(parent, tarfile.DIRTYPE, mode=0o755)
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, self.mtime, link
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
        if kind == tarfile.REGTYPE:
            info.pax_headers["mtime"] = f"{self.mtime}.123456789"
        self.tar.addfile(info, io.BytesIO(data))
        self.named.add(name)
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.out.getvalue()


def upper_layers() -> list[bytes]:
    rng = random.Random(8)
    one = (Layer(1_700_000_001)
           .add("etc", tarfile.DIRTYPE, mode=0o755)
           .add("etc/.wh.gone")                                    # a file deleted
           .add("etc/added", data=b"added by layer 1\n")
           .add(".wh.wh_dir")                                      # a directory deleted
           .add("opaque", tarfile.DIRTYPE, mode=0o750)
           .add("opaque/.wh..wh..opq")                             # what was below is hidden
           .add("opaque/new", data=b"only this\n")
           .add("file_to_symlink", tarfile.SYMTYPE, link="etc/passwd")
           .add("dir_to_file", data=b"a directory, then a file\n")
           .add("data", tarfile.DIRTYPE, mode=0o755)
           .add("data/.wh.h2"))                                    # one name of a hardlink deleted
    two = (Layer(1_700_000_002)
           .add("usr/bin/tool", data=rng.randbytes(80_000), mode=0o755)
           .add("etc", tarfile.DIRTYPE, mode=0o700)
           .add("etc/hostname", data=b"layer two\n", xattrs={"user.layer": "2", "user.note": "naïve"})
           .add(ODD.split("/")[0] + "/autre fichier", data=rng.randbytes(70_000)))
    three = (Layer(1_700_000_003)
             .add("var/lib/db", data=rng.randbytes(2 << 20), mode=0o600)
             .add("var/lib/db-link", tarfile.LNKTYPE, link="var/lib/db")
             .add("usr/bin/.wh.setuid")
             .add("usr/bin/new-tool", data=rng.randbytes(10_000), mode=0o755))
    return [one.bytes(), two.bytes(), three.bytes()]


def gzip_members(data: bytes, n: int = 3) -> bytes:
    step = -(-len(data) // n)
    return b"".join(gzip.compress(data[i:i + step]) for i in range(0, len(data), step))


def zstd_tool(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, check=True, capture_output=True).stdout


def uncompressed(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


def diff_id(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(uncompressed(blob)).hexdigest()


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, str]]:
    """(blob, media type): gzip by gzip, plain, gzip in several members, zstd by the zstd tool."""
    one, two, three = upper_layers()
    return [(base_layer(tmp_path_factory.mktemp("base")), DOCKER_LAYER), (one, TAR_LAYER),
            (gzip_members(two), GZIP_LAYER), (zstd_tool(three), ZSTD_LAYER)]


@pytest.fixture(scope="module")
def image(registry: Registry, layers: list[tuple[bytes, str]]) -> str:
    registry.push_image("images/four", "v1", layers, diff_ids=[diff_id(b) for b, _ in layers])
    return f"{registry.host}/images/four:v1"


def flatten(layers: list[tuple[bytes, str]], into: Path) -> Path:
    """The OCI flattening: each layer's whiteouts applied, then the layer extracted by GNU tar."""
    into.mkdir()
    for blob, _ in layers:
        stream = uncompressed(blob)
        with tarfile.open(fileobj=io.BytesIO(stream)) as tar:
            members = [(m.name.removeprefix("./").rstrip("/"), m.isdir()) for m in tar.getmembers()]
        for name, is_dir in members:
            parent, _, base = name.rpartition("/")
            where = into / parent
            if base == ".wh..wh..opq":
                for child in where.iterdir() if where.is_dir() else []:
                    _remove(child)
            elif base.startswith(".wh."):
                _remove(where / base[4:])
            elif name and (into / name).is_dir() != is_dir or not is_dir:
                _remove(into / name)  # an entry replaces what had its name (a directory merges with one)
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "--exclude=.wh.*",
                        "-C", str(into), "-xf", "-"], input=stream, check=True)
    return into


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def materialize(reference: str, into: Path, *options: str) -> Path:
    """The image as an NBD client reads it from ``erofs-mount serve``, checked by fsck.erofs."""
    option = ",".join(("insecure", *options))
    result = subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"oci:{reference}", "-o", option, "--run",
                             f'nbdcopy "$uri" {into}'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    fsck = subprocess.run(["fsck.erofs", str(into)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    return into


class Mounts:
    def __init__(self) -> None:
        self.points: list[Path] = []

    def mount(self, *args: str) -> None:
        subprocess.run(["mount", *args], check=True)
        self.points.append(Path(args[-1]))

    def close(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", str(point)], check=True)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    yield m
    m.close()


def whole_gets(proxy: FaultProxy) -> list[str]:
    """The digests of the blobs fetched whole (no Range) through the proxy: layers downloaded, configs."""
    paths = [path for method, path, _ in proxy.log if method == "GET" and "/blobs/" in path]
    return [path.rpartition(":")[2] for path, r in zip(paths, proxy.ranges, strict=True) if r is None]


# -- the whole image and its layers -------------------------------------------------------------------


def test_the_whole_image_is_the_oci_flattening_of_its_layers(image: str, layers: list[tuple[bytes, str]],
                                                            tmp_path: Path, mounts: Mounts) -> None:
    expected = flatten(layers, tmp_path / "flattened")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("-t", "erofs", "-o", "ro,loop", str(materialize(image, tmp_path / "image.erofs")), str(mnt))
    assert assert_same_tree(expected, mnt) >= 25
    assert not (mnt / "etc" / "gone").exists() and not (mnt / "wh_dir").exists()
    assert sorted(os.listdir(mnt / "opaque")) == ["new"]
    assert (mnt / "data" / "h1").stat().st_nlink == 1 and not (mnt / "data" / "h2").exists()
    assert (mnt / "data" / "h3").stat().st_ino == (mnt / "data" / "h4").stat().st_ino
    assert (mnt / "var" / "lib" / "db").stat().st_ino == (mnt / "var" / "lib" / "db-link").stat().st_ino
    assert os.readlink(mnt / "file_to_symlink") == "etc/passwd" and (mnt / "dir_to_file").is_file()
    assert os.getxattr(mnt / "etc" / "hostname", "user.note") == "naïve".encode()
    assert (mnt / ODD).stat().st_size == 2000 and (mnt / "deep" / LONG / "leaf").is_file()


def test_each_layer_alone_stacked_with_overlayfs_gives_the_same_tree(image: str, layers: list[tuple[bytes, str]],
                                                                    tmp_path: Path, mounts: Mounts) -> None:
    expected = flatten(layers, tmp_path / "flattened")
    lowers = []
    for n in range(len(layers)):
        point = tmp_path / f"layer{n}"
        point.mkdir()
        mounts.mount("-t", "erofs", "-o", "ro,loop",
                     str(materialize(image, tmp_path / f"layer{n}.erofs", f"layer={n}")), str(point))
        lowers.insert(0, str(point))
    gone = (tmp_path / "layer1" / "etc" / "gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(tmp_path / "layer1" / "opaque", "trusted.overlay.opaque") == b"y"
    merged = tmp_path / "merged"
    merged.mkdir()
    mounts.mount("-t", "overlay", "overlay", "-o", f"lowerdir={':'.join(lowers)}", str(merged))
    # overlayfs counts links in the layer that holds the file, so link counts are not compared
    assert assert_same_tree(expected, merged, links=False) >= 25


def test_the_source_pins_the_image_and_reattach_survives_a_moved_tag(registry: Registry, image: str,
                                                                     layers: list[tuple[bytes, str]]) -> None:
    source = open_reference(image, {"insecure": ""})
    try:
        state = source.state()
        expected = source.pread(source.size, 0)
    finally:
        source.close()
    assert state["kind"] == "image" and [r["digest"] for r in state["layers"]] == \
        ["sha256:" + hashlib.sha256(b).hexdigest() for b, _ in layers]
    assert state["manifest_digest"].startswith("sha256:") and state["platform"]
    assert "merged" in source.describe() and state["manifest_digest"] in source.describe()
    registry.push_image("images/four", "v1", layers[:2], diff_ids=[diff_id(b) for b, _ in layers[:2]])  # moved
    again = reopen(state)
    try:
        assert again.pread(again.size, 0) == expected
    finally:
        again.close()
        registry.push_image("images/four", "v1", layers, diff_ids=[diff_id(b) for b, _ in layers])


def test_reattach_loads_the_merged_layout_the_mount_kept_and_merges_again_only_a_damaged_one(
        image: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from erofs_mount_tar import assembly

    source = open_reference(image, {"insecure": ""})
    try:
        state, expected = source.state(), source.pread(source.size, 0)
    finally:
        source.close()
    (kept,) = (cache_dir / "tar-layout").glob(f"{state['image_sha256']}.*.lay")  # by its digest and its trees
    merged = assembly.merge
    monkeypatch.setattr(assembly, "merge", lambda trees: pytest.fail("merged again at reattach"))
    again = reopen(state)
    try:
        assert again.pread(again.size, 0) == expected
    finally:
        again.close()
    calls: list[int] = []
    monkeypatch.setattr(assembly, "merge", lambda trees: calls.append(1) or merged(trees))
    other = kept.with_name(f"{state['image_sha256']}.{'0' * 32}.lay")  # the same image, from other trees: its
    kept.rename(other)  # extents point into other streams (a layer's TOC refused, now read by its index)
    again = reopen(state)
    try:
        assert again.pread(again.size, 0) == expected and calls == [1]
    finally:
        again.close()
    kept.write_bytes(kept.read_bytes()[:-10] + bytes(10))  # damaged: its digest no longer matches
    again = reopen(state)
    try:
        assert again.pread(again.size, 0) == expected and calls == [1, 1]
    finally:
        again.close()


def test_a_layer_mounted_as_it_is_is_made_once_and_its_reopen_loads_it(image: str, cache_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``-o layer=N`` (a snapshotter's layer): its daemon reopens what its mount just opened, a reattach the
    same; both load the layout kept by its digest instead of making it again from the tree, and never
    parse the tree (most of a reopen's time on a large layer)."""
    from erofs_mount_tar import packed_tree

    from erofs_mount_core import ImageLayout

    source = open_reference(image, {"insecure": "", "layer": "1"})
    try:
        state, expected = source.state(), source.pread(source.size, 0)
    finally:
        source.close()
    assert list((cache_dir / "tar-layout").glob(f"{state['image_sha256']}.*.lay"))
    monkeypatch.setattr(ImageLayout, "of", classmethod(lambda cls, tree: pytest.fail("made again at reopen")))
    monkeypatch.setattr(packed_tree, "load", lambda *args: pytest.fail("the tree parsed at reopen"))
    again = reopen(state)
    try:
        assert again.pread(again.size, 0) == expected
    finally:
        again.close()


def test_a_layer_s_mount_asks_for_the_image_s_manifest_and_config_once_each(registry: Registry, image: str) -> None:
    """A snapshotter mounts each layer of an image at once: every request a mount makes twice is paid for each."""
    proxy = FaultProxy(registry.host)
    try:
        open_reference(image.replace(registry.host, proxy.host), {"insecure": "", "layer": "1"}).close()
        gets = [path for method, path, _ in proxy.log if method == "GET"]
        assert sum("/manifests/" in path and "/manifests/sha256-" not in path for path in gets) == 1, gets
        assert [path for path in gets if "/blobs/" in path and gets.count(path) > 1] == [], gets
    finally:
        proxy.stop()


def test_reads_are_one_range_request_each_and_a_lying_registry_gives_io_errors(
        registry: Registry, image: str, tmp_path: Path) -> None:
    source = open_reference(image, {"insecure": ""})  # indexed (or from the cache), straight from the registry
    expected = source.pread(source.size, 0)
    source.close()
    proxy = FaultProxy(registry.host)
    try:
        reference = image.replace(registry.host, proxy.host)
        source = open_reference(reference, {"insecure": "", "readahead-kib": "0", "disk-cache-mib": "0"})
        try:
            config = whole_gets(proxy)
            assert len(config) == 1, "the layers were indexed already: nothing but the config is fetched whole"
            reads = 0
            for offset in range(0, source.size, 128 << 10):
                n = min(128 << 10, source.size - offset)
                before = len(proxy.ranges)
                assert source.pread(n, offset) == expected[offset:offset + n]
                assert len(proxy.ranges) - before <= 2, (offset, proxy.ranges[before:])
                reads += 1
            assert 0 < len(proxy.ranges) <= reads
            assert whole_gets(proxy) == config, "every layer read is a range request"
            counts = source.counters()  # what stats and metrics show: the plugin's counts, through every layer
            spans = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in proxy.ranges if r]
            assert counts["http_requests"] == len(spans)
            assert counts["http_bytes"] == sum(end - start + 1 for start, end in spans)
            assert counts["decompressed_bytes"] > 0 and counts["cache_misses"] > 0
        finally:
            source.close()
        source = open_reference(reference, {"insecure": "", "readahead-kib": "0", "disk-cache-mib": "0"})
        try:
            proxy.inject("blob", *["corrupt"] * 10_000)  # every answer lies, retries included
            errors = []
            for offset in range(0, source.size, 1 << 20):
                n = min(1 << 20, source.size - offset)
                try:
                    assert source.pread(n, offset) == expected[offset:offset + n], "a wrong byte reached a reader"
                except SourceError as exc:
                    errors.append(str(exc))
            assert any("is not the bytes measured when it was first read" in e for e in errors), errors
            assert len(errors) >= 4, "every layer's reads fail"
            proxy.faults.clear()  # the registry is honest again: nothing wrong was kept, every read is right
            for offset in range(0, source.size, 1 << 20):
                n = min(1 << 20, source.size - offset)
                assert source.pread(n, offset) == expected[offset:offset + n]
        finally:
            source.close()
    finally:
        proxy.stop()


def test_a_second_image_sharing_the_base_layer_downloads_only_its_own(registry: Registry,
                                                                      layers: list[tuple[bytes, str]],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    base, own = layers[0], (Layer(1_700_000_009).add("app/main", data=b"the app\n").bytes(), TAR_LAYER)
    registry.push_image("images/first", "v1", [base, layers[1]], diff_ids=[diff_id(base[0]), diff_id(layers[1][0])])
    registry.push_image("images/second", "v1", [base, own], diff_ids=[diff_id(base[0]), diff_id(own[0])])
    proxy = FaultProxy(registry.host)
    try:
        open_reference(f"{proxy.host}/images/first:v1", {"insecure": ""}).close()
        base_digest, own_digest = (hashlib.sha256(blob).hexdigest() for blob in (base[0], own[0]))
        assert whole_gets(proxy).count(base_digest) == 1
        proxy.log.clear()
        proxy.ranges.clear()
        second = open_reference(f"{proxy.host}/images/second:v1", {"insecure": ""})
        try:
            assert (second.pread(second.size, 0)).count(b"the app\n") == 1
        finally:
            second.close()
        assert own_digest in whole_gets(proxy)
        assert base_digest not in whole_gets(proxy), "the shared base layer was downloaded again"
    finally:
        proxy.stop()


# -- bad inputs: one clear line each, nothing left ---------------------------------------------------


def _serve(reference: str, options: str = "insecure") -> subprocess.CompletedProcess[str]:
    return subprocess.run([EROFS_MOUNT, "serve", "--source", f"oci:{reference}", "-o", options, "--run", "true"],
                          capture_output=True, text=True, timeout=120)


def test_bad_images_are_one_clear_line_and_leave_nothing(registry: Registry, layers: list[tuple[bytes, str]],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(cache))
    good = (Layer(1_700_000_010).add("ok", data=b"ok\n").bytes(), TAR_LAYER)
    lying = (gzip.compress(Layer(1_700_000_011).add("x", data=os.urandom(100_000)).bytes()), GZIP_LAYER)
    truncated = (gzip.compress(Layer(1_700_000_012).add("y", data=os.urandom(100_000)).bytes())[:-5000], GZIP_LAYER)
    registry.push_image("bad/lying", "v1", [good, lying], diff_ids=[diff_id(good[0]), diff_id(lying[0])])
    blob = registry.blob_file("sha256:" + hashlib.sha256(lying[0]).hexdigest())
    data = bytearray(blob.read_bytes())
    data[60_000] ^= 0xFF
    blob.write_bytes(bytes(data))  # the registry now serves other bytes under the layer's digest
    registry.push_image("bad/truncated", "v1", [good, truncated], diff_ids=[diff_id(good[0]), "sha256:" + "0" * 64])
    registry.push_image("bad/unknown", "v1", [good, (b"not a layer", "application/vnd.example.thing")],
                        diff_ids=[diff_id(good[0]), "sha256:" + "1" * 64])
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
               "digest": "sha256:" + "2" * 64, "size": 1000, "urls": ["https://example.com/layer.tar.gz"]}
    registry.push_image("bad/foreign", "v1", [good], diff_ids=[diff_id(good[0]), "sha256:" + "2" * 64],
                        extra=[foreign])
    registry.push_image("bad/empty", "v1", [], diff_ids=[])
    wrong_diff = (Layer(1_700_000_013).add("z", data=b"z\n").bytes(), TAR_LAYER)
    registry.push_image("bad/diffid", "v1", [wrong_diff], diff_ids=["sha256:" + "3" * 64])
    cases = {
        "lying": r"layer 1 \(sha256:[0-9a-f]{12}…\): the registry served bytes whose digest is",
        "truncated": r"layer 1 \(sha256:[0-9a-f]{12}…\).* truncated",
        "unknown": r"layer 1 \(sha256:[0-9a-f]{64}\) has media type 'application/vnd.example.thing'",
        "foreign": r"layer 1 \(sha256:2{64}\) is a foreign layer, kept outside the registry at https://example.com",
        "empty": r"has no layers",
        "diffid": r"layer 0 \(sha256:[0-9a-f]{64}\) unpacks to a stream whose sha256 is not the config's diff_id",
    }
    for repo, message in cases.items():
        result = _serve(f"{registry.host}/bad/{repo}:v1", "insecure,diff-id=strict")
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, (repo, result.stderr)
        assert re.search(message, result.stderr) and "Traceback" not in result.stderr, (repo, result.stderr)
    good_sha = hashlib.sha256(good[0]).hexdigest()  # (a plain tar layer: its stream's sha256 too)
    left = [p for p in cache.rglob("*") if p.is_file() and "bad" not in p.name and p != cache / "spans" / ".lock"]
    indexed_good = [p for p in left if good_sha in p.name or p.parent.name.startswith(good_sha)]
    assert sorted(set(left) - set(indexed_good)) == [], "a failed mount left files in the cache"


def test_a_stream_that_is_not_the_diff_id_is_said_counted_and_served_as_pinned_and_strict_refuses_it(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mounts: Mounts,
        caplog: pytest.LogCaptureFixture) -> None:
    """As skopeo's zstd:chunked rewrites a layer's stream: the manifest pins the blob, every span served is
    checked against it, so the config's claim is reported, not a reason to refuse, unless asked."""
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    layer = (gzip.compress(Layer(1_700_000_014).add("etc/os-release", data=b"ID=debian\n")
                           .add("bin/tool", data=os.urandom(300_000), mode=0o755).bytes()), GZIP_LAYER)
    reference = f"{registry.host}/odd/diffid:v1"
    registry.push_image("odd/diffid", "v1", [layer], diff_ids=["sha256:" + "4" * 64])
    with caplog.at_level("WARNING", logger="erofs_mount.oci"):
        source = open_reference(reference, {"insecure": ""})
    try:
        state = source.state()
        assert source.counters()["diff_id_mismatches"] == 1
    finally:
        source.close()
    said = [r.getMessage() for r in caplog.records if "diff_id" in r.getMessage()]
    assert len(said) == 1 and "served as the manifest pins it" in said[0], said
    assert state["diff_id"] == "report"
    again = reopen(state)  # the daemon's open and every reattach: the same, from the cached index
    try:
        assert again.counters()["diff_id_mismatches"] == 1
    finally:
        again.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("-t", "erofs", "-o", "ro,loop", str(materialize(reference, tmp_path / "image.erofs")), str(mnt))
    assert assert_same_tree(flatten([layer], tmp_path / "flattened"), mnt) == 4
    with pytest.raises(SourceChangedError, match=r"not the config's diff_id sha256:4{64} \(diff-id=strict\)"):
        reopen({**state, "diff_id": "strict"})
    refused = _serve(reference, "insecure,diff-id=strict")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "not the config's diff_id" in refused.stderr and "diff-id=strict" in refused.stderr
    bad = _serve(reference, "insecure,diff-id=maybe")
    assert bad.returncode == 2 and "use report or strict" in bad.stderr, bad.stderr


def test_reattach_refuses_when_a_layer_blob_is_gone(registry: Registry, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    first = (Layer(1_700_000_020).add("a", data=b"a\n").bytes(), TAR_LAYER)
    second = (gzip.compress(Layer(1_700_000_021).add("b", data=b"b\n").bytes()), GZIP_LAYER)
    registry.push_image("gone/app", "v1", [first, second], diff_ids=[diff_id(first[0]), diff_id(second[0])])
    source = open_reference(f"{registry.host}/gone/app:v1", {"insecure": ""})
    state = source.state()
    source.close()
    registry.delete_blob("gone/app", "sha256:" + hashlib.sha256(second[0]).hexdigest())
    with pytest.raises(SourceChangedError, match="is gone from the registry"):
        reopen(state)


def test_indexing_shows_one_progress_line_for_the_layers_on_a_terminal(registry: Registry,
                                                                       layers: list[tuple[bytes, str]],
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    registry.push_image("images/progress", "v1", layers, diff_ids=[diff_id(b) for b, _ in layers])
    code, shown = stderr_on_a_terminal([EROFS_MOUNT, "serve", "-q", "--source",
                                        f"oci:{registry.host}/images/progress:v1", "-o", "insecure", "--run", "true"],
                                       timeout=120)
    assert code == 0
    assert re.search(rb"\rindexing 4 layer\(s\) of .*images/progress:v1: \d+%, \d+ MiB at \d+ MiB/s", shown), shown
    assert shown.endswith(b"\r\x1b[K"), shown
