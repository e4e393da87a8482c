"""zstd:chunked images, as Debian's skopeo writes them, mounted by their tables of contents.

The image is made the way users make one: an ordinary image (umoci's
crafted layers and real files of this machine) pushed as gzip, then
``skopeo copy --dest-compress-format zstd:chunked``. The reference is
``umoci unpack`` of the original. Every byte comes through a proxy that
logs what was asked, so the tests can say what was fetched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from erofs_mount_core import SourceChangedError, SourceError
from tests.imagetree import assert_same_tree
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import Registry
from tests.oci.test_tar_images import Mounts, materialize, whole_gets
from tests.oci.test_tar_images import mounts as mounts  # noqa: F401 - the fixture
from tests.oci.test_umoci import layers as crafted_layers
from tests.oci.test_umoci import oci_layout

ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
POSITION, CHECKSUM = "io.containers.zstd-chunked.manifest-position", "io.containers.zstd-chunked.manifest-checksum"


def real_files_layer(limit: int = 6 << 20) -> bytes:
    """A layer of this machine's files (real sizes, so files of many chunks), read whole."""
    out, total = io.BytesIO(), 0
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in [Path("/usr"), Path("/usr/include"), *sorted(Path("/usr/include").rglob("*"))[:2000]]:
            if path.is_symlink() or total > limit:
                continue
            if path.is_file():
                total += path.stat().st_size
            tar.add(path, arcname=str(path.relative_to("/")), recursive=False)  # directories named: no implicit
    return out.getvalue()


