"""The exceptions erofs-mount raises, grouped by what a caller does about them.

    ErofsMountError                 one line for the user, an exit code
    ├── UsageError                  the user asked for something impossible
    │   ├── NotRootError
    │   └── UnknownSchemeError
    ├── KernelError                 the nbd driver is missing or said no
    ├── SourceError                 a source cannot be opened or read
    │   └── SourceChangedError      reattach would serve other bytes: refused
    ├── RecordError                 a recovery record is missing, corrupt or too new
    ├── PluginError                 a plugin broke its contract
    └── DeviceStateError            the device is not in the state the command needs
        └── AlreadyServing          a daemon serves it already: nothing to do (exit 0)

The CLI prints ``Error: <message>`` and exits with ``exit_code`` (one
meaning per code: ``EXIT_CODES``, printed by ``--help``); nothing else reaches
the user unless ``--debug`` asks for the traceback. A daemon's
error reaches the command that started it as the same class
(``_daemon_start``), so callers catch ``SourceChangedError`` whichever
process raised it.
"""

from __future__ import annotations


class ErofsMountError(Exception):
    """Base class: ``str(exc)`` is the one line the user sees."""

    exit_code = 1


class UsageError(ErofsMountError):
    exit_code = 2


class NotRootError(UsageError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs root (CAP_SYS_ADMIN): run it as root")


class UnknownSchemeError(UsageError):
    def __init__(self, scheme: str, known: list[str]) -> None:
        have = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"no installed plugin provides source type {scheme!r} (installed: {have}); "
            "see 'erofs-mount plugins'"
        )
        self.scheme = scheme


class KernelError(ErofsMountError):
    exit_code = 3


class SourceError(ErofsMountError):
    """A source failed. ``transient`` says whether retrying the same call may help;
    ``retry_after`` is how long the far side asked us to wait first (seconds, or None)."""

    exit_code = 4
    transient = False
    retry_after: float | None = None

    def __init__(self, message: str, *, transient: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


class SourceChangedError(SourceError):
    """The bytes behind a record are not the ones it was written for."""


class RecordError(ErofsMountError):
    exit_code = 5


class PluginError(ErofsMountError):
    exit_code = 6


class DeviceStateError(ErofsMountError):
    exit_code = 7


class AlreadyServing(DeviceStateError):
    """A live daemon holds the device: what the command wanted is already true. Not a failure,
    but raised like one from where it is found (the daemon's lock), so callers that only
    need "not started" catch it as a DeviceStateError."""

    exit_code = 0


#: what each exit code means, for --help, the user guide and scripts (stable: never renumbered)
EXIT_CODES = {
    0: "done, or nothing to do (a reattach of a device that is served)",
    1: "failed for a reason with no code of its own, or --all failed in more than one way",
    2: "usage: a wrong argument or option, not root, an unknown source type",
    3: "the kernel: the nbd driver is missing or refused, mount(2) or umount(2) failed",
    4: "the source: it cannot be opened or read, or reattach was refused because its bytes changed",
    5: "a recovery record is missing, corrupt or from a newer erofs-mount",
    6: "a plugin broke its contract",
    7: "the device is not in the state the command needs (not connected, not ours, busy)",
    130: "interrupted",
}
