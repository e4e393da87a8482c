"""Kill points: where the kernel tests kill a command or a daemon, as a crash or an OOM kill there would.

``EROFS_MOUNT_TEST_KILL_AT=NAME`` makes the process that reaches the point
``NAME`` kill itself with SIGKILL. Only tests set it (tests/vm/test_kill_points.py
names every point); unset, each point is one dictionary lookup. It reaches a
daemon like any other variable of its caller's.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "EROFS_MOUNT_TEST_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
