"""The source contract as checks a plugin's own tests can run.

A source plugin proves it keeps the contract that mount and reattach rely
on by describing one real source of its kind and calling ``check_source``::

    from erofs_mount_core.testing import SourceCase, check_source

    def test_contract(tmp_path):
        image = make_an_image(tmp_path)
        check_source(SourceCase(
            scheme="local", location=str(image), expected=image.read_bytes(),
            change=lambda: image.write_bytes(b"other bytes"),     # makes the record stale
            missing_location=str(tmp_path / "nope.erofs"),
        ))

``check_source(case, checks=[name])`` runs one rule of ``CHECKS``, for
parametrized tests. A broken rule raises ``ContractError`` naming it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from . import _record as rec
from ._errors import ErofsMountError, SourceChangedError, SourceError
from ._plugins import PluginHost
from ._source import Source

__all__ = ["CHECKS", "ContractError", "SourceCase", "check_source"]


class ContractError(AssertionError):
    """A source plugin broke a rule of the contract."""


@attrs.frozen
class SourceCase:
    scheme: str
    location: str
    expected: bytes
    """The bytes the source must serve."""
    options: Mapping[str, str] = attrs.field(factory=dict)
    secrets: Sequence[str] = ()
    """Strings (passwords, tokens) that must never reach a record."""
    change: Callable[[], None] | None = None
    """Makes the opened bytes stale (rewrite, replace, delete); reattach must then refuse."""
    missing_location: str | None = None
    """A location that does not exist: opening it must fail with a clear error."""


def _open(case: SourceCase, host: PluginHost) -> Source:
    try:
        source = host.open_source(case.scheme, case.location, case.options)
    except ErofsMountError as exc:
        raise ContractError(f"open: {case.scheme}:{case.location} did not open: {exc}") from exc
    return source


def _check_open(case: SourceCase, host: PluginHost) -> None:
    """open returns a Source whose size is the size of the bytes."""
    source = _open(case, host)
    try:
        if not isinstance(source, Source):
            raise ContractError(f"open: returned {type(source).__name__}, not a Source")
        if source.size != len(case.expected):
            raise ContractError(f"open: size is {source.size}, the bytes are {len(case.expected)}")
        if not isinstance(source.describe(), str) or "\n" in source.describe():
            raise ContractError("describe: must return one line")
    finally:
        source.close()


def _reads(size: int) -> list[tuple[int, int]]:
    rng = random.Random(size)
    points = sorted({0, 1, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, size // 2, size - 4096, size - 1})
    lengths = (1, 511, 512, 4096, 4097, 65536, 131072)
    reads = [(o, min(n, size - o)) for o in points if 0 <= o < size for n in lengths]
    reads += [(o, size - o) for o in (0, size // 3) if size - o <= 8 << 20]
    reads += [(rng.randrange(size), 1 + rng.randrange(65536)) for _ in range(64)]
    return [(o, min(n, size - o)) for o, n in reads if n > 0 and o < size]


def _check_pread(case: SourceCase, host: PluginHost) -> None:
    """pread returns exactly the bytes asked for, at every alignment, and refuses reads past the end."""
    source = _open(case, host)
    try:
        _check_bytes(source, case.expected, "pread")
        size = source.size
        for offset, length in ((size - 1, 2), (size, 1), (size + 4096, 4096)):
            try:
                data = source.pread(length, offset)
            except SourceError:
                continue
            except Exception as exc:
                raise ContractError(f"pread past the end raised {type(exc).__name__}, not SourceError") from exc
            raise ContractError(f"pread({length}, {offset}) past the end of {size} bytes returned "
                                f"{len(data)} bytes instead of raising SourceError")
    finally:
        source.close()


def _check_bytes(source: Source, expected: bytes, rule: str) -> None:
    for offset, length in _reads(len(expected)):
        data = source.pread(length, offset)
        if data != expected[offset:offset + length]:
            raise ContractError(f"{rule}: pread({length}, {offset}) returned "
                                f"{len(data)} bytes that differ from the source's")


def _check_fileno(case: SourceCase, host: PluginHost) -> None:
    """A file descriptor from fileno() holds the source's bytes at the same offsets."""
    source = _open(case, host)
    try:
        fd = source.fileno()
        if fd is None:
            return
        if not isinstance(fd, int) or fd < 0:
            raise ContractError(f"fileno: returned {fd!r}, not a file descriptor or None")
        for offset, length in _reads(len(case.expected)):
            try:
                data = os.pread(fd, length, offset)
            except OSError as exc:
                raise ContractError(f"fileno: reading the descriptor failed: {exc.strerror}") from exc
            if data != case.expected[offset:offset + length]:
                raise ContractError(f"fileno: the descriptor's {length} bytes at {offset} differ from the "
                                    "source's; serve would send them with sendfile")
    finally:
        source.close()


