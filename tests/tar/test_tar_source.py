"""tar:PATH: archives by Python's tarfile (GNU, PAX, ustar) and by GNU tar, plain, gzip and zstd, mounted on the host.

Each image is copied out of ``erofs-mount serve`` by nbdcopy, checked by
fsck.erofs, mounted by the kernel (loop) and compared entry by entry with
what ``tar -x --xattrs --numeric-owner`` extracts from the same archive.
"""

from __future__ import annotations

import io
import os
import random
import re
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_mount_local import LocalFile
from erofs_mount_tar.archive_source import mount_archive

from erofs_mount_core import CacheSettings
from erofs_mount_core.testing import SourceCase, check_source
from tests.imagetree import assert_same_tree

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))

LONG = "long-" + "n" * 120  # past ustar's 100-character name field


def make_tree(root: Path) -> None:
    rng = random.Random(3)
    root.mkdir()
    for size in (0, 1, 511, 512, 513, 4096, 70_000):
        (root / f"file-{size}").write_bytes(rng.randbytes(size))
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "leaf").write_text("leaf\n")
    (root / "dir" / LONG).write_bytes(rng.randbytes(3000))
    os.symlink("file-1", root / "link")
    os.symlink("/" + "t" * 300, root / "long link")
    os.link(root / "file-513", root / "hardlink")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "disk", 0o660 | stat.S_IFBLK, os.makedev(8, 17))
    os.mkfifo(root / "fifo")
    os.chmod(root / "file-1", 0o4755)
    os.chmod(root / "dir" / "sub", 0o3777)
    os.chown(root / "file-512", 3_000_000, 7)  # past ustar's 8-digit octal: GNU base-256, PAX text
    os.utime(root / "file-0", ns=(0, 1_600_000_000_987_654_321))
    os.setxattr(root / "file-4096", "user.mime", b"application/octet-stream")
    os.setxattr(root / "dir", "trusted.overlay.opaque", b"y")


def open_archive(path: str) -> object:
    return mount_archive(LocalFile(path), CacheSettings(), progress=False)


def tarfile_archive(tree: Path, path: Path, fmt: int) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for entry in sorted(tree.rglob("*")):
            info = tar.gettarinfo(entry, arcname=str(entry.relative_to(tree)))
            if fmt == tarfile.USTAR_FORMAT and (len(info.name) > 100 or len(info.linkname) > 100
                                                or info.uid > 0o7777777):
                continue  # what ustar cannot hold: left out (GNU tar's extraction then lacks it too)
            if fmt == tarfile.PAX_FORMAT:
                for name in os.listxattr(entry, follow_symlinks=False):
                    value = os.getxattr(entry, name, follow_symlinks=False)
                    info.pax_headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
                ns = entry.lstat().st_mtime_ns
                info.pax_headers["mtime"] = f"{ns // 10**9}.{ns % 10**9:09d}"
            if info.isreg():
                with open(entry, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return path


ARCHIVES = {
    "tarfile-gnu": lambda tree, p: tarfile_archive(tree, p, tarfile.GNU_FORMAT),
    "tarfile-pax": lambda tree, p: tarfile_archive(tree, p, tarfile.PAX_FORMAT),
    "tarfile-ustar": lambda tree, p: tarfile_archive(tree, p, tarfile.USTAR_FORMAT),
    "gnu-tar-posix": lambda tree, p: subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--format=posix", "--numeric-owner", "-C", str(tree), "-cf", str(p),
         "."], check=True) and p,
    "gnu-tar-gnu": lambda tree, p: subprocess.run(
        ["tar", "--format=gnu", "--numeric-owner", "-C", str(tree), "-cf", str(p), "."], check=True) and p,
}


def _pieces(data: bytes, n: int = 3) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i:i + step] for i in range(0, len(data), step)]


def _compressed(command: list[str], data: bytes) -> bytes:
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