@pytest.fixture(scope="module")
def chunked(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(the zstd:chunked image's reference, umoci's unpack of the original)"""
    base = tmp_path_factory.mktemp("chunked")
    layout = oci_layout(base / "layout", [*crafted_layers(), real_files_layer()])
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(base / "bundle")], check=True,
                   capture_output=True)
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", "--dest-compress-format", "zstd:chunked",
                    f"oci:{layout}:t", f"docker://{registry.host}/chunked/app:t"], check=True, capture_output=True)
    yield f"{registry.host}/chunked/app:t", base / "bundle" / "rootfs"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache per test: a fresh host."""
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def manifest(registry: Registry, reference: str) -> dict:
    import httpx

    repo, _, tag = reference.removeprefix(registry.host + "/").partition(":")
    return httpx.get(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()


def fetched(proxy: FaultProxy, sizes: dict[str, int]) -> int:
    paths = [path for method, path, _ in proxy.log if method == "GET" and "/blobs/" in path]
    total = 0
    for path, asked in zip(paths, proxy.ranges, strict=True):
        if asked is None:
            total += sizes.get(path.rpartition("/")[2], 0)
        else:
            first, _, last = asked.removeprefix("bytes=").partition("-")
            total += int(last) - int(first) + 1
    return total


def test_debian_s_skopeo_writes_what_the_tests_assume(registry: Registry, chunked: tuple[str, Path]) -> None:
    doc = manifest(registry, chunked[0])
    assert all(d["mediaType"] == ZSTD and POSITION in d["annotations"] for d in doc["layers"]), doc


def test_a_fresh_host_mounts_it_reading_the_tocs_only_and_it_equals_umoci_s_unpack(
        registry: Registry, chunked: tuple[str, Path], tmp_path: Path, mounts: Mounts) -> None:
    reference, expected = chunked
    doc = manifest(registry, reference)
    sizes = {d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]}
    tocs = sum(int(d["annotations"][POSITION].split(":")[1]) for d in doc["layers"])
    proxy = FaultProxy(registry.host)
    try:
        via = reference.replace(registry.host, proxy.host)
        result = subprocess.run([str(Path(sys.executable).with_name("erofs-mount")), "serve", "-q", "--source",
                                 f"oci:{via}", "-o", "insecure", "--run", "true"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert whole_gets(proxy) == [doc["config"]["digest"].removeprefix("sha256:")], "a layer was downloaded"
        assert fetched(proxy, sizes) <= tocs + doc["config"]["size"], "more than the TOCs before the mount"
        image = materialize(via, tmp_path / "image.erofs")  # every file read, chunk by chunk
        assert whole_gets(proxy) == [doc["config"]["digest"].removeprefix("sha256:")] * 2
    finally:
        proxy.stop()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("-t", "erofs", "-o", "ro,loop", str(image), str(mnt))
    assert assert_same_tree(expected, mnt) >= 100
    assert os.lstat(mnt / "etc/old").st_mtime == -315619200, "a time before 1970, through the TOC's RFC 3339"


def test_each_layer_alone_mounts_by_its_toc(registry: Registry, chunked: tuple[str, Path], tmp_path: Path,
                                             mounts: Mounts) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("-t", "erofs", "-o", "ro,loop", str(materialize(chunked[0], tmp_path / "l.erofs", "layer=1")),
                 str(mnt))
    assert (mnt / "usr/share/man").read_bytes() == b"a directory, now a file\n"
    assert sorted(os.listdir(mnt / "usr/share")) == ["man"]


def test_a_toc_is_read_once_and_reopens_load_what_it_gave_and_a_damaged_copy_is_read_again(
        registry: Registry, chunked: tuple[str, Path], cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon each mount starts, every reattach and the next mount of a layer reopen it: reading its TOC
    again (inflate, JSON, every entry checked) was the larger part of each open of a large layer."""
    from erofs_mount_oci import layers, open_reference, reopen

    source = open_reference(chunked[0], {"insecure": ""})
    try:
        state, expected = source.state(), source.pread(source.size, 0)
    finally:
        source.close()
    kept = sorted((cache_dir / "tar-toc").glob("*.tix"))
    assert len(kept) == len(manifest(registry, chunked[0])["layers"])
    with monkeypatch.context() as patched:
        patched.setattr(layers, "fetch_toc", lambda *args: pytest.fail("a TOC fetched again"))
        patched.setattr(layers, "load_toc", lambda *args: pytest.fail("a TOC read again"))
        again = reopen(state)
        try:
            assert again.pread(again.size, 0) == expected
        finally:
            again.close()
    kept[0].write_bytes(kept[0].read_bytes()[:-1] + b"?")  # damaged: ignored, the TOC read again and kept anew
    again = reopen(state)
    try:
        assert again.pread(again.size, 0) == expected
    finally:
        again.close()
    assert not kept[0].read_bytes().endswith(b"?")


def test_a_registry_that_flips_bytes_never_gets_a_wrong_byte_to_a_reader(registry: Registry,
                                                                         chunked: tuple[str, Path]) -> None:
    from erofs_mount_oci import open_reference

    reference = chunked[0]
    source = open_reference(reference, {"insecure": ""})
    expected = source.pread(source.size, 0)
    state = source.state()
    source.close()
    proxy = FaultProxy(registry.host)
    try:
        via = {**state, "registry": proxy.host}
        from erofs_mount_oci import reopen

        source = reopen(via)  # the TOCs are in the cache: nothing fetched yet
        try:
            proxy.inject("blob", *["corrupt"] * 10_000)
            errors, checked = [], 0
            for offset in range(0, source.size, 256 << 10):
                n = min(256 << 10, source.size - offset)
                try:
                    assert source.pread(n, offset) == expected[offset:offset + n], "a wrong byte reached a reader"
                    checked += 1
                except SourceError as exc:
                    errors.append(str(exc))
            assert any("is not the one its TOC pins" in e for e in errors), errors[:3]
            proxy.faults.clear()
            assert source.pread(source.size, 0) == expected, "a bad chunk was kept"
            assert source.counters()["toc_chunks_rejected"] > 0
        finally:
            source.close()
    finally:
        proxy.stop()


def test_a_toc_that_is_not_the_one_the_manifest_pins_is_refused(registry: Registry, chunked: tuple[str, Path]) -> None:
    from erofs_mount_oci import open_reference

    doc = manifest(registry, chunked[0])
    doc["layers"][0]["annotations"][CHECKSUM] = "sha256:" + "0" * 64
    registry.put_manifest("chunked/app", "wrong-pin", doc, doc["mediaType"])
    with pytest.raises(SourceChangedError, match="layer 0 .*its TOC's bytes are not the ones its manifest pins"):
        open_reference(f"{registry.host}/chunked/app:wrong-pin", {"insecure": ""})


def _rewritten(blob: bytes, position: str, change) -> tuple[bytes, str, str]:  # noqa: ANN001 - a callable
    """The blob with its TOC changed by ``change`` (a new skippable frame in the old one's place) and the
    annotations that pin the new TOC."""
    offset, length, _raw, _ = (int(f) for f in position.split(":"))
    document = json.loads(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob[offset:offset + length]),
                                                                     read_across_frames=True).read())
    change(document)
    raw = json.dumps(document).encode()
    compressed = zstandard.ZstdCompressor().compress(raw)
    head = blob[:offset - 8]
    frame = b"\x50\x2a\x4d\x18" + len(compressed).to_bytes(4, "little") + compressed
    return head + frame, f"{len(head) + 8}:{len(compressed)}:{len(raw)}:1", \
        "sha256:" + hashlib.sha256(compressed).hexdigest()


def push_rewritten(registry: Registry, reference: str, name: str, change) -> str:  # noqa: ANN001 - a callable
    """The image ``reference`` with its last layer's TOC changed by ``change`` and pinned by the manifest (as
    its builder would have written it), pushed as ``name``: its reference."""
    import httpx

    doc = manifest(registry, reference)
    repository = reference.removeprefix(registry.host + "/").partition(":")[0]
    last = doc["layers"][-1]
    blob = httpx.get(f"http://{registry.host}/v2/{repository}/blobs/{last['digest']}").content
    new, position, checksum = _rewritten(blob, last["annotations"][POSITION], change)
    stream = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(new), read_across_frames=True).read()
    config = json.loads(httpx.get(f"http://{registry.host}/v2/{repository}/blobs/{doc['config']['digest']}").content)
    layers = [httpx.get(f"http://{registry.host}/v2/{repository}/blobs/{d['digest']}").content
              for d in doc["layers"][:-1]]
    diff_ids = [*config["rootfs"]["diff_ids"][:-1], "sha256:" + hashlib.sha256(stream).hexdigest()]
    registry.push_image(name, "t", [*((b, ZSTD) for b in layers), (new, ZSTD)], diff_ids=diff_ids)
    pinned = manifest(registry, f"{registry.host}/{name}:t")
    for d, original in zip(pinned["layers"], doc["layers"], strict=True):
        d["annotations"] = original["annotations"]
    pinned["layers"][-1]["annotations"] = {POSITION: position, CHECKSUM: checksum}
    registry.put_manifest(name, "t", pinned, pinned["mediaType"])
    return f"{registry.host}/{name}:t"


def test_a_toc_that_lacks_a_digest_sends_its_layer_to_the_index_pass(registry: Registry, chunked: tuple[str, Path],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from erofs_mount_oci import open_reference

    def drop_a_digest(document: dict) -> None:
        next(e for e in document["entries"] if e.get("type") == "reg" and e.get("size")).pop("digest")

    reference = push_rewritten(registry, chunked[0], "chunked/lacking", drop_a_digest)
    with caplog.at_level("WARNING", logger="erofs_mount.oci"):
        source = open_reference(reference, {"insecure": ""})
    source.close()
    assert any("the TOC gives no sha256 for" in r.getMessage() and "indexing the layer instead" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:  # noqa: ANN001 - a callable
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)


def test_verify_background_finds_every_toc_skopeo_wrote_true_to_its_stream(registry: Registry,
                                                                            chunked: tuple[str, Path]) -> None:
    """Every entry and chunk of Debian's skopeo's TOCs, compared with the tar stream the same blob holds."""
    from erofs_mount_oci import open_reference

    layers = len(manifest(registry, chunked[0])["layers"])
    source = open_reference(chunked[0], {"insecure": "", "verify": "background", "verify-rate-mib": "1000"})
    try:
        source.start_background()
        wait_for(lambda: source.counters().get("background_proven_layers") == layers or source.refusal(),
                 "the pass")
        assert source.refusal() is None
    finally:
        source.close()


def test_a_toc_that_says_other_than_its_stream_is_refused_by_the_background_pass(
        registry: Registry, chunked: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """A TOC pinned by the manifest that gives a file a setuid bit its tar entry lacks (an image that shows one
    tree to erofs-mount and another to docker): the daemon's pass refuses the image; a later mount indexes that
    layer instead (the stream's tree), and a reattach of the first is refused, since it would come out
    otherwise."""
    from erofs_mount_oci import open_reference, reopen

    def setuid(document: dict) -> None:
        entry = next(e for e in document["entries"] if e.get("type") == "reg" and e.get("size"))
        entry["mode"] |= 0o4000

    reference = push_rewritten(registry, chunked[0], "chunked/lying", setuid)
    source = open_reference(reference, {"insecure": "", "verify": "background", "verify-rate-mib": "1000"})
    try:
        state = source.state()
        source.pread(source.size, 0)  # every chunk is the one the TOC pins: no read fails
        source.start_background()
        wait_for(lambda: source.refusal() is not None, "the refusal")
        line = source.refusal()
        assert "its table of contents" in line and "mode differ" in line, line
        with pytest.raises(SourceError, match="refused: a background pass"):
            source.pread(4096, 0)
    finally:
        source.close()
    with caplog.at_level("WARNING", logger="erofs_mount.oci"):
        again = open_reference(reference, {"insecure": "", "verify": "background"})
    again.close()
    assert any("its TOC was found false by a background pass" in r.getMessage() for r in caplog.records)
    with pytest.raises(SourceError):
        reopen(state)


# -- eStargz ---------------------------------------------------------------------------------------------------


def estargz_layer(seed: int = 5) -> tuple[bytes, str, str, list[tuple[str, bytes]]]:
    """(blob, TOC digest, diff_id, its files) of a layer with directories, files of one and of many 64 KiB
    chunks, a symlink, a hardlink, an xattr, a whiteout and a time with a fraction."""
    import random

    from tests.oci.estargz import Writer

    rng = random.Random(seed)
    writer = Writer(chunk_size=64 << 10)
    files = []

    def add(name: str, kind: bytes, data: bytes = b"", **fields: object) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, 0o755 if kind == tarfile.DIRTYPE else 0o644, 1_700_000_000.25
        for key, value in fields.items():
            setattr(info, key, value)
        writer.add(info, data)
        if kind == tarfile.REGTYPE:
            files.append((name, data))

    add("srv", tarfile.DIRTYPE)
    add("srv/data", tarfile.DIRTYPE, uid=1000, gid=1000)
    for i, size in enumerate((0, 1, 4095, 65536, 65537, 300_000, 1 << 20)):
        add(f"srv/data/f{i}", tarfile.REGTYPE, rng.randbytes(size))
    add("srv/tagged", tarfile.REGTYPE, b"tagged\n", pax_headers={"SCHILY.xattr.user.origin": "estargz"})
    add("srv/link", tarfile.SYMTYPE, linkname="data/f1")
    add("srv/hard", tarfile.LNKTYPE, linkname="srv/data/f5")
    add("srv/.wh.gone", tarfile.REGTYPE)
    blob, toc_digest, diff_id = writer.finish()
    return blob, toc_digest, diff_id, files


@pytest.fixture(scope="module")
def estargz_image(registry: Registry) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    blob, toc_digest, diff_id, files = estargz_layer()
    digest = registry.push_image("estargz/app", "t", [(blob, "application/vnd.oci.image.layer.v1.tar+gzip")],
                                 diff_ids=[diff_id])
    doc = manifest(registry, f"{registry.host}/estargz/app:t")
    doc["layers"][0]["annotations"] = {"containerd.io/snapshot/stargz/toc.digest": toc_digest}
    registry.put_manifest("estargz/app", "t", doc, doc["mediaType"])
    assert digest
    return f"{registry.host}/estargz/app:t", blob, files


def test_an_estargz_layer_mounts_from_its_footer_and_toc_and_reads_right(
        registry: Registry, estargz_image: tuple[str, bytes, list[tuple[str, bytes]]], tmp_path: Path,
        mounts: Mounts) -> None:
    reference, blob, files = estargz_image
    proxy = FaultProxy(registry.host)
    try:
        via = reference.replace(registry.host, proxy.host)
        from erofs_mount_oci import open_reference

        source = open_reference(via, {"insecure": ""})
        state = source.state()
        source.close()
        doc = manifest(registry, reference)
        assert whole_gets(proxy) == [doc["config"]["digest"].removeprefix("sha256:")], "the layer was downloaded"
        toc_offset = int(blob[-51:][16:32], 16)
        asked = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in proxy.ranges if r]
        assert asked == [(len(blob) - 51, len(blob) - 1), (toc_offset, len(blob) - 52)], asked
        assert state["layers"][0]["toc"]["kind"] == "estargz"
        image = materialize(via, tmp_path / "image.erofs")
    finally:
        proxy.stop()
    extracted, mnt = tmp_path / "extracted", tmp_path / "mnt"
    extracted.mkdir()
    mnt.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xzf", "-", "-C", str(extracted),
                    "--exclude=stargz.index.json", "--exclude=.wh.*"], input=blob, check=True)
    mounts.mount("-t", "erofs", "-o", "ro,loop", str(image), str(mnt))
    assert assert_same_tree(extracted, mnt) >= 12  # the whiteout deletes nothing below and is gone, as unpacked
    for name, data in files:
        if not name.endswith(".wh.gone"):
            assert (mnt / name).read_bytes() == data, name
    assert os.getxattr(mnt / "srv/tagged", "user.origin") == b"estargz"
    assert os.lstat(mnt / "srv/data/f0").st_mtime_ns == 1_700_000_000_250_000_000
    assert (mnt / "srv/hard").stat().st_ino == (mnt / "srv/data/f5").stat().st_ino
    assert not (mnt / "stargz.index.json").exists() and not (mnt / "srv" / "gone").exists()


def test_an_estargz_layer_whose_chunks_are_flipped_gives_errors_never_other_bytes(
        registry: Registry, estargz_image: tuple[str, bytes, list[tuple[str, bytes]]]) -> None:
    from erofs_mount_oci import open_reference, reopen

    reference = estargz_image[0]
    source = open_reference(reference, {"insecure": ""})
    expected, state = source.pread(source.size, 0), source.state()
    source.close()
    proxy = FaultProxy(registry.host)
    try:
        source = reopen({**state, "registry": proxy.host})
        try:
            proxy.inject("blob", *["corrupt"] * 10_000)
            errors = []
            for offset in range(0, source.size, 64 << 10):
                n = min(64 << 10, source.size - offset)
                try:
                    assert source.pread(n, offset) == expected[offset:offset + n], "a wrong byte reached a reader"
                except SourceError as exc:
                    errors.append(str(exc))
            assert any("is not the one its TOC pins" in e for e in errors), errors[:3]
        finally:
            source.close()
    finally:
        proxy.stop()


def test_an_estargz_annotation_on_a_layer_without_a_footer_indexes_the_layer(
        registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    import gzip

    from erofs_mount_oci import open_reference

    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        info = tarfile.TarInfo("plain")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"plain\n"))
    blob = gzip.compress(stream.getvalue(), mtime=0)
    registry.push_image("estargz/none", "t", [(blob, "application/vnd.oci.image.layer.v1.tar+gzip")],
                        diff_ids=["sha256:" + hashlib.sha256(stream.getvalue()).hexdigest()])
    doc = manifest(registry, f"{registry.host}/estargz/none:t")
    doc["layers"][0]["annotations"] = {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "1" * 64}
    registry.put_manifest("estargz/none", "t", doc, doc["mediaType"])
    with caplog.at_level("WARNING", logger="erofs_mount.oci"):
        source = open_reference(f"{registry.host}/estargz/none:t", {"insecure": ""})
    try:
        assert source.size > 0
    finally:
        source.close()
    assert any("has no eStargz footer" in r.getMessage() for r in caplog.records), caplog.records


def test_verify_background_finds_an_estargz_toc_true_to_its_stream(
        estargz_image: tuple[str, bytes, list[tuple[str, bytes]]]) -> None:
    """The stream holds the TOC itself (``stargz.index.json``) beside the entries the TOC lists: passed over."""
    from erofs_mount_oci import open_reference

    source = open_reference(estargz_image[0], {"insecure": "", "verify": "background", "verify-rate-mib": "1000"})
    try:
        source.start_background()
        wait_for(lambda: source.counters().get("background_proven_layers") == 1 or source.refusal(), "the pass")
        assert source.refusal() is None
    finally:
        source.close()
