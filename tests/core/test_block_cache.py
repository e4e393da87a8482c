"""The core's block cache: what each read makes it fetch from the source below.

Its integration counterparts: the oci and s3 sources' tests (a registry's range
requests), tests/vm/test_containerd.py (a container's reads of lazy layers).
"""

from __future__ import annotations

import threading

from erofs_mount_core import BlockCache, Source, SourceError

BLOCK = 4096
DATA = bytes(range(256)) * (256 * BLOCK // 256)  # 256 blocks


class Counted(Source):
    """Bytes in memory; keeps each range a read asked for, in blocks."""

    def __init__(self) -> None:
        self.fetched: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(DATA)

    def pread(self, length: int, offset: int) -> bytes:
        self.fetched.append((offset // BLOCK, length // BLOCK))
        return DATA[offset:offset + length]


def cache(readahead_blocks: int) -> tuple[BlockCache, Counted]:
    below = Counted()
    return BlockCache(below, block_size=BLOCK, cache_bytes=len(DATA), readahead=readahead_blocks * BLOCK), below


def test_reads_out_of_order_fetch_only_their_blocks() -> None:
    blocks, below = cache(16)
    for n in (7, 3, 40, 12):
        assert bytes(blocks.pread(100, n * BLOCK + 5)) == DATA[n * BLOCK + 5:n * BLOCK + 105]
    assert below.fetched == [(7, 1), (3, 1), (40, 1), (12, 1)]


def test_reads_in_order_fetch_ahead_one_block_then_twice_as_far_each_time_up_to_the_limit() -> None:
    """As the kernel's readahead ramps up: a few small files read in order cost little more than the
    files; a long read soon fetches in ranges of the whole readahead."""
    blocks, below = cache(8)
    offset = 0
    while offset < 120 * BLOCK:
        assert bytes(blocks.pread(BLOCK, offset)) == DATA[offset:offset + BLOCK]
        offset += BLOCK
    assert below.fetched[:6] == [(0, 1), (1, 2), (3, 3), (6, 5), (11, 9), (20, 9)]
    assert all(length == 9 for _, length in below.fetched[4:])
    assert all(start == prev + n for (prev, n), (start, _) in zip(below.fetched, below.fetched[1:], strict=False)), \
        "a block fetched twice, or one skipped"


def test_a_read_out_of_order_starts_the_ramp_again() -> None:
    blocks, below = cache(8)
    for n in range(6):
        blocks.pread(BLOCK, n * BLOCK)
    below.fetched.clear()
    for n in (100, 101, 102):
        blocks.pread(BLOCK, n * BLOCK)
    assert below.fetched == [(100, 1), (101, 2)], "the second read in order fetches one block ahead again"


def test_no_readahead_fetches_what_is_read() -> None:
    blocks, below = cache(0)
    for n in range(5):
        blocks.pread(BLOCK, n * BLOCK)
    assert below.fetched == [(n, 1) for n in range(5)]


class Held(Counted):
    """Its reads wait for ``release`` (a span on a slow registry); ``fail`` makes the first one fail."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.release, self.started, self.fail = threading.Event(), threading.Event(), fail

    def pread(self, length: int, offset: int) -> bytes:
        data = super().pread(length, offset)
        self.started.set()
        assert self.release.wait(10)
        if self.fail:
            self.fail = False
            raise SourceError("the registry hung up")
        return data


def _two_reads_of_one_block(below: Held) -> list[bytes | BaseException]:
    """Two reads of the halves of one block at once, as the kernel sends neighbouring reads; their results."""
    blocks = BlockCache(below, block_size=BLOCK, cache_bytes=len(DATA), readahead=0)
    results: list[bytes | BaseException] = [b"", b""]

    def read(n: int) -> None:
        try:
            results[n] = bytes(blocks.pread(BLOCK // 2, n * BLOCK // 2))
        except SourceError as exc:
            results[n] = exc

    first = threading.Thread(target=read, args=(0,))
    first.start()
    assert below.started.wait(5)
    second = threading.Thread(target=read, args=(1,))
    second.start()
    second.join(0.2)
    below.release.set()
    first.join(5)
    second.join(5)
    return results


def test_a_block_on_its_way_is_waited_for_not_fetched_again() -> None:
    below = Held()
    assert _two_reads_of_one_block(below) == [DATA[:BLOCK // 2], DATA[BLOCK // 2:BLOCK]]
    assert below.fetched == [(0, 1)]


def test_a_read_that_waited_for_a_fetch_that_failed_fetches_the_block_itself() -> None:
    below = Held(fail=True)
    first, second = _two_reads_of_one_block(below)
    assert isinstance(first, SourceError) and second == DATA[BLOCK // 2:BLOCK]
    assert below.fetched == [(0, 1), (0, 1)]
