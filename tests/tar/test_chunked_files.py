"""ChunkedFiles: a TOC layer's files read chunk by chunk, the chunks after a miss fetched in the same request."""

from __future__ import annotations

import hashlib
import random
import threading

import pytest
import zstandard
from erofs_mount_tar.chunked_files import MERGE_GAP, READAHEAD, Chunk, ChunkedFiles

from erofs_mount_core import Source, SourceError

HEADER = 512  # what lies between two files' frames in a zstd:chunked blob (their tar headers)


class Blob(Source):
    """Bytes in memory, every read noted."""

    def __init__(self, data: bytes) -> None:
        self.data, self.reads = bytearray(data), []

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        self.reads.append((offset, length))
        return bytes(self.data[offset:offset + length])


def layer(sizes: list[int], gap: int = HEADER) -> tuple[Blob, tuple[Chunk, ...], list[bytes]]:
    """Files of ``sizes`` bytes, each one zstd frame, ``gap`` bytes apart in the blob."""
    blob, chunks, files, start = bytearray(), [], [], 0
    for n, size in enumerate(sizes):
        data = random.Random(n).randbytes(size)  # as incompressible as most files' frames
        blob += bytes(gap)
        frame = zstandard.ZstdCompressor(level=1).compress(data)
        chunks.append(Chunk(start, size, len(blob), len(blob) + len(frame), hashlib.sha256(data).digest()))
        blob += frame
        files.append(data)
        start += size
    return Blob(bytes(blob)), tuple(chunks), files


