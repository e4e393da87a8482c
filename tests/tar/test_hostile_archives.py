"""Hostile and unusual archives: a faithful image where EROFS can hold the entry, else one clear line.

Every archive here is indexed by the code that indexes registry layers
(``tar:`` and the registry's tar layers share it). Memory is measured by
the ``ru_maxrss`` of a child process, never by time.
"""

from __future__ import annotations

import io
import os
import re
import resource
import stat
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from erofs_mount_local import LocalFile
from erofs_mount_tar import entries as tree
from erofs_mount_tar import streams
from erofs_mount_tar.archive_source import mount_archive
from erofs_mount_tar.index import ArchiveIndex
from erofs_mount_tar.merge import merge

from erofs_mount_core import CacheSettings, ImageLayout, SourceError

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))
D, F, S = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def entry(name: str, kind: bytes = F, data: bytes = b"", *, fmt: int = tarfile.PAX_FORMAT, link: str = "",
          pax: dict[str, str] | None = None, **fields: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), link
    info.mode = 0o755 if kind == D else 0o644
    info.pax_headers = dict(pax or {})
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape") + data + bytes(-len(data) % 512)


def archive(path: Path, *entries: bytes) -> Path:
    path.write_bytes(b"".join(entries) + bytes(1024))
    return path


def with_field(header: bytes, start: int, value: bytes) -> bytes:
    """``header`` with one field replaced (a base-256 number, say: tarfile masks what it writes) and its checksum
    made again."""
    block = bytearray(header[:512])
    block[start:start + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + header[512:]


def base256(value: int, size: int = 8) -> bytes:
    return bytes([0xFF if value < 0 else 0x80]) + (value % (1 << (8 * size - 8))).to_bytes(size - 1, "big")


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """A ustar header written by hand: tarfile will not write the sizes an attacker declares."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def one_line(path: Path, cache_dir: Path) -> str:
    """What ``serve`` says of the archive: one line, a non-zero exit, nothing left in the cache."""
    result = subprocess.run([EROFS_MOUNT, "serve", "--source", f"tar:{path}", "--run", "true"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and str(path) in result.stderr, result.stderr
    assert [p for p in cache_dir.rglob("*") if not p.is_dir()] == [], "a refused archive left files in the cache"
    return result.stderr


def image_of(path: Path) -> bytes:
    image = mount_archive(LocalFile(str(path)), CacheSettings(), progress=False)
    try:
        return bytes(image.pread(image.size, 0))  # type: ignore[attr-defined]
    finally:
        image.close()  # type: ignore[attr-defined]


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Mounts an archive's image with the kernel (loop), after fsck.erofs; unmounted at the end."""
    points: list[Path] = []

    def mount(path: Path, *, fsck: bool = True) -> Path:
        image = tmp_path / f"image{len(points)}.erofs"
        image.write_bytes(image_of(path))
        if fsck:
            checked = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
            assert checked.returncode == 0, checked.stdout + checked.stderr
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(point)], check=True)
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=True)


# -- what EROFS can hold is held ------------------------------------------------------------------------


def test_times_before_1970_are_held_exactly(tmp_path: Path, mounted: callable) -> None:  # type: ignore[valid-type]
    mnt = mounted(archive(tmp_path / "old.tar",
                          entry("gnu", mtime=-315619200, fmt=tarfile.GNU_FORMAT),
                          entry("pax", pax={"mtime": "-5.5"}),
                          entry(".wh.gone", mtime=-86400, fmt=tarfile.GNU_FORMAT)))
    assert os.lstat(mnt / "gnu").st_mtime == -315619200
    assert os.lstat(mnt / "pax").st_mtime_ns == -5_500_000_000
    gone = os.lstat(mnt / "gone")  # a whiteout keeps its entry's time (and owner), as overlayfs sees it
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0 and gone.st_mtime == -86400


