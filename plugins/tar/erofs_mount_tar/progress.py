"""A progress line on the terminal while an archive is read: how far, how fast. Nothing when stderr is not a tty."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

MIB = 1 << 20


class Progress:
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
        """``done`` bytes of the ``total`` read, ``produced`` bytes of stream out of them."""
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
