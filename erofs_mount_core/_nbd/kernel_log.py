"""What the nbd driver last said of each device in the kernel log (/dev/kmsg): disconnected, or given up.

Past the dead-connection timeout a request that finds no live connection
makes the driver shut the device's sockets down ("shutting down sockets")
and fail reads with EIO at once from then on, until a reattach hands it new
ones; a disconnect (``NBD_DISCONNECT``, then the same line) ends the device
for good while its filesystem stays mounted. Nothing in sysfs or netlink
tells these from a device whose reads wait; the kernel log does, with the
time since boot. Root reads it; elsewhere (a container without /dev/kmsg)
the answer is "not known", never a guess.
"""

from __future__ import annotations

import os
import re
import time

import attrs

KMSG = "/dev/kmsg"
_LINE = re.compile(r"^[0-9]+,[0-9]+,([0-9]+),[^;]*;block nbd([0-9]+): (shutting down sockets|NBD_DISCONNECT)$")
#: at most this many records are read (the log ring holds a few thousand)
MAX_RECORDS = 100_000


@attrs.define
class Said:
    """When (wall clock) the driver last shut a device's sockets down, and last was told to disconnect it."""

    shut_down: float = 0.0
    disconnected: float = 0.0


def said() -> dict[int, Said]:
    """``{index: Said}`` for each device the log now held names."""
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    found: dict[int, Said] = {}
    boot = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)  # the log counts from boot, in microseconds
    try:
        for _ in range(MAX_RECORDS):
            try:
                record = os.read(fd, 8192)
            except BrokenPipeError:  # the ring overwrote what we were about to read: go on with the next
                continue
            except OSError:  # EAGAIN: the end
                break
            if (line := parse(record)) is not None:
                index, since_boot, what = line
                entry = found.setdefault(index, Said())
                if what == "NBD_DISCONNECT":
                    entry.disconnected = boot + since_boot
                else:
                    entry.shut_down = boot + since_boot
    finally:
        os.close(fd)
    return found


def parse(record: bytes) -> tuple[int, float, str] | None:
    """``(index, seconds since boot, what)`` if this /dev/kmsg record is the driver on nbdN's sockets."""
    m = _LINE.match(record.split(b"\n", 1)[0].decode("utf-8", "replace"))
    return None if m is None else (int(m.group(2)), int(m.group(1)) / 1e6, m.group(3))
