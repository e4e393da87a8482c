"""Logging for the daemon and serve: our lines at INFO, everyone else's from WARNING, no secrets, bounded.

A daemon runs for days on a device's life, with its log on tmpfs. So:
libraries (an HTTP client logs every request at INFO) speak only from
WARNING; query strings, where signed URLs carry signatures and session
tokens, are cut from every line; and the daemon's log file is truncated
when it passes ``LOG_LIMIT``, with a line saying so. Under systemd the
daemon's stderr is the journal, which keeps time and bounds itself: lines
carry their priority instead.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TextIO

from ._systemd import journal_prefix

#: the loggers of erofs-mount and its plugins ("erofs_mount.daemon", "erofs_mount.PLUGIN", ...)
OUR_LOGGERS = "erofs_mount"
LOG_LIMIT = 1 << 20
_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#\"'<>]*)\?[^\s#\"'<>]*", re.I)


def redact(text: str) -> str:
    """``https://h/p?X-Amz-Signature=...`` -> ``https://h/p?…``."""
    return _QUERY.sub(r"\1?…", text)


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _Journal(_Redacting):
    """For a daemon whose stderr is the journal: each line starts with its priority (``<3>``, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        return journal_prefix(record.levelno) + super().format(record)


class _BoundedFile(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to a file opened for appending; past ``limit`` bytes it starts the file again."""

    def __init__(self, stream: TextIO, limit: int) -> None:
        super().__init__(stream)
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fd = self.stream.fileno()
            if os.fstat(fd).st_size >= self.limit:
                self.stream.flush()
                os.ftruncate(fd, 0)
                self.stream.write(f"(log truncated: it passed {self.limit} bytes)\n")
        except (OSError, ValueError):
            pass
        super().emit(record)


def configure(stream: TextIO, fmt: str, *, level: int = logging.INFO, limit: int | None = None,
              journal: bool = False) -> None:
    handler = _BoundedFile(stream, limit) if limit else logging.StreamHandler(stream)
    handler.setFormatter(_Journal(fmt) if journal else _Redacting(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger(OUR_LOGGERS).setLevel(level)
