"""Random access to a compressed archive's stream: reads of one layer wait for the network side by side."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from erofs_mount_local import LocalFile
from erofs_mount_tar import index as indexes

from erofs_mount_core import Filter
from tests.tar.test_index import cache_dir as cache_dir  # noqa: F401 - the fixture


class Gated(Filter):
    """The archive behind a registry that answers nothing until ``parties`` requests wait on it at once."""

    def __init__(self, inner: LocalFile, parties: int) -> None:
        super().__init__(inner)
        self.gate = threading.Barrier(parties, timeout=20)
        self.holding = True  # False: requests are answered at once

    def pread(self, length: int, offset: int) -> bytes:
        if self.holding:
            self.gate.wait()  # BrokenBarrierError unless the other read's request is under way as well
        return bytes(self.inner.pread(length, offset))


def tar_of(size: int) -> bytes:
    """Incompressible files: the compressed stream is as long as the tar, so offsets far apart in the
    stream are far apart (other checkpoints, other frames) in the archive too."""
    rng = random.Random(7)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n in range(size >> 20):
            info = tarfile.TarInfo(f"f{n}")
            info.size = 1 << 20
            tar.addfile(info, io.BytesIO(rng.randbytes(1 << 20)))
    return out.getvalue()


def zstd_frames(data: bytes) -> bytes:
    """zstd in frames of 256 KiB, as zstd:chunked and seekable zstd write it."""
    return b"".join(zstandard.ZstdCompressor().compress(data[at:at + (256 << 10)])
                    for at in range(0, len(data), 256 << 10))


@pytest.mark.parametrize("compress", [gzip.compress, zstd_frames], ids=["gzip", "zstd-frames"])
def test_reads_of_one_layer_fetch_side_by_side_not_one_after_another(tmp_path: Path, cache_dir: Path,
                                                                    compress: Callable[[bytes], bytes]) -> None:
    data = tar_of(8 << 20)
    archive = tmp_path / "layer.tar.z"
    archive.write_bytes(compress(data))
    index = indexes.build(LocalFile(str(archive)), "layer")
    gated = Gated(LocalFile(str(archive)), parties=2)
    gated.holding = False  # opening the stream reads its first bytes alone
    stream = index.open_stream(gated)
    gated.holding = True
    got: dict[int, bytes] = {}
    failed: list[BaseException] = []

    def read(offset: int) -> None:
        try:
            got[offset] = bytes(stream.pread(64 << 10, offset))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    readers = [threading.Thread(target=read, args=(offset,)) for offset in (1 << 20, 6 << 20)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(60)
    assert not failed, f"the second read's request waited for the first one's ({failed[0]!r})"
    assert got == {offset: data[offset:offset + (64 << 10)] for offset in (1 << 20, 6 << 20)}
    stream.close()
