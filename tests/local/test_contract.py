"""The local plugin keeps the source contract (erofs_mount_core.testing)."""

from __future__ import annotations

import os
from pathlib import Path

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