def _fresh_record(case: SourceCase, host: PluginHost) -> tuple[str, dict[str, Any]]:
    """Open the source, write its TOML record and read it back: the text and the source state."""
    source = _open(case, host)
    try:
        state = host.source_state(case.scheme, source)
        record = rec.Record(
            format=rec.FORMAT, created=rec.now(), daemon_pid=0,
            device=rec.DeviceRecord(index=0, size=source.size, block_size=512, connections=1, dead_timeout=60),
            source=rec.SourceRecord(scheme=case.scheme, location=case.location, description=source.describe(),
                                    plugin=case.scheme, distribution="", state=state),
        )
    finally:
        source.close()
    try:
        text = rec.dumps(record)
    except ErofsMountError as exc:
        raise ContractError(f"state: the state does not fit in a TOML record: {exc}") from exc
    return text, rec.loads(text).source.state


def _check_round_trip(case: SourceCase, host: PluginHost) -> None:
    """state() -> TOML record -> deserialize serves the same bytes."""
    _text, state = _fresh_record(case, host)
    try:
        again = host.deserialize_source(case.scheme, state)
    except ErofsMountError as exc:
        raise ContractError(f"deserialize: a fresh record was refused: {exc}") from exc
    try:
        if again.size != len(case.expected):
            raise ContractError(f"deserialize: size {again.size}, expected {len(case.expected)}")
        _check_bytes(again, case.expected, "deserialize")
    finally:
        again.close()


def _check_no_secrets(case: SourceCase, host: PluginHost) -> None:
    """The record holds no secret: it names where credentials come from."""
    text, _state = _fresh_record(case, host)
    for secret in case.secrets:
        if secret and secret in text:
            raise ContractError(f"state: the record contains a secret ({secret[:2]}…): "
                                "record where credentials come from, not the credentials")


def _check_errors(case: SourceCase, host: PluginHost) -> None:
    """A location that does not exist is one clear error (an ErofsMountError), not a crash."""
    if case.missing_location is None:
        return
    try:
        source = host.open_source(case.scheme, case.missing_location, case.options)
    except ErofsMountError as exc:
        if not str(exc).strip() or "\n" in str(exc):
            raise ContractError("errors: the message must be one non-empty line") from exc
        return
    except Exception as exc:
        raise ContractError(f"errors: opening a missing location raised {type(exc).__name__}: {exc}; "
                            "raise SourceError or UsageError with a message for the user") from exc
    source.close()
    raise ContractError(f"errors: {case.scheme}:{case.missing_location} opened although it does not exist")


def _check_identity(case: SourceCase, host: PluginHost) -> None:
    """After the bytes change, deserialize refuses (SourceChangedError or SourceError), never serves them."""
    if case.change is None:
        return
    _text, state = _fresh_record(case, host)
    case.change()
    try:
        again = host.deserialize_source(case.scheme, state)
    except (SourceChangedError, SourceError):
        return
    except Exception as exc:
        raise ContractError(f"identity: deserialize of a stale record raised {type(exc).__name__}") from exc
    again.close()
    raise ContractError("identity: deserialize accepted a record whose bytes have changed; it must raise "
                        "SourceChangedError so that reattach never serves other bytes")


_RULES: dict[str, Callable[[SourceCase, PluginHost], None]] = {
    "open": _check_open,
    "pread": _check_pread,
    "fileno": _check_fileno,
    "round-trip": _check_round_trip,
    "no-secrets": _check_no_secrets,
    "errors": _check_errors,
    "identity": _check_identity,  # last: it changes the bytes
}

#: the rules' names, in the order ``check_source`` runs them
CHECKS: tuple[str, ...] = tuple(_RULES)


def check_source(case: SourceCase, *, plugin: object | None = None, checks: Iterable[str] = CHECKS) -> None:
    """Run the rules of the contract named in ``checks`` (all by default) against ``case``.

    The plugin is reached the way erofs-mount reaches it, through its
    installed entry point; or pass ``plugin``, the object holding its hooks
    (its module), to test it without installing it.
    """
    if plugin is None:
        host = PluginHost()
    else:
        host = PluginHost(entry_points=[])
        info = host.register(plugin, case.scheme)
        if info.error:
            raise ContractError(f"register: the plugin does not load: {info.error}")
    unknown = sorted(set(checks) - set(_RULES))
    if unknown:
        raise ValueError(f"unknown contract rule(s) {', '.join(unknown)}; the rules are {', '.join(CHECKS)}")
    for name in CHECKS:
        if name in checks:
            _RULES[name](case, host)
