"""The cache directory: what sources keep between mounts (indexes, span hashes, unpacked streams).

One root-only directory, ``/var/cache/erofs-mount`` unless
``EROFS_MOUNT_CACHE_DIR`` names another; each source type keeps its files
in a subdirectory of it. Files are written whole under a temporary name and
renamed, so a reader sees an old file or a new one, never half of one. A
daemon that serves from a cache file holds a shared lock on it for as long
as it does: ``prune`` leaves locked files alone and ``list`` says they are
in use. Everything else may be deleted at any time; whoever needs it again
builds it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs

from ._errors import NotRootError, SourceError

CACHE_DIR_ENV = "EROFS_MOUNT_CACHE_DIR"
DEFAULT_CACHE_DIR = "/var/cache/erofs-mount"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def cache_directory(name: str) -> Path:
    """The subdirectory ``name`` of the cache, made root-only; refused if another user owns it or it is a link."""
    root = cache_root()
    for path in (root, root / name):
        try:
            with contextlib.suppress(FileExistsError):
                path.mkdir(mode=0o700)
            _check_ours(path)
        except OSError as exc:
            raise SourceError(f"cache directory {path}: {exc.strerror} ({CACHE_DIR_ENV} names another)") from None
    return root / name


def _check_ours(path: Path) -> None:
    """``path`` is a directory of ours, not a link, and root-only (made so if it was not)."""
    st = path.lstat()
    if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 != os.geteuid():
        raise NotRootError(f"using the cache {path}")  # (a user names a cache of their own with CACHE_DIR_ENV)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SourceError(f"cache directory {path} is not a directory of ours: refusing it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


#: what large cache writes (an unpacked stream, a download) leave free on the cache's filesystem, at most
RESERVE = 1 << 30


def cache_room(directory: Path) -> int:
    """How many bytes a large write may add under ``directory``: its filesystem's free space less a
    reserve of 1 GiB, or of a twentieth of the filesystem when that is smaller (a small tmpfs)."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize - min(RESERVE, st.f_blocks * st.f_frsize // 20)


def write_cache_file(path: Path, data: bytes | memoryview) -> None:
    """``path`` now holds ``data``, whole: written aside, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # each writer its own
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_cache_file(path: Path, *, hold: bool = False) -> int | None:
    """A descriptor of ``path`` (not followed if a link), or None if it is not there.

    ``hold``: also take a shared lock, which lasts until the descriptor is
    closed, so that ``prune`` leaves the file alone while it is in use.
    """
    try:  # (O_NONBLOCK: a FIFO put in its place opens at once, and is then refused)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    if hold:
        fcntl.flock(fd, fcntl.LOCK_SH)
    with contextlib.suppress(OSError):
        os.utime(fd)  # recently used: pruned last
    return fd


@attrs.frozen
class CacheEntry:
    path: Path
    size: int
    """Bytes on disk (a sparse file counts what it holds)."""
    used: float
    """When it was last written or opened for use (seconds since the epoch)."""
    in_use: bool


def entries() -> list[CacheEntry]:
    """Every cache file, least recently used first."""
    root = cache_root()
    found: list[CacheEntry] = []
    try:
        _check_ours(root)  # as every mount checks it: a link (to anywhere) is never walked, nor pruned
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise SourceError(f"cache directory {root}: {exc.strerror}") from None
    for directory, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith("."):  # a lock, or a file being written
                continue
            path = Path(directory, name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(CacheEntry(path, st.st_blocks * 512, max(st.st_mtime, st.st_atime), _locked(path)))
    return sorted(found, key=lambda e: (e.used, str(e.path)))


def prune(max_bytes: int = 0) -> list[CacheEntry]:
    """Delete the least recently used files not in use until the cache holds at most ``max_bytes``."""
    found = entries()
    total = sum(e.size for e in found)
    removed = []
    for entry in found:
        if total <= max_bytes:
            break
        if not _remove_unless_locked(entry.path):  # held by a daemon (now, not only when listed)
            continue
        total -= entry.size
        removed.append(entry)
    return removed


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool | None]:
    """Yields None if ``path`` is not there, False if a daemon holds it, True if it is ours
    (exclusively locked) until the block ends."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _locked(path: Path) -> bool:
    with _exclusive(path) as ours:
        return ours is False


def _remove_unless_locked(path: Path) -> bool:
    """Remove ``path`` while holding its lock, so no daemon takes it in between."""
    with _exclusive(path) as ours:
        if ours:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                return True
    return False
