"""The span store under OCI sources: a reopened image reads what was read before without a request, a fill
makes a registry outage harmless, and what a registry sends wrong is never kept."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_mount_oci import open_reference, reopen

from erofs_mount_core import Source, SourceError, UsageError
from erofs_mount_core._filters import Retrying, RetryPolicy
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import EROFS_LAYER, Registry
from tests.oci.test_tar_images import diff_id, upper_layers, whole_gets, zstd_tool

TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture
def proxy(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))  # a cold cache for each test
    p = FaultProxy(registry.host)
    yield p
    p.stop()


def read_all(source: Source, step: int = 256 << 10) -> bytes:
    return b"".join(bytes(source.pread(min(step, source.size - o), o)) for o in range(0, source.size, step))


def mounted_and_read(reference: str) -> tuple[bytes, dict[str, object]]:
    """Every byte of the image as a mount reads it, and the state its record keeps."""
    source = open_reference(reference, {"insecure": ""})
    try:
        return read_all(source), dict(source.state())
    finally:
        source.close()


def reattached_and_read(state: dict[str, object]) -> tuple[bytes, dict[str, int]]:
    """Every byte as a reattached daemon serves it, and its counters."""
    again = Retrying(reopen(state))
    try:
        return read_all(again), dict(again.counters())
    finally:
        again.close()


def span_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "spans").glob("*/*") if not p.name.startswith("."))


@pytest.fixture
def image(registry: Registry) -> str:
    one, two, three = upper_layers()  # plain tar, zstd (in frames), gzip
    blobs = [(one, "application/vnd.oci.image.layer.v1.tar"),
             (zstd_tool(two), "application/vnd.oci.image.layer.v1.tar+zstd"),
             (gzip.compress(three, mtime=0), TAR_GZIP)]
    registry.push_image("store/image", "v1", blobs, diff_ids=[diff_id(b) for b, _ in blobs])
    return "store/image:v1"


def test_a_reopened_image_reads_what_was_read_before_with_no_request(proxy: FaultProxy, image: str,
                                                                     tmp_path: Path) -> None:
    expected, state = mounted_and_read(f"{proxy.host}/{image}")
    assert state["disk_cache_mib"] == 2048 and span_files(tmp_path), "on by default, and kept in the record"
    proxy.log.clear()
    proxy.ranges.clear()
    got, counts = reattached_and_read(state)
    assert got == expected
    assert proxy.ranges == [], "every span came from the store"
    assert counts["span_store_hits"] > 0 and counts.get("http_requests", 0) == 0, counts


def test_a_corrupted_span_file_is_fetched_again_and_never_served(proxy: FaultProxy, image: str,
                                                                 tmp_path: Path) -> None:
    expected, state = mounted_and_read(f"{proxy.host}/{image}")
    victim = span_files(tmp_path)[0]
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    victim.write_bytes(damaged)
    proxy.ranges.clear()
    got, counts = reattached_and_read(state)
    assert got == expected
    assert counts["span_store_corrupt"] == 1 and proxy.ranges, "the damaged span was fetched from the registry"
    assert victim.read_bytes() != bytes(damaged)


def test_a_filled_image_reads_on_through_a_registry_outage(proxy: FaultProxy, image: str, tmp_path: Path) -> None:
    source = Retrying(open_reference(f"{proxy.host}/{image}", {"insecure": "", "fill": ""}),
                      RetryPolicy(attempts=2, base_delay=0.01))
    try:
        assert not _filling(source), "the fill starts once the source serves"
        source.start_background()
        deadline = time.monotonic() + 60
        while _filling(source):  # what the index pass left in the store, it has nothing to fill
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proxy.inject("blob", *["503"] * 10_000)  # the registry is down for blobs from now on
        proxy.ranges.clear()
        assert len(read_all(source)) == source.size
        assert proxy.ranges == [], "no read needed the registry"
    finally:
        source.close()


def _filling(source: Source) -> bool:
    return any(t.name == "fill" and t.is_alive() for t in threading.enumerate())


def test_fill_needs_spans_to_check_and_room_for_them(proxy: FaultProxy, image: str, registry: Registry,
                                                     layer: tuple[bytes, dict[str, str]]) -> None:
    with pytest.raises(UsageError, match="needs disk-cache-mib above 0"):
        open_reference(f"{proxy.host}/{image}", {"insecure": "", "fill": "", "disk-cache-mib": "0"})
    with pytest.raises(SourceError, match="do not fit the span store"):
        open_reference(f"{proxy.host}/{image}", {"insecure": "", "fill": "", "disk-cache-mib": "1"})
    registry.push_image("store/erofs", "v1", [(layer[0], EROFS_LAYER)])
    with pytest.raises(UsageError, match="needs verify=full"):
        open_reference(f"{proxy.host}/store/erofs:v1", {"insecure": "", "fill": ""})
    assert len(layer[0]) > 1 << 20
    with pytest.raises(SourceError, match="do not fit the span store"):
        open_reference(f"{proxy.host}/store/erofs:v1", {"insecure": "", "fill": "", "verify": "full",
                                                        "disk-cache-mib": "1"})


def test_an_erofs_layer_under_verify_full_is_kept_and_one_under_lazy_is_not(
        proxy: FaultProxy, registry: Registry, layer: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    registry.push_image("store/erofs", "v1", [(layer[0], EROFS_LAYER)])
    reference = f"{proxy.host}/store/erofs:v1"
    lazy = open_reference(reference, {"insecure": ""})
    try:
        assert read_all(lazy) == layer[0]
    finally:
        lazy.close()
    assert span_files(tmp_path) == [], "bytes checked against nothing are not kept"
    full = open_reference(reference, {"insecure": "", "verify": "full", "block-kib": "64"})
    state = full.state()
    try:
        assert read_all(full) == layer[0]
    finally:
        full.close()
    assert len(span_files(tmp_path)) == -(-len(layer[0]) // (64 << 10))
    proxy.ranges.clear()
    again = reopen(state)
    try:
        assert read_all(again) == layer[0]
    finally:
        again.close()
    assert proxy.ranges == []


def wait_for_fill(source: Source) -> None:
    deadline = time.monotonic() + 60
    while (not source.counters().get("span_store_filled_bytes") or _filling(source)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _filling(source), "the fill ended"


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from erofs_mount_oci import _http

    monkeypatch.setattr(_http, "RETRY", RetryPolicy(attempts=2, base_delay=0.01))


def test_a_reattach_while_the_registry_is_down_serves_a_filled_image_from_the_store(
        proxy: FaultProxy, image: str, quick_retries: None, caplog: pytest.LogCaptureFixture) -> None:
    source = open_reference(f"{proxy.host}/{image}", {"insecure": "", "fill": ""})
    state = source.state()
    try:
        source.start_background()
        wait_for_fill(source)
        expected = read_all(source)
    finally:
        source.close()
    proxy.outage = True
    proxy.log.clear()
    again = Retrying(reopen(state), RetryPolicy(attempts=1))  # the reattached daemon: no registry at all
    try:
        assert read_all(again) == expected
    finally:
        again.close()
    assert proxy.log and all(what == "503" for _m, _p, what in proxy.log), "every request met the outage"
    assert caplog.text.count("every span of it is in the span store: served from there") == 3
    registry_down_without_a_store = {**state, "disk_cache_mib": 0}
    with pytest.raises(SourceError, match="503"):
        reopen(registry_down_without_a_store)


def test_a_reattach_while_the_registry_is_down_refuses_a_layer_the_store_holds_only_part_of(
        proxy: FaultProxy, image: str, quick_retries: None, tmp_path: Path) -> None:
    source = open_reference(f"{proxy.host}/{image}", {"insecure": ""})
    state = source.state()
    for span in span_files(tmp_path):  # what the index pass left: the store has lost it since
        span.unlink()
    try:
        source.pread(4096, 0)  # one span of the first layer: the others are not stored
    finally:
        source.close()
    proxy.outage = True
    with pytest.raises(SourceError, match="503"):
        reopen(state)


def test_a_reattach_while_the_registry_is_down_serves_a_filled_erofs_layer(
        proxy: FaultProxy, registry: Registry, layer: tuple[bytes, dict[str, str]], quick_retries: None) -> None:
    registry.push_image("store/erofs", "v1", [(layer[0], EROFS_LAYER)])
    source = open_reference(f"{proxy.host}/store/erofs:v1", {"insecure": "", "verify": "full", "fill": ""})
    state = source.state()
    try:
        source.start_background()
        wait_for_fill(source)
    finally:
        source.close()
    proxy.outage = True
    again = Retrying(reopen(state), RetryPolicy(attempts=1))
    try:
        assert read_all(again) == layer[0]
    finally:
        again.close()


def test_a_first_host_downloads_each_layer_once_for_the_mount_and_every_read_after_it(
        proxy: FaultProxy, image: str, tmp_path: Path) -> None:
    """The index pass leaves each layer's stream in the span store: reading the whole image after the mount
    fetches nothing more (before, every byte came down twice: the pass, then the reads)."""
    source = open_reference(f"{proxy.host}/{image}", {"insecure": ""})
    try:
        downloads = whole_gets(proxy)
        assert len(downloads) == len(set(downloads)) == 4, "three layers and the config, once each"
        assert not list((tmp_path / "cache" / "spans").glob(".pass-*")), "a pass's spans left under their pass"
        proxy.ranges.clear()
        read_all(source)
        assert proxy.ranges == [], "a read fetched what the index pass had downloaded"
        assert source.counters()["span_store_hits"] > 0
    finally:
        source.close()


def test_an_index_pass_keeps_at_most_half_the_store_and_a_stream_from_its_start(
        proxy: FaultProxy, image: str, tmp_path: Path) -> None:
    source = open_reference(f"{proxy.host}/{image}", {"insecure": "", "disk-cache-mib": "2"})
    try:
        kept = span_files(tmp_path)
        assert sum(p.stat().st_size for p in kept) <= 1 << 20, "more than half of a 2 MiB store"
        assert all(p.name == "0" for p in kept), "a stream's spans from its first, without a gap"
        assert read_all(source)  # the rest is fetched as it is read
    finally:
        source.close()


def test_a_daemon_opens_its_layers_decoders_beside_serving_unless_the_store_holds_them(
        proxy: FaultProxy, image: str, tmp_path: Path) -> None:
    """A decoder's start (the gzip layer's first bytes fetched, its checkpoints loaded) is not left to the
    kernel's first read when that read will fetch anyway; a daemon served from the store fetches nothing."""
    expected, state = mounted_and_read(f"{proxy.host}/{image}")  # the index pass left every layer in the store
    served_from_store = reopen(state)
    proxy.log.clear()  # (a reopen asks whether each blob is still there)
    try:
        served_from_store.start_background()
        time.sleep(1)
        assert proxy.log == [], "a daemon the store serves fetched to open a decoder"
    finally:
        served_from_store.close()
    for span in span_files(tmp_path):
        span.unlink()
    fetching = reopen(state)
    proxy.log.clear()
    try:
        fetching.start_background()
        deadline = time.monotonic() + 30
        while not any(method == "GET" for method, _path, _what in proxy.log):
            assert time.monotonic() < deadline, "no decoder opened beside serving"
            time.sleep(0.05)
        assert read_all(fetching) == expected
    finally:
        fetching.close()