#: how an archive is compressed: gzip and zstd as their tools write them, and in several members
#: or frames (as pigz --independent, eStargz and zstd:chunked write them)
COMPRESSIONS = {
    "plain": lambda data: data,
    "gzip": lambda data: _compressed(["gzip", "-c"], data),
    "gzip-members": lambda data: b"".join(_compressed(["gzip", "-c"], p) for p in _pieces(data)),
    "zstd": lambda data: _compressed(["zstd", "-q", "-c"], data),
    "zstd-frames": lambda data: b"".join(_compressed(["zstd", "-q", "-c"], p) for p in _pieces(data)),
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's indexes in a cache of its own (the daemons and serve it starts inherit it)."""
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tartree")
    make_tree(base / "tree")
    return base / "tree"


def materialize(archive: Path, into: Path) -> Path:
    """The image, as an NBD client reads it from ``erofs-mount serve``."""
    result = subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"tar:{archive}", "--run",
                             f'nbdcopy "$uri" {into}'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return into


def compress(archive: Path, how: str) -> Path:
    if how != "plain":
        archive.write_bytes(COMPRESSIONS[how](archive.read_bytes()))
    return archive


@pytest.fixture
def mounted(request: pytest.FixtureRequest, tree: Path, tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """(the archive's extraction by GNU tar, the image's mount, the archive's kind and compression)"""
    kind, how = request.param
    archive = tmp_path / f"{kind}.tar"
    ARCHIVES[kind](tree, archive)
    compress(archive, how)
    kind = f"{kind}+{how}"
    image = materialize(archive, tmp_path / "image.erofs")
    fsck = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    extracted, mnt = tmp_path / "extracted", tmp_path / "mnt"
    extracted.mkdir()
    mnt.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-C", str(extracted), "-xf",
                    str(archive)], check=True)
    subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(mnt)], check=True)
    try:
        yield extracted, mnt, kind
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("mounted", [(kind, how) for kind in sorted(ARCHIVES) for how in COMPRESSIONS],
                         indirect=True, ids=lambda p: "+".join(p))
def test_the_image_equals_the_extraction(mounted: tuple[Path, Path, str]) -> None:
    extracted, mnt, kind = mounted
    checked = assert_same_tree(extracted, mnt)
    assert checked >= 14
    assert (mnt / "hardlink").stat().st_ino == (mnt / "file-513").stat().st_ino
    if "ustar" not in kind:
        assert (mnt / "dir" / LONG).stat().st_size == 3000
    if kind.startswith(("tarfile-pax", "gnu-tar-posix")):
        assert (mnt / "file-0").lstat().st_mtime_ns == 1_600_000_000_987_654_321
        assert os.getxattr(mnt / "file-4096", "user.mime") == b"application/octet-stream"


def layer_with_whiteouts(path: Path) -> Path:
    def add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mode = kind, len(data), 0o755 if kind == tarfile.DIRTYPE else 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "etc", tarfile.DIRTYPE)
        add(tar, "etc/.wh.gone")                       # deletes etc/gone of the layers below
        add(tar, "etc/new", data=b"new\n")
        add(tar, "var/cache/.wh..wh..opq")             # hides everything var/cache had below
        add(tar, "var/cache/fresh", data=b"fresh\n")
    return path


def test_whiteouts_and_opaque_directories_work_under_overlayfs(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "gone").write_text("old\n")
    (lower / "etc" / "kept").write_text("kept\n")
    (lower / "var" / "cache").mkdir(parents=True)
    (lower / "var" / "cache" / "stale").write_text("stale\n")
    image = materialize(layer_with_whiteouts(tmp_path / "layer.tar"), tmp_path / "layer.erofs")
    layer, merged = tmp_path / "layer", tmp_path / "merged"
    layer.mkdir()
    merged.mkdir()
    subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(layer)], check=True)
    try:
        gone = (layer / "etc" / "gone").lstat()
        assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
        assert os.getxattr(layer / "var" / "cache", "trusted.overlay.opaque") == b"y"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={layer}:{lower}", str(merged)],
                       check=True)
        try:
            assert sorted(os.listdir(merged / "etc")) == ["kept", "new"]
            assert sorted(os.listdir(merged / "var" / "cache")) == ["fresh"]
            assert (merged / "etc" / "kept").read_text() == "kept\n"
        finally:
            subprocess.run(["umount", str(merged)], check=True)
    finally:
        subprocess.run(["umount", str(layer)], check=True)


