"""Recovery records: what reattach needs to rebuild a device's source.

One TOML file per attached device, in a root-only directory under /run. Its
path is the device's NBD backend identifier, so ``/sys/block/nbdN/backend``
leads from a device to its record. The format is documented in
docs/record-format.md; ``FORMAT`` is bumped on any change an older reader
would misread, and a reader refuses formats newer than its own.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import attrs

from ._errors import RecordError

FORMAT = 1
DEFAULT_RUN_DIR = "/run/erofs-mount"
RUN_DIR_ENV = "EROFS_MOUNT_RUN_DIR"
SUFFIX = ".toml"
RECORD_NAME = re.compile(r"nbd-[0-9a-f]{12}\.toml")
#: no record comes near this; a larger file is not one of ours
MAX_RECORD = 1 << 20
_U63 = attrs.validators.and_(attrs.validators.instance_of(int), attrs.validators.ge(0),
                             attrs.validators.lt(2**63))


def _nonempty(inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, not {value!r}")


@attrs.frozen(kw_only=True)
class DeviceRecord:
    """How the kernel device was set up; reattach must match it."""

    index: int = attrs.field(validator=attrs.validators.and_(attrs.validators.instance_of(int),
                                                              attrs.validators.ge(-1)))
    """nbd index; -1 until the kernel has assigned one."""
    size: int = attrs.field(validator=_U63)
    block_size: int = attrs.field(validator=_U63)
    connections: int = attrs.field(validator=attrs.validators.and_(_U63, attrs.validators.ge(1)))
    dead_timeout: int = attrs.field(validator=_U63)
    interface: str = attrs.field(default="netlink", validator=attrs.validators.in_(("netlink", "ioctl")))
    """How the device was attached; only netlink devices can be reattached."""


@attrs.frozen(kw_only=True)
class SourceRecord:
    """Which plugin serves the bytes, and its own state for reattach."""

    scheme: str = attrs.field(validator=_nonempty)
    location: str = attrs.field(validator=_nonempty)
    """The location as the user gave it (after ``scheme:``)."""
    description: str = attrs.field(validator=attrs.validators.instance_of(str))
    plugin: str = attrs.field(validator=_nonempty)
    distribution: str = attrs.field(validator=attrs.validators.instance_of(str))
    """The pip distribution that provided the plugin, to name in errors."""
    state: dict[str, Any] = attrs.field(validator=attrs.validators.instance_of(dict))


@attrs.frozen(kw_only=True)
class Record:
    format: int = attrs.field(validator=attrs.validators.instance_of(int))
    created: datetime.datetime = attrs.field(validator=attrs.validators.instance_of(datetime.datetime))
    daemon_pid: int = attrs.field(validator=_U63)
    """The serving daemon of the moment (``/sys/block/nbdN/pid`` keeps the first)."""
    device: DeviceRecord
    source: SourceRecord


@functools.cache
def converter() -> Any:
    """cattrs' converter for records, made once per process (it builds each class's code at first use)."""
    from cattrs.preconf.tomllib import make_converter

    return make_converter()


def dumps(record: Record) -> str:
    import tomli_w

    try:
        text = tomli_w.dumps(converter().unstructure(record))
    except TypeError as exc:  # e.g. None in a plugin's state
        raise RecordError(f"cannot write a record for {record.source.scheme!r}: {exc}") from exc
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a path whose bytes are not UTF-8: TOML cannot hold it
        raise RecordError(f"cannot write a record for {record.source.scheme}:{record.source.location!r}: "
                          "it holds a name that is not valid UTF-8; rename the file") from None
    return text


def loads(text: str, where: str = "record") -> Record:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecordError(f"{where} is not valid TOML ({exc}): it is corrupt or truncated") from exc
    except RecursionError:  # nested deeper than any record: not ours
        raise RecordError(f"{where} is not a record (nested too deeply)") from None
    version = raw.get("format")
    if not isinstance(version, int):
        raise RecordError(f"{where} is not an erofs-mount recovery record (no format number)")
    if version > FORMAT:
        raise RecordError(
            f"{where} has format {version}, newer than this erofs-mount reads ({FORMAT}): upgrade erofs-mount"
        )
    try:
        return converter().structure(raw, Record)
    except RecursionError:
        raise RecordError(f"{where} is invalid: nested too deeply") from None
    except Exception as exc:
        from cattrs import transform_error

        detail = "; ".join(transform_error(exc)) if hasattr(exc, "exceptions") else str(exc)
        raise RecordError(f"{where} is invalid: {detail}") from exc


class RecordStore:
    """The directory of records: 0700 root-only, files 0600, atomic writes."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory or os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)

    def ensure(self) -> None:
        """Create the directory, or check it: a real directory of ours, private (made so if it is not)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.directory.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise RecordError(f"run directory {self.directory} is not a directory (a symlink?): refusing it")
        if st.st_uid != os.geteuid():
            raise RecordError(f"run directory {self.directory} belongs to uid {st.st_uid}, not to us: refusing it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(self.directory, 0o700)

    def new_path(self) -> Path:
        return self.directory / f"nbd-{os.urandom(6).hex()}{SUFFIX}"  # (secrets would load OpenSSL for this)

    def holds(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` names a record of this directory (``nbd-HEX.toml`` in it, nowhere else)."""
        path = Path(path)
        return (RECORD_NAME.fullmatch(path.name) is not None
                and os.path.realpath(path.parent) == os.path.realpath(self.directory))

    def write(self, path: Path, record: Record) -> None:
        """Replace ``path`` with ``record`` atomically (temp file, fsync, rename); no symlink is followed."""
        text = dumps(record).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a writer of the same pid that died
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @staticmethod
    def read(path: str | os.PathLike[str]) -> Record:
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise RecordError(f"record {path} does not exist") from exc
        except OSError as exc:  # ELOOP: a symlink
            raise RecordError(f"cannot read record {path}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RecordError(f"record {path} is not a regular file")
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                mode = stat.S_IMODE(st.st_mode)
                raise RecordError(f"record {path} is not private to its owner (mode {mode:o}): refusing it")
            if st.st_size > MAX_RECORD:
                raise RecordError(f"record {path} is {st.st_size} bytes, more than a record can be: refusing it")
            try:
                text = f.read(MAX_RECORD + 1).decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise RecordError(f"cannot read record {path}: {exc}") from exc
        return loads(text, f"record {path}")

    def paths(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    @staticmethod
    def remove(path: Path) -> None:
        """The record first, its lock last: whoever holds the lock removes them."""
        for p in (path, log_path(path), retry_path(path), control_path(path), lock_path(path)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def lock_path(record_path: Path) -> Path:
    """Held (flock) by the live daemon: free lock = daemon gone, whatever its pid."""
    return record_path.with_suffix(".lock")


def log_path(record_path: Path) -> Path:
    return record_path.with_suffix(".log")


def control_path(record_path: Path) -> Path:
    """The live daemon's control socket (``_control``): stats and hand-over."""
    return record_path.with_suffix(".sock")


def retry_path(record_path: Path) -> Path:
    """Its last failed reattaches: how many, when `reattach --all` may try again, and why (`_lifecycle`)."""
    return record_path.with_suffix(".retry")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
