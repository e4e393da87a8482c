"""erofs-mount source ``local:PATH``: an EROFS image in a local file.

Reattach reopens the recorded path and refuses unless it is still the same
file (device, inode, size, modification and change time), so a replaced or
rewritten image is never served under a filesystem mounted from the old one.
The change time catches a rewrite whose modification time was set back.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Mapping
from typing import Any

from erofs_mount_core import Source, SourceChangedError, SourceError, hookimpl

__all__ = ["LocalFile", "reopen"]  # for other plugins that read local files (tar)

SCHEME = "local"
_IDENTITY = ("device", "inode", "size", "mtime_ns", "ctime_ns")


class LocalFile(Source):
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:  # non-blocking: opening a FIFO must not wait for a writer
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SourceError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise SourceError(f"{path}: is a directory, not an image file") from None
        except OSError as exc:
            raise SourceError(f"{path}: cannot open: {exc.strerror}") from None
        st = os.fstat(self._fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self._fd)
            raise SourceError(f"{path}: not a regular file or block device")
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        self._size = st.st_size if stat.S_ISREG(st.st_mode) else _blockdev_size(self._fd)
        self.identity = {"device": st.st_dev, "inode": st.st_ino, "size": self._size,
                         "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}

    @property
    def size(self) -> int:
        return self._size

    def fileno(self) -> int:
        return self._fd

    def pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self.path}: read failed: {exc.strerror}", transient=True) from exc
        if len(data) != length:
            raise SourceError(f"{self.path}: read of {length} bytes at {offset} is past the end "
                              f"({self._size} bytes)" if offset + length > self._size
                              else f"{self.path}: the file shrank under a read at {offset}")
        return data

    def describe(self) -> str:
        return self.path

    def state(self) -> dict[str, Any]:
        return {"path": self.path, **self.identity}

    def close(self) -> None:
        os.close(self._fd)


def _blockdev_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


@hookimpl
def erofs_mount_schemes() -> dict[str, str]:
    return {SCHEME: "EROFS image in a local file: local:PATH"}


@hookimpl
def erofs_mount_source_options() -> list[str]:
    return []


@hookimpl
def erofs_mount_open_source(location: str, options: Mapping[str, str]) -> Source:
    return LocalFile(location)  # (it declares no option: the host refuses any)


@hookimpl
def erofs_mount_deserialize_source(state: Mapping[str, Any]) -> Source:
    return reopen(state)


def reopen(state: Mapping[str, Any], what: str = "image") -> LocalFile:
    """The file a record names, if it is still the same one (``what`` it held names it in the refusal).

    Other sources whose bytes are a local file (``tar:``) reopen theirs with it too.
    """
    try:
        path = str(state["path"])
        # records written before ctime was kept lack it: their other fields are still checked
        recorded = {k: int(state[k]) for k in _IDENTITY if k in state or k != "ctime_ns"}
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"the {what}'s record state is incomplete ({exc})") from exc
    source = LocalFile(path)
    changed = [k for k in recorded if source.identity[k] != recorded[k]]
    if changed:
        source.close()
        raise SourceChangedError(
            f"{path} is no longer the {what} that was mounted ({', '.join(changed)} changed): "
            "refusing to serve other bytes under the mounted filesystem"
        )
    return source