def test_a_whiteout_under_a_file_of_the_same_layer_is_dropped_and_the_file_kept(tmp_path: Path,
                                                                               mounted: callable) -> None:  # type: ignore[valid-type]
    path = archive(tmp_path / "umoci.tar", entry("usr/share/man", data=b"a file\n"),
                   entry("usr/share/man/.wh.cs"), entry("usr/share/man/.wh..wh..opq"),
                   entry("usr/share/man/x/.wh.y"))
    mnt = mounted(path)
    assert (mnt / "usr/share/man").read_bytes() == b"a file\n"
    assert os.stat(mnt / "usr/share").st_nlink == 2
    # and merged over a layer where it was a directory: the file, not an empty directory
    lower = tree.read_tree(io.BytesIO(b"".join([entry("usr/share/man/cs/a.1", data=b"x")]) + bytes(1024)), "lower")
    with open(path, "rb") as f:
        upper = tree.read_tree(f, "upper")  # type: ignore[arg-type]
    merged = merge([lower, upper])
    assert stat.S_ISREG(merged.children[b"usr"].children[b"share"].children[b"man"].mode)


def test_a_whiteout_deletes_an_earlier_entry_of_its_own_layer_as_containerd_and_docker_do(tmp_path: Path) -> None:
    """containerd's applyNaive and Docker's UnpackLayer remove a whiteout's target whatever layer made it;
    an entry after its whiteout stays. The layer's own tree shows it as overlayfs reads it."""
    with open(archive(tmp_path / "same.tar", entry("etc/foo", data=b"1"), entry("etc/.wh.foo"),
                      entry("etc/.wh.bar"), entry("etc/bar", data=b"2")), "rb") as f:
        layer = tree.read_tree(f, "same")  # type: ignore[arg-type]
    etc = layer.root.children[b"etc"].children
    assert etc[b"foo"].kind == stat.S_IFCHR and etc[b"foo"].rdev == (0, 0)
    assert etc[b"bar"].kind == stat.S_IFREG
    lower = tree.read_tree(io.BytesIO(entry("etc/foo", data=b"0") + entry("etc/bar", data=b"0") + bytes(1024)), "lower")
    merged = merge([lower, layer]).children[b"etc"].children
    assert b"foo" not in merged and merged[b"bar"].size == 1


def test_a_tree_as_deep_as_path_max_allows_is_held(tmp_path: Path, mounted: callable) -> None:  # type: ignore[valid-type]
    deep = "/".join(["d"] * 1500)
    # (fsck.erofs 1.5 itself recurses, and runs out of stack at this depth: the kernel is the judge)
    mnt = mounted(archive(tmp_path / "deep.tar", entry(deep + "/leaf", data=b"deep\n")), fsck=False)
    assert (mnt / deep / "leaf").read_bytes() == b"deep\n"


