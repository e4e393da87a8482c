"""Prefetch: a serving daemon keeps the order of its first reads, and the next mount of the image replays it
behind the kernel's reads, which never wait for it; a list is untrusted input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_mount_oci import open_reference, reopen
from erofs_mount_oci import prefetch as prefetching
from erofs_mount_oci.prefetch import LayerUnits, PrefetchList, ReadOrder, cached, list_name

from erofs_mount_core import Source
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import Registry
from tests.oci.test_span_store import image as image  # noqa: F401 - the fixture: tar, zstd and gzip layers
from tests.oci.test_tar_images import whole_gets
from tests.oci.test_toc_images import chunked as chunked  # noqa: F401 - the fixture: skopeo's zstd:chunked

DIGEST = "sha256:" + "ab" * 32
NAME = "ab" * 32


class Stream(Source):
    """A layer's stream in memory: what the kernel's reads go through."""

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(length)


def test_a_read_the_kernel_waits_for_never_queues_behind_prefetch_and_the_plan_runs_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefetching, "WORKERS", 2)  # two fetches at once, both held: what the kernel's reads do then
    layers = [LayerUnits("sha256:" + "cd" * 32, "toc", 1 << 20)]
    plan = PrefetchList(tuple(layers), ((0, 5), (0, 1), (0, 3), (0, 8), (0, 9)))
    calls: list[tuple[int, int]] = []
    inside = threading.Semaphore(0)
    release = threading.Event()

    def fetch(unit: int, count: int) -> int:  # the network, stalled until released
        calls.append((unit, count))
        inside.release()
        assert release.wait(60)
        return count << 20

    order = ReadOrder(NAME, layers, plan, [fetch], [1 << 30])
    stream = order.recorded(0, Stream(16 << 20))
    try:
        order.start()
        for _ in range(2):  # both workers are inside a fetch, and stay there
            assert inside.acquire(timeout=60)
        assert sorted(calls) == [(1, 1), (5, 1)], "the plan's first two units, one per worker"
        done = threading.Event()
        reader = threading.Thread(target=lambda: (stream.pread(4096, (3 << 20) + 10), done.set()))
        reader.start()
        assert done.wait(60), "the kernel's read waited for a prefetch of other bytes"
        assert not release.is_set() and len(calls) == 2, "... while both prefetches were still under way"
        same = threading.Event()
        waiting = threading.Thread(target=lambda: (stream.pread(4096, 1 << 20), same.set()))
        waiting.start()  # unit 1, which a prefetch is fetching: it waits for that fetch, and makes no other
        assert not same.wait(0.5) and len(calls) == 2
        release.set()
        assert same.wait(60)
        deadline = time.monotonic() + 60
        while order.counters().get("prefetch_units", 0) < 4:
            assert time.monotonic() < deadline, order.counters()
            time.sleep(0.01)
        stream.pread(10, 5 << 20)  # unit 5: prefetched, then read: a hit
        counts = order.counters()
        assert sorted(calls) == [(1, 1), (5, 1), (8, 2)], "unit 3 was read first; 8 and 9 in one fetch"
        assert counts["prefetch_skipped"] == 1 and counts["prefetch_hits"] == 2, "units 1 and 5"
        assert counts["prefetch_waste"] == 2 and counts["prefetch_planned"] == 5, "units 8 and 9, never read"
    finally:
        release.set()
        order.close()


def test_reads_are_kept_in_first_read_order_once_the_image_serves(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    layers = [LayerUnits("sha256:" + "01" * 32, "archive", 1 << 20), LayerUnits("sha256:" + "02" * 32, "toc", 1 << 20)]
    order = ReadOrder(NAME, layers, None, [None, None], [0, 0])
    first, second = order.recorded(0, Stream(4 << 20)), order.recorded(1, Stream(4 << 20))
    first.pread(100, 0)  # the command's own open, before it serves: not the image's use
    order.start()
    second.pread(10, (3 << 20) - 5)  # units 2 and 3 of the second layer
    first.pread(10, 1 << 20)
    second.pread(10, 3 << 20)  # read before: noted once
    order.close()
    kept = cached(list_name(DIGEST))
    assert kept is not None and kept.layers == tuple(layers)
    assert kept.entries == ((1, 2), (1, 3), (0, 1))


def test_a_list_for_layers_cut_otherwise_applies_only_to_the_layers_cut_the_same() -> None:
    archive = LayerUnits("sha256:" + "01" * 32, "archive", 1 << 20)
    toc = LayerUnits("sha256:" + "02" * 32, "toc", 1 << 20)
    listed = PrefetchList((archive, toc), ((1, 4), (0, 2), (1, 0)))
    indexed_here = LayerUnits(toc.digest, "archive", 1 << 20)  # this host indexed the layer its TOC failed
    assert listed.for_layers([archive, indexed_here]) == [(0, 2)]
    assert listed.for_layers([toc, archive]) == [(0, 4), (1, 2), (0, 0)]


@pytest.mark.parametrize("change", [
    lambda d: d.update(version=2),
    lambda d: d["layers"][0].update(digest="sha256:short"),
    lambda d: d["layers"][0].update(kind="squashfs"),
    lambda d: d["layers"][0].update(unit=1),
    lambda d: d["layers"][0].update(unit=True),
    lambda d: d["entries"].append([1, 0]),
    lambda d: d["entries"].append([0, -1]),
    lambda d: d["entries"].append([0, 1.5]),
    lambda d: d["entries"].append(["0", 1]),
    lambda d: d.update(entries=[[0, n] for n in range(70_000)]),
])
def test_a_list_is_untrusted_and_every_field_is_checked(change) -> None:  # noqa: ANN001 - a callable
    doc = json.loads(PrefetchList((LayerUnits(DIGEST, "archive", 1 << 20),), ((0, 3),)).to_bytes())
    change(doc)
    with pytest.raises(ValueError):
        PrefetchList.from_bytes(json.dumps(doc).encode())
    with pytest.raises(ValueError, match="more than"):
        PrefetchList.from_bytes(b" " * (5 << 20))


# -- against a registry: a second mount replays what the first read -------------------------------------------


@pytest.fixture
def proxy(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    p = FaultProxy(registry.host)
    yield p
    p.stop()


def _read(source: Source, ranges: list[tuple[int, int]]) -> list[bytes]:
    return [bytes(source.pread(length, offset)) for offset, length in ranges]


def _sample(size: int) -> list[tuple[int, int]]:
    """Reads scattered over the second half of an image (its files' blocks), as a workload's."""
    return [(size // 2 + n * (size // 16) // 4096 * 4096, 8192) for n in range(7)]


def _wait_for_prefetch(source: Source) -> dict[str, int]:
    deadline = time.monotonic() + 120
    while True:
        counts = dict(source.counters())
        settled = sum(counts.get(k, 0) for k in ("prefetch_units", "prefetch_skipped", "prefetch_passed"))
        if counts.get("prefetch_planned") and settled >= counts["prefetch_planned"]:
            return counts
        assert time.monotonic() < deadline, counts
        time.sleep(0.05)


def _blob_gets(proxy: FaultProxy) -> int:
    return sum(1 for method, path, _ in proxy.log if method == "GET" and "/blobs/" in path)


def _served_and_read(reference: str) -> tuple[list[tuple[int, int]], list[bytes], str]:
    """A daemon's life on the first host: it serves, the workload reads (``_sample``), it ends; (the reads,
    what they gave, the image's manifest digest)."""
    first = open_reference(reference, {"insecure": ""})
    try:
        first.start_background()
        ranges = _sample(first.size)
        return ranges, _read(first, ranges), first.state()["manifest_digest"]
    finally:
        first.close()


def _replayed_and_read(proxy: FaultProxy, source: Source, ranges: list[tuple[int, int]],
                       expected: list[bytes]) -> dict[str, int]:
    """``source`` serves; once its prefetch is done, the workload's reads fetch nothing. Its counters then."""
    try:
        source.start_background()
        counts = _wait_for_prefetch(source)
        assert counts["prefetch_units"] > 0, counts
        before = _blob_gets(proxy)
        assert _read(source, ranges) == expected
        assert _blob_gets(proxy) == before, "a read fetched what the prefetch should have"
        return dict(source.counters())
    finally:
        source.close()


def test_a_toc_image_mounted_again_has_what_the_first_mount_read_fetched_before_it_is_read(
        proxy: FaultProxy, chunked: tuple[str, Path]) -> None:
    reference = chunked[0].replace(chunked[0].split("/")[0], proxy.host)
    ranges, expected, _ = _served_and_read(reference)
    counts = _replayed_and_read(proxy, open_reference(reference, {"insecure": ""}), ranges, expected)
    assert counts["prefetch_hits"] >= counts["prefetch_units"] - 1, counts


def test_an_image_of_tar_layers_is_prefetched_into_the_span_store(proxy: FaultProxy, image: str,
                                                                   tmp_path: Path) -> None:
    reference = f"{proxy.host}/{image}"
    ranges, expected, _ = _served_and_read(reference)
    shutil.rmtree(tmp_path / "cache" / "spans")  # nothing read before is on this host any more
    counts = _replayed_and_read(proxy, open_reference(reference, {"insecure": ""}), ranges, expected)
    assert counts["prefetch_hits"] > 0 and counts.get("span_store_hits", 0) > 0, counts


# -- published with the index: a fresh host prefetches what the publisher's workload read ----------------------


def _push_with(registry: Registry, reference: str, key: Path, listed: PrefetchList) -> str:
    """What ``index push --sign KEY --prefetch-from MOUNTPOINT`` pushes (the mountpoint's list is ``listed``):
    the indexes of the layers without a TOC, and the list."""
    from erofs_mount_oci.credentials import CredentialSource
    from erofs_mount_oci.layers import indexed
    from erofs_mount_oci.options import client_for
    from erofs_mount_oci.platform import Platform
    from erofs_mount_oci.published import load_signing_key, push
    from erofs_mount_oci.reference import parse
    from erofs_mount_oci.registry import Registry as Api

    ref = parse(reference)
    client = client_for(ref, insecure=True, ca=None, credentials=CredentialSource("anonymous"), hosts_dir="")
    try:
        api = Api(client, ref, insecure=True)
        manifest, digest, chosen = api.image_manifest(Platform.host())
        layers = [layer for layer in api.tar_layers(manifest, digest, chosen) if layer.toc is None]
        diff_ids = [api.diff_ids(manifest)[layer.index] for layer in layers]
        found = indexed(api, layers, diff_ids).indexes
        subject = {"mediaType": manifest["mediaType"], "digest": digest, "size": api.manifest_size(digest)}
        artifact, _ = push(api, subject, layers, diff_ids, found, load_signing_key(str(key)), listed)
        return artifact
    finally:
        client.close()


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("keys")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(base / "k.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(base / "k.pem"), "-pubout", "-out", str(base / "k.pub")],
                   check=True)
    return base / "k.pem", base / "k.pub"


def test_a_fresh_host_that_uses_a_published_index_prefetches_the_publisher_s_reads(
        registry: Registry, image: str, signing: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reference = f"{registry.host}/{image}"
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "publisher"))
    ranges, expected, digest = _served_and_read(reference)  # the publisher's mount, serving its workload
    listed = cached(list_name(digest))
    assert listed is not None and listed.entries
    artifact = _push_with(registry, reference, signing[0], listed)

    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "fresh"))
    proxy = FaultProxy(registry.host)
    try:
        options = {"insecure": "", "index-key": str(signing[1])}
        via = reference.replace(registry.host, proxy.host)
        command = open_reference(via, options)  # the command's open: it finds the artifact, keeps its list
        state = command.state()
        command.close()
        assert state["published_index"] == artifact and cached(list_name(digest)) == listed
        counts = _replayed_and_read(proxy, reopen(state), ranges, expected)  # the daemon's open
        assert counts["prefetch_planned"] == len(listed.entries), counts
        assert not set(whole_gets(proxy)) & {d.digest.removeprefix("sha256:") for d in listed.layers}, \
            "a layer was downloaded"
    finally:
        proxy.stop()


