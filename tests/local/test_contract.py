"""The local plugin keeps the source contract (erofs_mount_core.testing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from erofs_mount_core import SourceChangedError, SourceError
from erofs_mount_core.testing import SourceCase, check_source
from tests.imagetree import make_tree, mkfs


def test_local_source_contract(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", files=20, max_size=300000)
    image = mkfs(tmp_path / "image.erofs", tmp_path / "tree")

    def replace() -> None:
        other = tmp_path / "other.erofs"
        other.write_bytes(image.read_bytes())   # same bytes, another file: still refused
        os.replace(other, image)

    check_source(SourceCase(scheme="local", location=str(image), expected=image.read_bytes(),
                            change=replace, missing_location=str(tmp_path / "missing.erofs")))


def test_a_rewritten_file_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "image.erofs"
    image.write_bytes(os.urandom(1 << 20))
    check_source(SourceCase(scheme="local", location=str(image), expected=image.read_bytes(),
                            change=lambda: image.write_bytes(os.urandom(1 << 20))))


def test_a_rewrite_with_its_modification_time_set_back_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "image.erofs"
    image.write_bytes(os.urandom(1 << 20))
    before = image.stat()

    def rewrite_in_place_and_hide_it() -> None:
        with open(image, "r+b") as f:
            f.write(os.urandom(4096))
        os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))

    check_source(SourceCase(scheme="local", location=str(image), expected=image.read_bytes(),
                            change=rewrite_in_place_and_hide_it))


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    from erofs_mount_local import LocalFile

    fifo = tmp_path / "image.erofs"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="not a regular file or block device"):
        LocalFile(str(fifo))


def test_a_record_without_ctime_is_still_checked(tmp_path: Path) -> None:
    from erofs_mount_local import LocalFile, erofs_mount_deserialize_source

    image = tmp_path / "image.erofs"
    image.write_bytes(os.urandom(8192))
    source = LocalFile(str(image))
    old_record = {k: v for k, v in source.state().items() if k != "ctime_ns"}
    source.close()
    erofs_mount_deserialize_source(old_record).close()
    image.unlink()
    image.write_bytes(os.urandom(8192))
    with pytest.raises(SourceChangedError):
        erofs_mount_deserialize_source(old_record)