def test_an_xattr_linux_has_no_namespace_for_is_left_out_with_a_warning(tmp_path: Path, mounted: callable,
                                                                        caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[valid-type]
    mnt = mounted(archive(tmp_path / "mac.tar", entry("f", data=b"x", pax={
        "SCHILY.xattr.com.apple.quarantine": "0081;5f", "SCHILY.xattr.user.kept": "yes"})))
    assert os.listxattr(mnt / "f") == ["user.kept"]
    assert "com.apple.quarantine" in caplog.text and "left out" in caplog.text


# -- what it cannot hold is one line ---------------------------------------------------------------------

HOSTILE = {
    "negative-mode": (lambda: with_field(entry("f", fmt=tarfile.GNU_FORMAT), 100, base256(-1)), r"has a mode \(-1\)"),
    "huge-mode": (lambda: with_field(entry("f", fmt=tarfile.GNU_FORMAT), 100, base256(1 << 55)), r"has a mode"),
    "uid-over-32-bits": (lambda: entry("f", pax={"uid": str(1 << 32)}), r"an owner \(4294967296:0\)"),
    "time-out-of-range": (lambda: entry("f", pax={"mtime": "1e30"}), r"a time"),
    "time-infinite": (lambda: entry("f", pax={"mtime": "inf"}), r"a time"),
    "whiteout-of-nothing": (lambda: entry("d/.wh."), r"is a whiteout of no name"),
    "whiteout-of-dot": (lambda: entry("d/.wh.."), r"is a whiteout of no name"),
    "whiteout-of-dotdot": (lambda: entry(".wh..."), r"is a whiteout of no name"),
    "name-over-255": (lambda: entry("n" * 256), r"a name longer than 255 bytes"),
    "nul-in-pax-path": (lambda: entry("f", pax={"path": "a\0b"}), r"holding a NUL"),
    "empty-xattr-name": (lambda: entry("f", pax={"SCHILY.xattr.": "v"}), r"an xattr name \(b''\)"),
    "xattr-value-over-64k": (lambda: entry("f", pax={"SCHILY.xattr.user.big": "v" * 65537}),
                             r"an xattr value of 65,537 bytes"),
    "xattrs-over-an-inode": (lambda: entry("f", pax={f"SCHILY.xattr.user.{i}": "v" * 60000 for i in range(5)}),
                             r"bytes of xattrs \(an inode holds"),
    "symlink-nul": (lambda: entry("l", S, link="a", pax={"linkpath": "a\0b"}), r"symlink target"),
    "device-out-of-range": (lambda: entry("c", tarfile.CHRTYPE, devmajor=5000, fmt=tarfile.GNU_FORMAT),
                            r"a device number \(5000:0\)"),
    "negative-size": (lambda: entry("f", pax={"size": "-5"}), r"declares a negative size"),
    "gnu-sparse": (lambda: raw_header(b"sparse", tarfile.GNUTYPE_SPARSE, 0), r"sparse file"),
    "pax-sparse": (lambda: entry("f", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}), r"sparse file"),
    "damaged-pax-record": (lambda: raw_header(b"pax", tarfile.XHDTYPE, 9) + b"99 a=b\n\n".ljust(512, b"\0"),
                           r"PAX header is damaged"),
    "long-name-chain": (lambda: b"".join(raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, 2) +
                                         b"x\0".ljust(512, b"\0") for _ in range(20)), r"extension headers"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_entry_is_one_line_naming_it(case: str, tmp_path: Path, cache_dir: Path) -> None:
    make, message = HOSTILE[case]
    line = one_line(archive(tmp_path / f"{case}.tar", entry("ok", data=b"fine"), make()), cache_dir)
    assert re.search(message, line), line


def _gzip_bomb(path: Path, head: bytes, mib: int) -> Path:
    """``head`` then ``mib`` MiB of zeros, gzip'd: about 1 MB on disk."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        f.write(deflate.compress(head))
        zero = bytes(1 << 20)
        for _ in range(mib):
            f.write(deflate.compress(zero))
        f.write(deflate.flush())
    return path


def _peak_mib(*command: str) -> tuple[int, str]:
    """The peak resident memory of ``command`` (its ru_maxrss, read by a process of its own) and its stderr."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)")
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, timeout=300)
    return int(result.stdout), result.stderr


BOMBS = {
    "gnu-long-name": raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGNAME, 1000 << 20),
    "gnu-long-link": raw_header(b"././@LongLink", tarfile.GNUTYPE_LONGLINK, 1000 << 20),
    "pax": raw_header(b"pax", tarfile.XHDTYPE, 1000 << 20),
    "pax-global": raw_header(b"pax", tarfile.XGLTYPE, 1000 << 20),
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_a_1_mb_header_bomb_is_refused_in_under_100_mib(bomb: str, tmp_path: Path) -> None:
    path = _gzip_bomb(tmp_path / f"{bomb}.tar.gz", BOMBS[bomb], 1000)
    assert path.stat().st_size < 1_100_000
    peak, stderr = _peak_mib(EROFS_MOUNT, "serve", "--source", f"tar:{path}", "--run", "true")
    assert len(stderr.strip().splitlines()) == 1 and "refusing the archive" in stderr, stderr
    assert peak <= 100, f"indexing took {peak} MiB"


