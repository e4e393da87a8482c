"""The cache directory: root-only, never through a link, locked files kept by prune."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from erofs_mount_core import SourceError, cache_directory, open_cache_file, write_cache_file
from erofs_mount_core._cache import entries, prune


@pytest.fixture(autouse=True)
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_cache_is_made_root_only(root: Path) -> None:
    directory = cache_directory("things")
    assert directory == root / "things"
    for path in (root, directory):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_a_linked_or_foreign_cache_directory_is_refused(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / "things").symlink_to(elsewhere)
    with pytest.raises(SourceError, match="not a directory of ours"):
        cache_directory("things")
    (root / "things").unlink()
    (root / "things").mkdir()
    os.chown(root / "things", 65534, 65534)
    with pytest.raises(SourceError, match="not a directory of ours"):
        cache_directory("things")


def test_cache_files_are_written_whole_and_never_read_through_a_link(root: Path, tmp_path: Path) -> None:
    directory = cache_directory("things")
    write_cache_file(directory / "a", b"first")
    write_cache_file(directory / "a", b"second")
    assert (directory / "a").read_bytes() == b"second"
    assert [p.name for p in directory.iterdir()] == ["a"]
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the cache")
    (directory / "b").symlink_to(secret)
    assert open_cache_file(directory / "b") is None


def test_prune_keeps_what_a_daemon_holds(root: Path) -> None:
    directory = cache_directory("things")
    for name in ("held", "free"):
        write_cache_file(directory / name, bytes(8192))
    fd = open_cache_file(directory / "held", hold=True)
    try:
        assert {e.path.name: e.in_use for e in entries()} == {"held": True, "free": False}
        removed = prune()
        assert [e.path.name for e in removed] == ["free"]
        assert (directory / "held").exists()
        with pytest.raises(BlockingIOError):
            probe = os.open(directory / "held", os.O_RDONLY)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)
    finally:
        os.close(fd)
    assert [e.path.name for e in prune()] == ["held"]
