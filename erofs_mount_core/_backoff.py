"""A device's failed reattaches, kept beside its record: how many in a row, when the next is due, and why.

``reattach --all`` (a timer runs it often) and ``watch`` wait 10 s, then 20 s,
40 s... up to 10 minutes before trying a device whose reattach keeps
failing, so they do not hammer a registry or fill the journal; ``list``
shows the last one's why as the device's ``refused`` state.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import attrs

from . import _record as rec
from ._errors import ErofsMountError

#: back-off for a device whose reattach keeps failing, in ``reattach --all`` (a timer runs it often)
RETRY_FIRST, RETRY_MAX = 10.0, 600.0


@attrs.frozen
class Failure:
    """The last failed reattach of a device: how many in a row, when the next is due, and why."""

    count: int
    due: float
    why: str


def last_failure(record_path: Path) -> Failure | None:
    """The device's failed reattaches, kept beside its record; None if the last one worked (or none ran)."""
    try:
        count, due, why = rec.retry_path(record_path).read_text().rstrip("\n").split(" ", 2)
        return Failure(int(count), float(due), why)
    except (OSError, ValueError):
        return None


def delay(failures_before: int) -> float:
    """Seconds before the next attempt, after ``failures_before`` failures in a row."""
    return min(RETRY_MAX, RETRY_FIRST * 2 ** failures_before)


def note_failure(record_path: Path, exc: ErofsMountError, now: float) -> None:
    """One more failure in a row, and why; the next attempt is due after ``delay``."""
    before = last_failure(record_path)
    count = 1 if before is None else before.count + 1
    due = now + delay(count - 1)
    why = str(exc).replace("\n", " ")
    with contextlib.suppress(OSError):  # a run directory that will not take it costs only the back-off
        fd = os.open(rec.retry_path(record_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{count} {due} {why}\n")


def clear(record_path: Path) -> None:
    """A reattach worked: no failure is kept."""
    rec.retry_path(record_path).unlink(missing_ok=True)
