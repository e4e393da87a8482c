"""The tar index: one pass, kept in the cache, loaded instead of reading the archive, and never trusted blindly."""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from erofs_mount_local import LocalFile, reopen
from erofs_mount_tar import index as indexes
from erofs_mount_tar import streams
from erofs_mount_tar.archive_source import mount_archive, reattach_archive

from erofs_mount_core import CacheSettings, SourceChangedError, SourceError
from tests.terminal import stderr_on_a_terminal

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_archive(path: Path, files: dict[str, bytes], compress: list[str] | None = None) -> Path:
    plain = path.with_suffix(".plain")
    with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = plain.read_bytes()
    plain.unlink()
    if compress:
        data = subprocess.run(compress, input=data, capture_output=True, check=True).stdout
    path.write_bytes(data)
    return path


def files(seed: int = 1, n: int = 12, size: int = 300_000) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"f{i}": rng.randbytes(rng.randrange(size)) for i in range(n)}


def read_all(image: object) -> bytes:
    return bytes(image.pread(image.size, 0))  # type: ignore[attr-defined]


def mount(path: Path) -> object:
    return mount_archive(LocalFile(str(path)), CacheSettings(), progress=False)


def test_a_second_mount_and_a_reattach_load_the_index_instead_of_reading(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_archive(tmp_path / "a.tar.gz", files(), ["gzip", "-c"])
    first = mount(archive)
    want, state = read_all(first), first.state()  # type: ignore[attr-defined]
    first.close()  # type: ignore[attr-defined]

    def no_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was indexed again")

    monkeypatch.setattr(indexes, "build", no_pass)
    again = mount(archive)
    assert read_all(again) == want
    again.close()  # type: ignore[attr-defined]
    reattached = reattach_archive(reopen(state, what="archive"), state)
    assert read_all(reattached) == want
    reattached.close()


def test_a_damaged_or_missing_index_is_built_again(tmp_path: Path, cache_dir: Path) -> None:
    archive = make_archive(tmp_path / "a.tar.zst", files(), ["zstd", "-q", "-c"])
    image = mount(archive)
    want, state = read_all(image), image.state()  # type: ignore[attr-defined]
    image.close()  # type: ignore[attr-defined]
    (idx,) = cache_dir.glob("tar-index/*.idx")
    data = bytearray(idx.read_bytes())
    data[len(data) // 2] ^= 1
    idx.write_bytes(data)
    assert indexes.load(state["archive_sha256"]) is None
    again = reattach_archive(reopen(state, what="archive"), state)
    assert read_all(again) == want
    again.close()
    assert indexes.load(state["archive_sha256"]) is not None, "the rebuilt index is kept"
    idx.unlink()
    again = reattach_archive(reopen(state, what="archive"), state)
    assert read_all(again) == want
    again.close()


def test_a_cached_index_s_tree_is_parsed_when_a_layout_is_made_and_a_bad_one_is_one_line(cache_dir: Path) -> None:
    """The host's own cached index is checksummed and its tree was checked when it was written: a load
    leaves the tree unparsed (a daemon whose layout is cached never needs it). A tree this version refuses
    all the same (a file edited with its checksum) is one line naming the file to remove, when used."""
    from erofs_mount_core import SpanHashes

    sha256 = "ab" * 32
    index = indexes.ArchiveIndex(compression="tar", archive_sha256=sha256, archive_size=10, stream_size=10,
                                 stream_sha256=sha256, spans=SpanHashes(indexes.SPAN_SIZE, bytes(32)), layout=None,
                                 tree=b"[[0]]")
    indexes.store(index)
    with pytest.raises(ValueError, match="a child outside|incomplete|tree"):
        indexes.ArchiveIndex.from_bytes(index.to_bytes())  # fetched from elsewhere: checked at once
    loaded = indexes.load(sha256)
    assert loaded is not None and loaded.tree == b"[[0]]"
    with pytest.raises(SourceError) as refused:
        loaded.read_tree()
    assert len(str(refused.value).splitlines()) == 1 and str(cache_dir) in str(refused.value)


def test_an_index_given_its_own_layout_to_publish_keeps_its_fresh_tree_for_the_merge(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``index push`` (and ``-o publish-index`` at a mount) adds each layer's own image to what it publishes;
    the mount that publishes merges the same layers next, from the tree it has just read, not parsed again."""
    from erofs_mount_tar import packed_tree

    from erofs_mount_core import ImageLayout

    archive = make_archive(tmp_path / "a.tar.gz", files(n=4), ["gzip", "-c"])
    built = indexes.build(LocalFile(str(archive)), "a", layout=False)
    monkeypatch.setattr(packed_tree, "load", lambda *args: pytest.fail("the tree parsed again"))
    published = indexes.ArchiveIndex.from_bytes(built.with_own_layout().to_bytes(), check_tree=False)
    assert published.layout is not None and built.layout is None
    assert ImageLayout.of(built.read_tree().root) == published.layout


def test_an_index_of_another_version_is_not_used(tmp_path: Path, cache_dir: Path) -> None:
    archive = make_archive(tmp_path / "a.tar", files(n=3))
    image = mount(archive)
    sha = image.state()["archive_sha256"]  # type: ignore[attr-defined]
    image.close()  # type: ignore[attr-defined]
    idx = cache_dir / "tar-index" / f"{sha}.idx"
    data = bytearray(idx.read_bytes())
    data[16:20] = (indexes.VERSION + 1).to_bytes(4, "little")
    idx.write_bytes(data)
    assert indexes.load(sha) is None


@pytest.mark.parametrize("compress", [None, ["gzip", "-c"], ["zstd", "-q", "-c"]], ids=["plain", "gzip", "zstd"])
def test_bytes_changed_under_a_mount_are_io_errors_never_other_bytes(compress: list[str] | None,
                                                                      tmp_path: Path) -> None:
    """The archive rewritten in place (same inode): every span read after is checked against the index."""
    archive = make_archive(tmp_path / "a.tar", files(n=4, size=1 << 20), compress)  # zstd: one small frame
    image = mount(archive)
    try:
        size = archive.stat().st_size
        with open(archive, "r+b") as f:  # other bytes at the same place: a different archive of the same files
            f.seek(size // 2)
            f.write(bytes(4096))
        with pytest.raises(SourceError):
            read_all(image)
    finally:
        image.close()  # type: ignore[attr-defined]


def test_reattach_refuses_an_archive_whose_digest_changed(tmp_path: Path, cache_dir: Path) -> None:
    archive = make_archive(tmp_path / "a.tar", files(n=3))
    image = mount(archive)
    state = dict(image.state())  # type: ignore[attr-defined]
    image.close()  # type: ignore[attr-defined]
    for idx in cache_dir.glob("tar-index/*"):
        idx.unlink()
    state["archive_sha256"] = "0" * 64  # as if the archive had other bytes when mounted
    with pytest.raises(SourceChangedError, match="no longer the archive that was mounted"):
        reattach_archive(reopen(state, what="archive"), state)


def test_an_archive_with_a_large_zstd_frame_is_unpacked_in_the_cache_and_held(tmp_path: Path,
                                                                              cache_dir: Path) -> None:
    big = random.Random(5).randbytes(streams.ZSTD_FRAME_LIMIT + (1 << 20))  # incompressible: a large frame
    archive = make_archive(tmp_path / "big.tar.zst", {"big": big, "small": b"x"}, ["zstd", "-q", "-c"])
    image = mount(archive)
    try:
        assert "unpacked in the cache" in image.describe()  # type: ignore[attr-defined]
        (unpacked,) = cache_dir.glob("tar-unpacked/*.tar")
        assert unpacked.stat().st_blocks * 512 < unpacked.stat().st_size + (1 << 20)
        listed = subprocess.run([EROFS_MOUNT, "cache", "list"], capture_output=True, text=True, check=True).stdout
        assert f"yes     tar-unpacked/{unpacked.name}" in listed
        pruned = subprocess.run([EROFS_MOUNT, "cache", "prune"], capture_output=True, text=True, check=True)
        assert unpacked.exists(), pruned.stdout
        assert read_all(image).find(big[:4096]) > 0
    finally:
        image.close()  # type: ignore[attr-defined]
    subprocess.run([EROFS_MOUNT, "cache", "prune"], capture_output=True, check=True)
    assert not unpacked.exists() and not list(cache_dir.glob("tar-index/*"))


def test_unpacking_stops_before_it_would_fill_the_cache_s_filesystem(tmp_path: Path, cache_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    big = random.Random(6).randbytes(streams.ZSTD_FRAME_LIMIT + (1 << 20))
    archive = make_archive(tmp_path / "big.tar.zst", {"big": big}, ["zstd", "-q", "-c"])
    monkeypatch.setattr(streams, "unpack_room", lambda directory: 2 << 20)  # as if the disk were nearly full
    with pytest.raises(SourceError, match="would leave its filesystem with less than its reserve free"):
        mount(archive)
    assert [p for p in cache_dir.rglob("*") if not p.is_dir()] == [], "the partial unpacked file is left"


def test_the_index_is_small(tmp_path: Path) -> None:
    rng = random.Random(2)
    text = {f"doc/{i}.txt": " ".join(rng.choice(["tar", "gzip", "erofs", "block", "inode", "span"])
                                     for _ in range(rng.randrange(20_000))).encode() for i in range(200)}
    archive = make_archive(tmp_path / "docs.tar.gz", text, ["gzip", "-c"])
    index = indexes.build(LocalFile(str(archive)), str(archive))
    assert len(index.to_bytes()) <= 0.03 * index.stream_size, (len(index.to_bytes()), index.stream_size)


def test_cache_prune_keeps_what_fits_and_removes_the_least_recently_used(tmp_path: Path, cache_dir: Path) -> None:
    for i, seed in enumerate((1, 2, 3)):
        image = mount(make_archive(tmp_path / f"{i}.tar", files(seed=seed, n=2)))
        image.close()  # type: ignore[attr-defined]
    oldest = sorted(cache_dir.glob("tar-index/*.idx"), key=lambda p: p.stat().st_mtime)[0]
    os.utime(oldest, (1, 1))
    total = sum(p.stat().st_blocks * 512 for p in cache_dir.rglob("*") if p.is_file())
    result = subprocess.run([EROFS_MOUNT, "cache", "prune", "--max-size", str(total - 1)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.startswith("removed 1 files") and not oldest.exists()


def test_indexing_shows_a_progress_line_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, how far and how fast; then the line is cleared and only the result remains."""
    archive = make_archive(tmp_path / "a.tar.gz", files(n=4), ["gzip", "-c"])
    code, shown = stderr_on_a_terminal([EROFS_MOUNT, "serve", "-q", "--source", f"tar:{archive}", "--run", "true"],
                                       timeout=60)
    assert code == 0
    assert re.search(rb"\rindexing .*a\.tar\.gz: \d+%, \d+ MiB at \d+ MiB/s", shown), shown
    assert shown.endswith(b"\r\x1b[K"), shown
