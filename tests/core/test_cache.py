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


@pytest.mark.timeout(30)
def test_a_fifo_in_a_cache_file_s_place_opens_as_no_file(root: Path) -> None:
    directory = cache_directory("things")
    os.mkfifo(directory / "index.idx")
    assert open_cache_file(directory / "index.idx") is None  # at once: no writer is waited for
    assert entries() == [] and prune(0) == []


def test_list_and_prune_check_the_cache_root_as_a_mount_does(root: Path, tmp_path: Path) -> None:
    """A root that is a link (to anywhere) or another user's is refused, as cache_directory refuses it:
    ``cache prune --max-size 0`` once deleted every file under such a link's target."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "precious").write_bytes(b"x" * 10000)
    os.chown(elsewhere, 65534, 65534)
    root.symlink_to(elsewhere)
    for call in (entries, lambda: prune(0)):
        with pytest.raises(SourceError, match="not a directory of ours"):
            call()
    root.unlink()
    elsewhere.rename(root)
    with pytest.raises(SourceError, match="not a directory of ours"):
        prune(0)
    assert (root / "sub" / "precious").exists()


@pytest.mark.parametrize("where", ["/proc/no-such/cache", "a-file"])
def test_a_cache_root_that_cannot_be_one_is_one_error(where: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "a-file":
        where = str(tmp_path / "a-file")
        Path(where).write_text("x")
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", where)
    with pytest.raises(SourceError, match=f"cache directory {where}"):
        cache_directory("things")
