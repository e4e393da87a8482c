"""The span store: checked spans kept on disk, served to later mounts, bounded, and never trusted blindly."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from pathlib import Path

import pytest

from erofs_mount_core import (
    CacheSettings,
    FillJob,
    Source,
    SourceError,
    SpanHasher,
    SpanStore,
)
from erofs_mount_core._filters import Retrying
from erofs_mount_core._span_store import STALE_TEMP, stored

SPAN = 64 << 10
SMALL = CacheSettings(cache_mib=1, block_kib=SPAN >> 10, readahead_kib=0)


class Counted(Source):
    """Bytes in memory that count the reads made of them, and may lie."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []
        self.lie = False

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        self.reads.append((offset, length))
        data = self.data[offset:offset + length]
        return bytes([data[0] ^ 1]) + data[1:] if self.lie else data


@pytest.fixture
def data() -> bytes:
    return random.Random(3).randbytes(16 * SPAN - 100)  # the last span is short


def hashes_of(data: bytes):  # noqa: ANN201 - SpanHashes
    hasher = SpanHasher(SPAN)
    hasher.update(data)
    return hasher.finish()


def served(source: Source, store: SpanStore, data: bytes) -> Source:
    """As a mount serves a stream: checked, stored, behind a (small) memory cache."""
    return hashes_of(data).verified(source, SMALL, "test stream", store=store,
                                    stream=hashlib.sha256(data).hexdigest())


def places(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "spans").iterdir() if p.is_dir()]


def read_all(source: Source) -> bytes:
    return b"".join(bytes(source.pread(min(100_000, source.size - o), o)) for o in range(0, source.size, 100_000))


def test_a_new_mount_of_the_same_stream_reads_what_was_stored_without_a_fetch(tmp_path: Path, data: bytes) -> None:
    store = SpanStore(64 << 20, tmp_path / "spans")
    first = Counted(data)
    assert read_all(served(first, store, data)) == data
    assert first.reads, "the first mount fetched"
    (held,) = stored(tmp_path / "spans")
    assert (held.spans, held.span_size, held.bytes >= len(data)) == (16, SPAN, True)
    again = Counted(data)  # a reattached daemon: a new process, a new memory cache, the same store
    source = served(again, SpanStore(64 << 20, tmp_path / "spans"), data)
    assert read_all(source) == data
    assert again.reads == [], "every span came from the store"
    counts = source.counters()
    assert counts["span_store_hits"] >= 16 and counts.get("span_store_misses", 0) == 0