def test_a_miss_brings_the_following_files_in_its_request_and_their_reads_make_none() -> None:
    blob, chunks, files = layer([20_000] * (READAHEAD // 20_000 + 10))  # more than one readahead holds
    reader = ChunkedFiles(blob, chunks, sum(map(len, files)), 64 << 20, "layer")
    assert reader.pread(100, 5) == files[0][5:105]
    assert len(blob.reads) == 1
    offset, length = blob.reads[0]
    assert offset == chunks[0].blob_start and length <= chunks[0].blob_end - offset + READAHEAD
    ahead = reader.counters()["toc_readahead_chunks"]
    assert ahead >= 5
    for n in range(1, ahead + 1):
        assert reader.pread(len(files[n]), chunks[n].start) == files[n]
    assert len(blob.reads) == 1, "the files fetched ahead were read without a request"
    assert reader.pread(10, chunks[ahead + 1].start) == files[ahead + 1][:10]
    assert len(blob.reads) == 2


def test_a_read_of_chunks_another_read_is_fetching_waits_for_that_request_and_makes_none() -> None:
    blob, chunks, files = layer([20_000] * 10)
    entered, release = threading.Event(), threading.Event()
    plain = blob.pread

    def stalled(length: int, offset: int) -> bytes:  # the first request, held until released
        entered.set()
        assert release.wait(60)
        return plain(length, offset)

    blob.pread = stalled  # type: ignore[method-assign]
    reader = ChunkedFiles(blob, chunks, sum(map(len, files)), 64 << 20, "layer")
    got: dict[str, bytes] = {}
    first = threading.Thread(target=lambda: got.update(first=reader.pread(100, 0)))
    first.start()
    assert entered.wait(60)
    blob.pread = plain  # type: ignore[method-assign]
    second = threading.Thread(target=lambda: got.update(second=reader.pread(100, chunks[5].start)))
    second.start()  # the sixth file: in the first read's readahead, which is on its way
    second.join(0.5)
    assert second.is_alive() and len(blob.reads) == 0, "it waits for the request under way, and makes none"
    release.set()
    first.join(60)
    second.join(60)
    assert got == {"first": files[0][:100], "second": files[5][:100]}
    assert len(blob.reads) == 1


def test_readahead_stops_at_a_gap_and_at_what_is_held() -> None:
    blob, chunks, files = layer([1000, 1000, 1000], gap=MERGE_GAP + 1)
    reader = ChunkedFiles(blob, chunks, 3000, 64 << 20, "layer")
    assert reader.pread(1000, 0) == files[0]
    assert blob.reads == [(chunks[0].blob_start, chunks[0].blob_end - chunks[0].blob_start)]
    blob, chunks, files = layer([1000] * 4)
    reader = ChunkedFiles(blob, chunks, 4000, 64 << 20, "layer")
    reader.pread(1000, 2000)  # the third file, then the fourth ahead
    reader.pread(1000, 0)
    assert blob.reads[1] == (chunks[0].blob_start, chunks[1].blob_end - chunks[0].blob_start), \
        "the first file's read brings the second, not the third again"


def test_bytes_fetched_ahead_are_checked_when_read_and_a_bad_one_fails_only_its_own_read() -> None:
    blob, chunks, files = layer([5000] * 4)
    blob.data[chunks[2].blob_start + 20] ^= 0xFF  # the third file's frame, as a registry might flip it
    rejected: list[str] = []
    reader = ChunkedFiles(blob, chunks, 20_000, 64 << 20, "layer", rejected.append)
    assert reader.pread(5000, 0) == files[0]
    assert reader.pread(5000, 5000) == files[1]
    assert rejected == [] and len(blob.reads) == 1
    with pytest.raises(SourceError, match="is not the one its TOC pins") as failed:
        reader.pread(10, 10_000)
    assert failed.value.transient and len(rejected) == 1
    blob.data[chunks[2].blob_start + 20] ^= 0xFF  # the retry fetches it again, whole
    assert reader.pread(5000, 10_000) == files[2]


def test_what_is_fetched_ahead_is_held_within_the_cache_s_bound_and_goes_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from erofs_mount_tar import chunked_files

    monkeypatch.setattr(chunked_files, "MAX_CHUNK", 0)
    blob, chunks, files = layer([60_000] * 40)
    bound = 200_000
    reader = ChunkedFiles(blob, chunks, sum(map(len, files)), bound, "layer")
    for n in range(0, 40, 5):
        assert reader.pread(len(files[n]), chunks[n].start) == files[n]
        assert reader._cached <= bound
        assert n in reader._cache, "what was read stays; what was fetched ahead makes room first"


def test_an_estargz_member_shared_by_two_chunks_is_fetched_once() -> None:
    import gzip

    data = bytes(range(256)) * 40
    member = gzip.compress(data)
    first, second = data[:4000], data[4000:]
    chunks = (Chunk(0, 4000, 0, len(member), hashlib.sha256(first).digest()),
              Chunk(4000, len(second), 0, len(member), hashlib.sha256(second).digest(), inner_offset=4000))
    blob = Blob(member)
    reader = ChunkedFiles(blob, chunks, len(data), 64 << 20, "layer", codec="gzip")
    assert reader.pread(len(data), 0) == data
    assert blob.reads == [(0, len(member))]


def test_what_is_held_is_counted_once_whichever_way_it_came() -> None:
    blob, chunks, files = layer([30_000] * 20)
    reader = ChunkedFiles(blob, chunks, sum(map(len, files)), 64 << 20, "layer")
    for n in range(20):
        assert reader.pread(len(files[n]), chunks[n].start) == files[n]
        held = sum(map(len, reader._cache.values())) + sum(map(len, reader._ahead.values()))
        assert reader._cached == held, n


def test_a_read_of_zeros_alone_fetches_nothing_ahead() -> None:
    blob, chunks, files = layer([4000, 4000])
    zeros = Chunk(0, 4096, chunks[0].blob_start, chunks[0].blob_start, hashlib.sha256(bytes(4096)).digest(),
                  zeros=True)
    moved = tuple(Chunk(c.start + 4096, c.size, c.blob_start, c.blob_end, c.sha256) for c in chunks)
    reader = ChunkedFiles(blob, (zeros, *moved), 4096 + 8000, 64 << 20, "layer")
    assert reader.pread(4096, 0) == bytes(4096) and blob.reads == []
    assert reader.pread(4000, 4096) == files[0]
