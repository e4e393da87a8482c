"""A synthesized EROFS image passes fsck.erofs and mounts (host kernel, loop device) byte-exact.

The tree is read from a real directory with every kind of entry; the files'
bytes sit unaligned in one backing stream, with junk between them, as
members of a tar archive do. The image is read through ``SynthesizedImage``
into a file, checked by Debian's fsck.erofs and mounted by the kernel.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from erofs_mount_core import Source
from erofs_mount_core._erofs.build import BS, ImageNode, build
from erofs_mount_core._erofs.synthesized import SynthesizedImage

# security.capability: cap_net_bind_service, effective (struct vfs_cap_data, revision 2)
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)
XATTRS = {b"user.mime": b"text/plain", b"trusted.overlay.opaque": b"y", b"security.capability": CAPABILITY,
          b"user.empty": b""}
LONG_NAME = b"user." + b"a" * 200


class FileSource(Source):
    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")
        self._size = path.stat().st_size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.f.fileno(), length, offset)

    def close(self) -> None:
        self.f.close()


def make_tree(root: Path) -> None:
    rng = random.Random(7)
    root.mkdir()
    for size in (0, 1, 511, 4095, 4096, 4097, 8192, 100_000, 1 << 20):
        (root / f"size-{size}").write_bytes(rng.randbytes(size))
    many = root / "many entries"
    many.mkdir()
    for i in range(400):  # a directory of several blocks
        (many / f"{i:04d}-{'n' * (i % 50)}-ünï").write_bytes(rng.randbytes(i * 13))
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("leaf\n")
    os.symlink("size-1", root / "short link")
    os.symlink("/" + "x" * 3000, root / "long link")  # too long to sit inline beside its inode
    os.link(root / "size-4097", root / "hardlink to size-4097")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop7", 0o660 | stat.S_IFBLK, os.makedev(7, 300))
    os.mkfifo(root / "fifo")
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    os.chmod(deep, 0o3775)  # setgid + sticky
    os.chown(root / "size-1", 1234, 5678)
    os.utime(root / "size-511", ns=(1, 1_700_000_000_123_456_789))


def tree_from(root: Path, stream: Path) -> ImageNode:
    """Nodes for the directory, each file's bytes appended to ``stream`` after some junk."""
    nodes: dict[tuple[int, int], ImageNode] = {}
    with open(stream, "wb") as out:
        out.write(b"junk" * 3)

        def node_of(path: Path) -> ImageNode:
            st = path.lstat()
            key = (st.st_dev, st.st_ino)
            if key in nodes:
                return nodes[key]
            node = ImageNode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=st.st_mtime_ns // 10**9,
                        mtime_nsec=st.st_mtime_ns % 10**9)
            if stat.S_ISREG(st.st_mode):
                out.write(b"h" * 513)  # a tar header's worth of other bytes
                node.data_offset, node.size = out.tell(), st.st_size
                out.write(path.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                node.target = os.fsencode(os.readlink(path))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                node.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif stat.S_ISDIR(st.st_mode):
                node.children = {os.fsencode(c.name): node_of(c) for c in sorted(path.iterdir())}
            nodes[key] = node
            return node

        top = node_of(root)
    top.xattrs = dict(XATTRS)
    top.children[b"size-4096"].xattrs = {LONG_NAME: b"v" * 3000}  # a long name and a large value
    return top


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the source tree, the image file, the stream)"""
    base = tmp_path_factory.mktemp("synth")
    make_tree(base / "tree")
    stream = base / "stream"
    image = SynthesizedImage(tree_from(base / "tree", stream), FileSource(stream))
    try:
        assert image.size % BS == 0
        data = b"".join(image.pread(min(1 << 20, image.size - o), o) for o in range(0, image.size, 1 << 20))
    finally:
        image.close()
    (base / "image.erofs").write_bytes(data)
    return base / "tree", base / "image.erofs", stream


def test_fsck_erofs_accepts_it(synthesized: tuple[Path, Path, Path]) -> None:
    result = subprocess.run(["fsck.erofs", str(synthesized[1])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kernel_mounts_it_and_every_entry_matches(synthesized: tuple[Path, Path, Path], tmp_path: Path) -> None:
    tree, image, _stream = synthesized
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(mnt)], check=True)
    try:
        seen = 0
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in dirnames + filenames:
                seen += 1
                src = Path(dirpath) / name
                got = mnt / src.relative_to(tree)
                a, b = src.lstat(), got.lstat()
                assert (b.st_mode, b.st_uid, b.st_gid, b.st_size, b.st_rdev, b.st_nlink) == \
                       (a.st_mode, a.st_uid, a.st_gid, a.st_size if not stat.S_ISDIR(a.st_mode) else b.st_size,
                        a.st_rdev, a.st_nlink), src
                assert b.st_mtime_ns == a.st_mtime_ns, src
                if stat.S_ISREG(a.st_mode):
                    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
                elif stat.S_ISLNK(a.st_mode):
                    assert os.readlink(got) == os.readlink(src)
                elif stat.S_ISDIR(a.st_mode):
                    assert sorted(os.listdir(got)) == sorted(os.listdir(src))
        assert seen > 420
        assert (mnt / "hardlink to size-4097").stat().st_ino == (mnt / "size-4097").stat().st_ino
        for name, value in XATTRS.items():
            assert os.getxattr(mnt, name.decode()) == value
        assert os.getxattr(mnt / "size-4096", LONG_NAME) == b"v" * 3000
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_what_cannot_be_an_image_is_refused() -> None:
    from erofs_mount_core._erofs import format as fmt

    with pytest.raises(ValueError, match="must be a directory"):
        build(ImageNode(mode=stat.S_IFREG | 0o644))
    with pytest.raises(ValueError, match="cannot be a name"):
        build(ImageNode(mode=stat.S_IFDIR | 0o755, children={b"a/b": ImageNode(mode=stat.S_IFREG | 0o644)}))
    loop = ImageNode(mode=stat.S_IFDIR | 0o755)
    loop.children[b"again"] = loop
    with pytest.raises(ValueError, match="linked twice"):
        build(ImageNode(mode=stat.S_IFDIR | 0o755, children={b"d": loop}))
    with pytest.raises(ValueError, match="in no namespace EROFS stores"):
        fmt.xattr_name(b"system.other")
    assert fmt.xattr_name(b"system.posix_acl_access") == (2, b"")
    assert fmt.encode_dev(7, 300) == os.makedev(7, 300) & 0xFFFFFFFF