def test_a_span_changed_on_disk_is_detected_deleted_and_fetched_again(tmp_path: Path, data: bytes,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = SpanStore(64 << 20, tmp_path / "spans")
    read_all(served(Counted(data), store, data))
    (place,) = places(tmp_path)
    victim = place / "5"
    damaged = bytearray(victim.read_bytes())
    damaged[1000] ^= 0xFF
    victim.write_bytes(damaged)
    again = Counted(data)
    source = served(again, store, data)
    with caplog.at_level(logging.WARNING, logger="erofs_mount.spans"):
        assert read_all(source) == data
    assert again.reads == [(5 * SPAN, SPAN)], "only the changed span was fetched"
    assert source.counters()["span_store_corrupt"] == 1
    assert "is not the span it was stored as" in caplog.text
    assert victim.read_bytes() == data[5 * SPAN:6 * SPAN], "stored again, right"


def test_bytes_that_fail_their_check_are_never_stored(tmp_path: Path, data: bytes) -> None:
    store = SpanStore(64 << 20, tmp_path / "spans")
    liar = Counted(data)
    liar.lie = True
    with pytest.raises(SourceError, match="is not the bytes measured"):
        served(liar, store, data).pread(10, 0)
    assert stored(tmp_path / "spans") == []


def test_the_bound_holds_under_a_workload_larger_than_it(tmp_path: Path, data: bytes) -> None:
    bound = 4 * SPAN + SPAN // 2
    source = served(Counted(data), SpanStore(bound, tmp_path / "spans"), data)
    order = list(range(16)) * 3
    random.Random(5).shuffle(order)
    for n in order:
        length = min(SPAN, len(data) - n * SPAN)
        assert bytes(source.pread(length, n * SPAN)) == data[n * SPAN:n * SPAN + length]
        held = sum(s.bytes for s in stored(tmp_path / "spans"))
        assert held <= bound, f"{held} bytes stored, the bound is {bound}"


def test_the_least_recently_used_spans_go_first(tmp_path: Path, data: bytes) -> None:
    store = SpanStore(10 * SPAN, tmp_path / "spans")

    def use(n: int) -> None:  # each read by a new mount: no memory cache hides it from the store
        assert bytes(served(Counted(data), store, data).pread(SPAN, n * SPAN)) == data[n * SPAN:(n + 1) * SPAN]
        time.sleep(0.01)

    for n in range(10):
        use(n)
    use(0)  # used again: now the most recent
    use(10)  # over the bound: pruned to 90 % of it, oldest first
    (place,) = places(tmp_path)
    kept = {int(name) for name in os.listdir(place)}
    assert kept == {0, *range(3, 11)}, kept


def test_a_disk_that_will_not_take_spans_fails_no_read(tmp_path: Path, data: bytes,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store = SpanStore(64 << 20, tmp_path / "spans")
    store.place(hashlib.sha256(data).hexdigest(), SPAN).write_text("a file where the directory goes")
    with caplog.at_level(logging.WARNING, logger="erofs_mount.spans"):
        assert read_all(served(Counted(data), store, data)) == data
    assert caplog.text.count("spans are served without being kept") == 1


def test_a_crash_mid_write_leaves_no_span_and_its_temporary_file_is_deleted_later(tmp_path: Path,
                                                                                 data: bytes) -> None:
    store = SpanStore(64 << 20, tmp_path / "spans")
    read_all(served(Counted(data), store, data))
    (place,) = places(tmp_path)
    left = place / ".3.999.1.tmp"  # a writer killed before its rename
    left.write_bytes(data[:100])
    again = Counted(data)
    read_all(served(again, store, data))
    assert again.reads == [], "the span's own file is whole: a temporary file is never read"
    os.utime(left, (time.time() - STALE_TEMP - 1,) * 2)
    store.prune(1 << 40)
    assert not left.exists()


def test_the_fill_stores_every_span_in_the_background_and_stops_when_closed(tmp_path: Path, data: bytes) -> None:
    store = SpanStore(64 << 20, tmp_path / "spans")
    stream = hashlib.sha256(data).hexdigest()
    opened = []

    def fill_from() -> Source:
        opened.append(Counted(data))
        return opened[-1]

    serving = Counted(data)
    source = store.filling(served(serving, store, data), [FillJob(fill_from, hashes_of(data), stream, "test")])
    assert opened == [], "nothing is filled until the source serves"
    source.start_background()
    deadline = time.monotonic() + 10
    while source.counters().get("span_store_filled_bytes", 0) < len(data) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.counters()["span_store_filled_bytes"] == len(data)
    assert read_all(source) == data and serving.reads == [], "reads find what the fill stored"
    source.close()

    slow = threading.Event()

    class Stalled(Counted):
        def pread(self, length: int, offset: int) -> bytes:
            slow.wait(0.05)
            return super().pread(length, offset)

    other = random.Random(9).randbytes(16 * SPAN)
    filling = store.filling(Counted(other), [FillJob(lambda: Stalled(other), hashes_of(other),
                                                     hashlib.sha256(other).hexdigest(), "slow")])
    filling.start_background()
    time.sleep(0.1)
    started = time.monotonic()
    filling.close()
    assert time.monotonic() - started < 1, "close stops the fill at the span under way"
    assert filling.counters().get("span_store_filled_bytes", 0) < len(other)


def test_a_fill_larger_than_the_bound_is_not_made(tmp_path: Path, data: bytes,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = SpanStore(4 * SPAN, tmp_path / "spans")
    source = Retrying(store.filling(Counted(data), [FillJob(lambda: Counted(data), hashes_of(data),
                                                            hashlib.sha256(data).hexdigest(), "big")]))
    with caplog.at_level(logging.WARNING, logger="erofs_mount.spans"):
        source.start_background()
        source.close()
    assert "do not fit the span store" in caplog.text
    assert stored(tmp_path / "spans") == []


def test_cache_list_shows_a_row_per_stored_stream_and_prune_deletes_spans(
        tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from click.testing import CliRunner

    from erofs_mount_core._cli import cli

    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    read_all(served(Counted(data), SpanStore(64 << 20), data))
    listed = CliRunner().invoke(cli, ["cache", "list"])
    assert listed.exit_code == 0, listed.output
    stream = hashlib.sha256(data).hexdigest()
    assert f"spans/sha256:{stream[:12]}… (16 spans of 64.0 KiB)" in listed.output
    assert "in 16 files under" in listed.output and ".lock" not in listed.output
    (row,) = json.loads(CliRunner().invoke(cli, ["cache", "list", "--json"]).output)["result"]["span_store"]
    assert (row["stream"], row["spans"], row["span_size"]) == (f"sha256:{stream}", 16, SPAN)
    pruned = CliRunner().invoke(cli, ["cache", "prune", "--max-size", "0"])
    assert pruned.exit_code == 0 and "removed 16 files" in pruned.output, pruned.output
    again = Counted(data)
    assert read_all(served(again, SpanStore(64 << 20), data)) == data and again.reads, "fetched again"


@pytest.mark.timeout(30)
def test_a_fifo_in_a_span_s_place_is_never_read_and_blocks_nothing(tmp_path: Path, data: bytes) -> None:
    store = SpanStore(64 << 20, tmp_path / "spans")
    read_all(served(Counted(data), store, data))
    (place,) = places(tmp_path)
    (place / "3").unlink()
    os.mkfifo(place / "3")
    again = Counted(data)
    assert read_all(served(again, store, data)) == data  # would wait forever for a writer to the FIFO
    assert again.reads == [(3 * SPAN, SPAN)]