def test_global_pax_records_that_add_up_are_refused(tmp_path: Path, cache_dir: Path) -> None:
    def global_header(first: int) -> bytes:
        records = b"".join(pax_record(f"k{i}", "v" * 1000) for i in range(first, first + 200))
        return raw_header(b"pax", tarfile.XGLTYPE, len(records)) + records.ljust(-(-len(records) // 512) * 512, b"\0")

    line = one_line(archive(tmp_path / "g.tar", *(global_header(i * 200) for i in range(6)), entry("f")), cache_dir)
    assert "global PAX records add up to more than 1,048,576 bytes" in line, line


def test_directories_replaced_by_files_index_in_linear_time(tmp_path: Path) -> None:
    """100,000 directories, each replaced by a file: the old scan of every path seen made this hours."""
    path = tmp_path / "replaced.tar"
    with open(path, "wb") as f:
        for i in range(100_000):
            f.write(entry(f"d{i}/x") + entry(f"d{i}", data=b"f"))
        f.write(bytes(1024))
    with open(path, "rb") as f:
        layer = tree.read_tree(f, "replaced")  # type: ignore[arg-type]
    assert len(layer.root.children) == 100_000
    assert all(node.kind == stat.S_IFREG for node in layer.root.children.values())


@pytest.mark.parametrize("limit, make, message", [
    ("MAX_ENTRIES", lambda: b"".join(entry(f"f{i}") for i in range(30)), "more than 20 entries"),
    ("MAX_XATTR_BYTES", lambda: b"".join(entry(f"f{i}", pax={"SCHILY.xattr.user.a": "v" * 10}) for i in range(30)),
     "MiB of xattrs"),
])
def test_an_archive_over_a_documented_limit_is_refused(limit: str, make: callable, message: str,  # type: ignore[valid-type]
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree, limit, 20 if limit == "MAX_ENTRIES" else 100)
    with pytest.raises(streams.ArchiveError, match=message):
        tree.read_tree(io.BytesIO(make() + bytes(1024)), "big")


def test_a_zstd_archive_of_too_many_frames_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "MAX_ZSTD_FRAMES", 10)
    data = archive(tmp_path / "x.tar", entry("f", data=b"x")).read_bytes()
    frames = b"".join(zstandard.ZstdCompressor().compress(data[i:i + 64]) for i in range(0, len(data), 64))
    (tmp_path / "x.tar.zst").write_bytes(frames)
    with pytest.raises(streams.ArchiveError, match="more than 10 zstd frames"):
        image_of(tmp_path / "x.tar.zst")


def test_a_zstd_frame_larger_than_it_declared_is_unpacked_not_inflated_per_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small frame with no content size may inflate to gigabytes: found in the pass, which starts again
    unpacking the stream into the cache, so that no read inflates more than the limit."""
    monkeypatch.setattr(streams, "ZSTD_CONTENT_LIMIT", 1 << 20)
    payload = bytes(3 << 20)
    data = archive(tmp_path / "z.tar", entry("zeros", data=payload)).read_bytes()
    writer = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    (tmp_path / "z.tar.zst").write_bytes(writer.compress(data) + writer.flush())
    image = mount_archive(LocalFile(str(tmp_path / "z.tar.zst")), CacheSettings(), progress=False)
    try:
        assert image.indexes[0].unpacked  # type: ignore[attr-defined]
    finally:
        image.close()  # type: ignore[attr-defined]


# -- a cached index that is whole but wrong is built again ---------------------------------------------


def test_a_cached_index_with_a_valid_checksum_but_hostile_values_is_refused(tmp_path: Path) -> None:
    built = mount_archive(LocalFile(str(archive(tmp_path / "a.tar", entry("f", data=b"x")))), CacheSettings(),
                          progress=False)
    (index,) = built.indexes  # type: ignore[attr-defined]
    built.close()  # type: ignore[attr-defined]
    for tree_bytes in (b'[[16877,0,0,0,0,0,0,"",[0,0],{},[["f",1]],1],[33188,4294967296,0,0,0,1,0,"",[0,0],{},[],0]]',
                       b'[[16877,0,0,0,0,0,0,"",[0,0],{},[["d",1]],1],[16877,0,0,0,0,0,0,"",[0,0],{},[["e",1]],0]]',
                       b'[[16877,0,0,0,0,0,0,"",[0,0],{},[["f",1]],1],[-1,0,0,0,0,0,0,"",[0,0],{},[],0]]',
                       b'[[16877,0,0,0,0,0,0,"",[0,0],{},[["f",1]],1],[33188,0,0,1e400,0,0,0,"",[0,0],{},[],0]]'):
        hostile = ArchiveIndex(index.compression, index.archive_sha256, index.archive_size, index.stream_size,
                               index.stream_sha256, index.spans, None, tree_bytes)
        with pytest.raises(ValueError):
            ArchiveIndex.from_bytes(hostile.to_bytes())
    data = index.to_bytes()
    with pytest.raises(ValueError):  # a section's length past the end, with the checksum made to match
        ArchiveIndex.from_bytes(_resealed(data, data[60:] + b"\x04meta" + (1 << 40).to_bytes(8, "little")))


def test_a_cached_toc_index_with_a_valid_checksum_but_hostile_chunks_is_refused() -> None:
    """What a TOC gave, kept in the cache, is checked as a TOC read checks it: a resealed file cannot make a
    daemon inflate a chunk past ``MAX_CHUNK``, fetch an unbounded blob range, or serve a stream with holes."""
    from erofs_mount_tar import toc_cache
    from erofs_mount_tar.chunked_files import MAX_CHUNK, Chunk
    from erofs_mount_tar.toc import TocIndex

    digest, checksum = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    good = [Chunk(0, 100, 0, 80, b"\x01" * 32), Chunk(100, 50, 80, 80, b"\x02" * 32, zeros=True)]
    toc_cache.store_toc(digest, checksum, TocIndex(b"[]", tuple(good), 150, 3))
    assert toc_cache.cached_toc(digest, checksum) == TocIndex(b"[]", tuple(good), 150, 3)
    for chunks, size in (([Chunk(0, MAX_CHUNK + 1, 0, 10, b"\x01" * 32)], MAX_CHUNK + 1),  # inflated too far
                         ([Chunk(0, 100, 0, 1 << 40, b"\x01" * 32)], 100),  # a blob range of a TiB
                         ([Chunk(0, 100, 90, 80, b"\x01" * 32)], 100),  # a range that ends before it starts
                         ([Chunk(0, 100, 0, 80, b"\x01" * 32), Chunk(200, 50, 80, 90, b"\x02" * 32)], 250),  # a hole
                         ([Chunk(0, 0, 0, 0, b"\x01" * 32, zeros=True)], 0),  # a chunk of nothing
                         ([Chunk(0, 100, 0, 80, b"\x01" * 32, inner_offset=MAX_CHUNK)], 100),
                         (good, 151)):  # a stream longer than its chunks
        toc_cache.store_toc(digest, checksum, TocIndex(b"[]", tuple(chunks), size, 3))
        assert toc_cache.cached_toc(digest, checksum) is None, chunks
    hostile_tree = b'[[16877,0,0,0,0,0,0,"",[0,0],{},[["d",1]],1],[16877,0,0,0,0,0,0,"",[0,0],{},[["e",1]],0]]'
    toc_cache.store_toc(digest, checksum, TocIndex(hostile_tree, tuple(good), 150, 3))
    kept = toc_cache.cached_toc(digest, checksum)
    assert kept is not None  # its tree is checked when first read, as an archive index's is
    with pytest.raises(SourceError, match="a TOC's kept index holds a tree this version refuses"):
        kept.read_tree()


def _resealed(data: bytes, payload: bytes) -> bytes:
    import hashlib
    import struct

    magic, version, _, _ = struct.unpack_from("<16sIQ32s", data)
    return struct.pack("<16sIQ32s", magic, version, len(payload), hashlib.sha256(payload).digest()) + payload


def test_an_image_too_large_for_erofs_is_one_line() -> None:
    from erofs_mount_core import ImageNode, SourceError

    root = ImageNode(mode=stat.S_IFDIR | 0o755, children={b"f": ImageNode(mode=stat.S_IFREG | 0o644, size=1 << 45)})
    with pytest.raises(SourceError, match="more blocks than EROFS"):
        ImageLayout.of(root)


def test_the_memory_probe_sees_a_child_s_memory() -> None:
    """The bound above is only worth its figure if the probe measures: 200 MiB held shows as 200 MiB."""
    peak, _ = _peak_mib(sys.executable, "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])")
    assert peak >= 200
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
