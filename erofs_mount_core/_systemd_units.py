"""``erofs-mount systemd-units``: the units that reattach devices, written for this installation.

The units run the ``erofs-mount`` command this one was started as (pip may
have put it in /usr/local/bin, a virtualenv, or anywhere): written by the
installed command itself, they name its real path, never a guessed one.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ._cache import write_cache_file
from ._errors import NotRootError, UsageError

DEFAULT_DIR = "/etc/systemd/system"

_TEMPLATES = {
    "erofs-mount-watch.service": """\
[Unit]
Description=Reattach an erofs-mount NBD device the moment its serving daemon dies
After=network-online.target
Wants=network-online.target

[Service]
# Listens to the kernel's nbd events (a connection died) and reattaches that
# device at once, with a daemon forked from itself: no interpreter has to
# start, so held reads complete within about a second. A device whose
# reattach fails is tried again after 10 s, 20 s... up to 10 minutes (the
# same back-off as the timer, which stays as a fallback). The daemons it
# starts must outlive it (a restart of this service, an upgrade):
# KillMode=process stops only the watcher. Under systemd each of those
# forks then hands its device to a daemon in a service of its own
# (erofs-mountd-*.service), as every other daemon runs.
# Devices mounted with -o credentials=env need those variables here too, from
# a root-only file (mode 0600).
Type=exec
EnvironmentFile=-/etc/erofs-mount/credentials.env
ExecStartPre=-/sbin/modprobe nbd
ExecStart={command} watch
KillMode=process
Restart=always
RestartSec=1s

[Install]
WantedBy=multi-user.target
""",
    "erofs-mount-reattach.service": """\
[Unit]
Description=Reattach erofs-mount NBD devices whose serving daemon is gone
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
# Acts only on devices attached by erofs-mount whose daemon is dead (the
# daemon's lock on its record is free); healthy devices are left alone, so
# running it often is harmless. Each new daemon runs in its own session and
# outlives this unit: KillMode=process lets it go on serving.
# Devices mounted with -o credentials=env need those variables here too, from
# a root-only file (mode 0600); without them their reattach is
# refused and backed off.
EnvironmentFile=-/etc/erofs-mount/credentials.env
ExecStart={command} reattach --all
KillMode=process
""",
    "erofs-mount-reattach.timer": """\
[Unit]
Description=Reattach erofs-mount NBD devices soon after their serving daemon dies

[Timer]
# No supervisor process: a short-lived check every 10 seconds. Reads on a
# device whose daemon died wait in the kernel (dead-connection timeout) and
# complete once the new daemon is attached.
OnBootSec=10s
OnUnitInactiveSec=10s
AccuracySec=1s

[Install]
WantedBy=timers.target
""",
}


def render(command: str) -> dict[str, str]:
    """Each unit's name and text, running ``command`` (an absolute path)."""
    return {name: text.format(command=command) for name, text in _TEMPLATES.items()}


def this_command() -> str:
    """The absolute path of the erofs-mount command running now."""
    invoked = sys.argv[0]
    if os.path.basename(invoked) == "erofs-mount" and os.path.isfile(invoked):
        return os.path.abspath(invoked)
    beside = Path(sys.executable).with_name("erofs-mount")  # a virtualenv's bin
    if beside.is_file():
        return str(beside)
    found = shutil.which("erofs-mount")
    if found:
        return os.path.abspath(found)
    raise UsageError("cannot tell where the erofs-mount command is: give it with --command PATH")


def write(directory: Path, command: str) -> list[Path]:
    """Write every unit into ``directory`` (mode 0644); the paths written."""
    if not os.path.isabs(command) or not os.access(command, os.X_OK):
        raise UsageError(f"--command {command}: not an executable given by its absolute path")
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    written = []
    for name, text in render(command).items():
        path = directory / name
        try:
            write_cache_file(path, text.encode())  # aside, never through a link, then renamed
            os.chmod(path, 0o644)
        except PermissionError:
            raise NotRootError(f"writing units into {directory}") from None
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None
        written.append(path)
    return written