def test_a_published_list_that_is_not_its_digest_is_passed_over_and_the_mount_goes_on(
        registry: Registry, image: str, signing: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    reference = f"{registry.host}/{image}"
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "publisher"))
    source = open_reference(reference, {"insecure": ""})
    digest = source.state()["manifest_digest"]
    layers = tuple(LayerUnits(d["digest"], "archive", 1 << 20) for d in source.state()["layers"])
    source.close()
    listed = PrefetchList(layers, ((0, 0), (2, 0)))
    _push_with(registry, reference, signing[0], listed)
    blob = registry.blob_file("sha256:" + hashlib.sha256(listed.to_bytes()).hexdigest())
    blob.write_bytes(listed.to_bytes().replace(b'"entries"', b'"entrieZ"'))  # the registry serves other bytes
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "fresh"))
    with caplog.at_level("WARNING", logger="erofs_mount.oci"):
        mounted = open_reference(reference, {"insecure": "", "index-key": str(signing[1])})
    try:
        assert "published_index" in mounted.state() and cached(list_name(digest)) is None
        assert any("bytes of another digest; no prefetch" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        mounted.close()


def test_prefetch_from_what_is_not_a_mount_of_the_image_is_one_line(registry: Registry, image: str,
                                                                     tmp_path: Path) -> None:
    result = subprocess.run([str(Path(sys.executable).with_name("erofs-mount")), "index", "push",
                             f"oci:{registry.host}/{image}", "-o", "insecure", "--prefetch-from", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert f"{tmp_path} is not an erofs-mount mountpoint" in result.stderr


def test_a_toc_image_s_published_list_reaches_a_host_that_trusts_its_key_and_others_do_not_look(
        registry: Registry, chunked: tuple[str, Path], signing: tuple[Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reference = chunked[0]
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "publisher"))
    _, _, digest = _served_and_read(reference)
    listed = cached(list_name(digest))
    assert listed is not None and {layer.kind for layer in listed.layers} == {"toc"}
    _push_with(registry, reference, signing[0], listed)  # no index in it: a TOC image needs none

    proxy = FaultProxy(registry.host)
    try:
        via = reference.replace(registry.host, proxy.host)
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "no-key"))
        open_reference(via, {"insecure": ""}).close()
        assert not [p for _, p, _ in proxy.log if "referrers" in p or "/manifests/sha256-" in p], \
            "a host that trusts no key looked for a list it would not use"
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "trusting"))
        open_reference(via, {"insecure": "", "index-key": str(signing[1])}).close()
        assert cached(list_name(digest)) == listed
    finally:
        proxy.stop()