def _archive(path: Path, *entries: tuple[str, bytes, str]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, link in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            tar.addfile(info, io.BytesIO(b""))
    return path


def _whole(tree: Path, path: Path, how: str = "plain") -> bytes:
    return compress(tarfile_archive(tree, path, tarfile.PAX_FORMAT), how).read_bytes()


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


#: name -> (how to make the bad archive from the test tree, what the one line says)
BAD_ARCHIVES = {
    "dotdot-entry": (lambda tree, p: _archive(p, ("ok", tarfile.REGTYPE, ""), ("../escape", tarfile.REGTYPE, "")),
                     r"entry '\.\./escape' would land outside the root"),
    "dotdot-inside": (lambda tree, p: _archive(p, ("a/../../b", tarfile.REGTYPE, "")), "would land outside the root"),
    "hardlink-to-nothing": (lambda tree, p: _archive(p, ("link", tarfile.LNKTYPE, "missing")),
                            "'link' is a hardlink to 'missing', which the archive does not hold before it"),
    "not-a-tar": (lambda tree, p: p.write_bytes(random.Random(1).randbytes(4096)), "is not a tar archive"),
    "truncated-tar": (lambda tree, p: p.write_bytes(_whole(tree, p)[:20_000]), "truncated"),
    "truncated-gzip": (lambda tree, p: p.write_bytes(_whole(tree, p, "gzip")[:-3000]), "truncated"),
    "gzip-without-trailer": (lambda tree, p: p.write_bytes(_whole(tree, p, "gzip")[:-8]), "gzip data is truncated"),
    "gzip-bad-crc": (lambda tree, p: p.write_bytes(_flip(_whole(tree, p, "gzip"), -6)), "its CRC does not match"),
    "truncated-zstd": (lambda tree, p: p.write_bytes(_whole(tree, p, "zstd")[:-3000]), "zstd data is truncated"),
    "zstd-bad-checksum": (lambda tree, p: p.write_bytes(_flip(_whole(tree, p, "zstd"), -2)), "zstd data is damaged"),
    "zstd-damaged": (lambda tree, p: p.write_bytes(_flip(_whole(tree, p, "zstd"), 200)), "zstd data is damaged"),
    "xz": (lambda tree, p: p.write_bytes(_compressed(["xz", "-c"], _whole(tree, p))), "is xz-compressed"),
}


@pytest.mark.parametrize("bad", sorted(BAD_ARCHIVES))
def test_a_bad_archive_is_one_clear_line_and_leaves_nothing(bad: str, tree: Path, tmp_path: Path,
                                                            cache_dir: Path) -> None:
    make, message = BAD_ARCHIVES[bad]
    archive = tmp_path / "bad.tar"
    make(tree, archive)
    result = subprocess.run([EROFS_MOUNT, "serve", "--source", f"tar:{archive}", "--run", "true"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr) and "Traceback" not in result.stderr, result.stderr
    assert str(archive) in result.stderr
    assert [p for p in cache_dir.rglob("*") if not p.is_dir()] == [], "a failed index left files in the cache"


@pytest.mark.parametrize("how", ["plain", "gzip", "zstd-frames"])
def test_the_tar_source_keeps_the_contract(how: str, tree: Path, tmp_path: Path) -> None:
    archive = compress(tarfile_archive(tree, tmp_path / "contract.tar", tarfile.PAX_FORMAT), how)
    expected = materialize(archive, tmp_path / "expected.erofs").read_bytes()

    def rewrite() -> None:
        archive.write_bytes(archive.read_bytes())  # same bytes, rewritten: the identity changes

    check_source(SourceCase(scheme="tar", location=str(archive), expected=expected, change=rewrite,
                            missing_location=str(tmp_path / "missing.tar")))
