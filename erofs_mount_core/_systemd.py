"""systemd: each daemon in a transient service of its own, and the daemon's side of the service protocol.

A daemon started from a service (a oneshot that runs ``erofs-mount mount``)
would live in that service's cgroup, and die when it stops or restarts.
So, when systemd runs the machine, the command asks systemd (``systemd-run``,
which speaks to PID 1 over its private socket: no D-Bus daemon is needed)
for a transient service per daemon, ``erofs-mountd-<record>-<n>.service``:
``Type=notify`` (the daemon says READY=1 once it serves), a watchdog, its
output in the journal, no default dependencies (a storage daemon must not
wait for ``basic.target``, nor be stopped with the caller's targets).

``EROFS_MOUNT_SYSTEMD=no`` keeps daemons where they start (a session of their
own in the caller's cgroup), as on a machine without systemd.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

SETTING = "EROFS_MOUNT_SYSTEMD"
UNIT_PREFIX = "erofs-mountd-"
#: the service's watchdog: a daemon that does not ping for this long is killed (and ``watch`` reattaches)
WATCHDOG_SEC = 30
#: a request served for longer than this means the daemon is stuck: it stops pinging the watchdog
STUCK_REQUEST = 120.0
#: systemd's variables for the process it started; never passed on to another process
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM",
                     "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "MAINPID", "MANAGERPID", "SYSTEMD_EXEC_PID")
#: syslog priorities for the journal's line prefixes (sd-daemon(3)), by logging level
_PRIORITY = {50: 2, 40: 3, 30: 4, 20: 6, 10: 7}


def systemd_run(path: str) -> str | None:
    """``systemd-run`` if systemd runs this machine and the setting allows it, else None.

    Looked up in ``path`` (the daemon's system PATH), never in the caller's.
    """
    if os.environ.get(SETTING, "auto").lower() in ("no", "0", "false"):
        return None
    if not os.path.isdir("/run/systemd/system"):  # sd_booted(3)
        return None
    return shutil.which("systemd-run", path=path)


def unit_name(record_path: Path) -> str:
    """A new name each start: a ``restart`` runs the new daemon's service beside the old one's."""
    return f"{UNIT_PREFIX}{record_path.stem}-{os.urandom(2).hex()}.service"


def run_command(systemd_run: str, unit: str, description: str, environment: dict[str, str],
                command: list[str], start_timeout: float) -> list[str]:
    """``systemd-run`` starting ``command`` as the daemon's service ``unit``.

    However the daemon ends but cleanly (SIGKILL, the OOM killer, the
    watchdog), systemd then logs a line in the journal, under the same name,
    saying which command brings its device back: the daemon cannot say it
    once killed.
    """
    properties = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": str(WATCHDOG_SEC),
        "WatchdogSignal": "SIGKILL", "DefaultDependencies": "no", "TimeoutStartSec": f"{start_timeout:.0f}",
        "SyslogIdentifier": "erofs-mountd", "Restart": "no",
        # $$: the shell's variables, not systemd's; nothing of ours is in the line (the journal names the unit)
        "ExecStopPost": "/bin/sh -c 'test \"$$SERVICE_RESULT\" = success || echo \"the daemon ended "
                        "($$SERVICE_RESULT: $$EXIT_CODE $$EXIT_STATUS): if its device is still attached, its "
                        "reads wait until erofs-mount reattach --all (or the watch service) gives it a new one\"'",
    }
    argv = [systemd_run, "--quiet", "--collect", f"--unit={unit}", f"--description={description}"]
    argv += [f"--property={k}={v}" for k, v in properties.items()]
    argv += [f"--setenv={k}={v}" for k, v in environment.items()]
    return [*argv, "--", *command]


# -- the daemon's side ------------------------------------------------------------


class Service:
    """What systemd told the daemon it started (read once, then removed from the environment)."""

    def __init__(self) -> None:
        self.notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        watchdog_usec = os.environ.pop("WATCHDOG_USEC", "")
        watchdog_pid = os.environ.pop("WATCHDOG_PID", "")
        self.watchdog: float | None = None
        if watchdog_usec.isdigit() and watchdog_pid in ("", str(os.getpid())):
            self.watchdog = int(watchdog_usec) / 1e6
        self.journal = _stderr_is_journal(os.environ.pop("JOURNAL_STREAM", ""))

    def notify(self, *states: str) -> None:
        """sd_notify(3); nothing when systemd did not ask for it."""
        if not self.notify_socket:
            return
        address = self.notify_socket
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(states).encode(), address)
            except OSError:
                pass


def unit_of_this_process() -> str | None:
    """The systemd unit this process runs in, from its cgroup (``None`` outside one of ours)."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in cgroup.splitlines():
        name = line.rpartition("/")[2]
        if name.startswith(UNIT_PREFIX) and name.endswith(".service"):
            return name
    return None


def journal_prefix(levelno: int) -> str:
    """``<N>``: the priority journald reads at the start of a line."""
    return f"<{_PRIORITY.get(levelno - levelno % 10, 6)}>"


def _stderr_is_journal(stream: str) -> bool:
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return device.isdigit() and inode.isdigit() and (st.st_dev, st.st_ino) == (int(device), int(inode))
