"""A progress line on the terminal while an archive is read: how far, how fast. Nothing when stderr is not a tty."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

MIB = 1 << 20


class Meter:
    """What a pass reports its progress to."""

    def update(self, done: int, produced: int) -> None:
        """``done`` bytes of the archive read, ``produced`` bytes of stream out of them."""

    def close(self) -> None:
        """The pass is over."""


class Progress(Meter):
    """Writes to its own copy of stderr, taken when it is made: the line still shows while fd 2 is
    redirected (see ``streams.native_stderr_kept``)."""

    def __init__(self, what: str, total: int, *, enabled: bool = True, out: TextIO | None = None,
                 every: float = 0.25) -> None:
        self.enabled = enabled and (out or sys.stderr).isatty()
        self.out = out or (open(os.dup(sys.stderr.fileno()), "w", closefd=True)  # noqa: SIM115 - see close()
                           if self.enabled else sys.stderr)
        self._owned = out is None and self.enabled
        self.what, self.total, self.every = what, total, every
        self.start = time.monotonic()
        self._last = self.start - every  # the first update shows at once
        self._shown = False

    def update(self, done: int, produced: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        rate = produced / max(now - self.start, 1e-6) / MIB
        percent = f"{100 * done // self.total}%, " if self.total else ""
        self.out.write(f"\r{self.what}: {percent}{produced / MIB:.0f} MiB at {rate:.0f} MiB/s\x1b[K")
        self.out.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
        if self._owned:
            self.out.close()


class Parts:
    """One progress line for several passes that run at once (the layers of an image): a meter per pass."""

    def __init__(self, line: Progress) -> None:
        self.line = line
        self._lock = threading.Lock()
        self._done: dict[int, tuple[int, int]] = {}

    def meter(self) -> Meter:
        parts, key = self, len(self._done)
        self._done[key] = (0, 0)

        class _Part(Meter):
            def update(self, done: int, produced: int) -> None:
                with parts._lock:
                    parts._done[key] = (done, produced)
                    parts.line.update(*map(sum, zip(*parts._done.values(), strict=True)))

        return _Part()

    def close(self) -> None:
        self.line.close()
