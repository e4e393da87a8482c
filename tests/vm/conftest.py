"""Fixtures for the kernel tests (they run as root inside the test VM)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.imagetree import make_tree, mkfs


@pytest.fixture(scope="session")
def nbd_driver() -> None:
    subprocess.run(["modprobe", "nbd", "nbds_max=16", "max_part=0"], check=True)


@pytest.fixture(scope="session")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A small EROFS image and the sha256 of each of its files."""
    base = tmp_path_factory.mktemp("sample")
    sums = make_tree(base / "tree", files=40, max_size=1 << 20)
    return mkfs(base / "sample.erofs", base / "tree"), sums
