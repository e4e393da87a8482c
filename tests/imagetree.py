"""Test images: a directory tree with awkward names and sizes, made into EROFS."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
from pathlib import Path

NAMES = ["plain", "with space", "ünïcödé", "日本語", "quote'and\"dq", "tab\tname", "dash-_.x"]


def make_tree(root: Path, files: int = 300, seed: int = 1, max_size: int = 8 << 20) -> dict[str, str]:
    """Write ``files`` files (0 B .. max_size) under ``root``; return {relpath: sha256}."""
    rng = random.Random(seed)
    sizes = [0, 1, 511, 512, 4095, 4096, 4097, 65536, 1 << 20, max_size]
    sums = {}
    for i in range(files):
        sub = root / f"dir {i % 7}" / NAMES[i % len(NAMES)]
        sub.mkdir(parents=True, exist_ok=True)
        size = sizes[i] if i < len(sizes) else rng.choice([rng.randrange(0, 70000), rng.randrange(0, 600000)])
        name = f"{NAMES[(i * 3) % len(NAMES)]} {i}.bin"
        data = rng.randbytes(size)
        (sub / name).write_bytes(data)
        sums[str((sub / name).relative_to(root))] = hashlib.sha256(data).hexdigest()
    return sums


def mkfs(image: Path, tree: Path, *extra: str) -> Path:
    subprocess.run(["mkfs.erofs", "--quiet", *extra, str(image), str(tree)], check=True)
    return image


def tree_sums(root: Path) -> dict[str, str]:
    sums = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            sums[str(p.relative_to(root))] = file_sha256(p)
    return sums


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def xattrs_of(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}


def assert_same_tree(want_root: Path, got_root: Path, *, links: bool = True) -> int:
    """Entry by entry: type, mode, owner, mtime, content, link target, device, xattrs; with ``links``,
    link counts and which names are one inode."""
    checked, inodes = 0, {}
    for dirpath, dirnames, filenames in os.walk(want_root):
        for name in sorted(dirnames + filenames):
            want = Path(dirpath) / name
            got = got_root / want.relative_to(want_root)
            a, b = want.lstat(), got.lstat()
            where = str(want.relative_to(want_root))
            assert (stat.S_IFMT(b.st_mode), stat.S_IMODE(b.st_mode), b.st_uid, b.st_gid, b.st_rdev) == \
                   (stat.S_IFMT(a.st_mode), stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid, a.st_rdev), where
            if not stat.S_ISLNK(a.st_mode):
                assert b.st_mtime_ns == a.st_mtime_ns, where
            if stat.S_ISREG(a.st_mode):
                assert b.st_size == a.st_size, where
                assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(want.read_bytes()).digest(), where
                if links:
                    assert b.st_nlink == a.st_nlink, where
                    inodes.setdefault(a.st_ino, set()).add(b.st_ino)
            elif stat.S_ISLNK(a.st_mode):
                assert os.readlink(got) == os.readlink(want), where
            elif stat.S_ISDIR(a.st_mode):
                assert sorted(os.listdir(got)) == sorted(os.listdir(want)), where
            assert xattrs_of(got) == xattrs_of(want), where
            checked += 1
    if links:  # names of one inode in the flattening are one inode in the image, and no others share it
        assert all(len(v) == 1 for v in inodes.values()), inodes
        assert len({next(iter(v)) for v in inodes.values()}) == len(inodes)
    return checked
