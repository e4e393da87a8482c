"""A command's stderr as a terminal shows it: what a progress line writes when a person is watching."""

from __future__ import annotations

import os
import pty
import subprocess


def stderr_on_a_terminal(command: list[str], *, timeout: float) -> tuple[int, bytes]:
    """Run ``command`` with its stderr on a pseudo-terminal: (its exit status, everything it wrote there)."""
    main, secondary = pty.openpty()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal's other side is closed: the command is done
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    return proc.wait(timeout), shown
