"""Recovery records: round trips, refusals, file modes.

Their use by reattach is tested in tests/vm/test_local_mount.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs
import pytest

from erofs_mount_core import _record as rec
from erofs_mount_core._errors import RecordError

AWKWARD = ["/srv/with space/a.erofs", 'quo"te\'s', "new\nline", "tab\there", "ünïcödé 日本語 🙂",
           "back\\slash", "nul\0byte", "crlf\r\n", "", "="]


def make(location: str = "/srv/a.erofs", **state: object) -> rec.Record:
    return rec.Record(
        format=rec.FORMAT, created=rec.now(), daemon_pid=42,
        device=rec.DeviceRecord(index=3, size=1 << 20, block_size=512, connections=4, dead_timeout=60),
        source=rec.SourceRecord(scheme="local", location=location, description="d", plugin="local",
                                distribution="erofs-mount-local", state=dict(state)),
    )


@pytest.mark.parametrize("text", [a for a in AWKWARD if a])
def test_any_string_round_trips(text: str) -> None:
    record = make(location=text, path=text, nested={"k": text, text: [text, 1]})
    assert rec.loads(rec.dumps(record)) == record


def test_store_writes_0600_in_a_0700_directory(tmp_path: Path) -> None:
    store = rec.RecordStore(tmp_path / "run")
    store.ensure()
    path = store.new_path()
    record = make(path="/x y")
    store.write(path, record)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.read(path) == record
    assert store.paths() == [path]
    store.write(path, attrs.evolve(record, daemon_pid=7))  # atomic replace
    assert store.read(path).daemon_pid == 7
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temp files left"


@pytest.mark.parametrize("text, message", [
    ("format = 1\n[device", "not valid TOML"),
    ("", "not an erofs-mount recovery record"),
    ("format = 99\n", "format 99, newer than this erofs-mount reads"),
    ("format = 1\ncreated = 2026-01-01T00:00:00Z\ndaemon_pid = 1\n", "invalid"),
])
def test_bad_records_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        rec.loads(text, "record r")


def test_truncated_record_is_refused() -> None:
    text = rec.dumps(make(path="/a"))
    for cut in (len(text) // 3, len(text) // 2, len(text) - 5):
        with pytest.raises(RecordError):
            rec.loads(text[:cut])


def test_wrong_types_name_the_field() -> None:
    text = rec.dumps(make()).replace("connections = 4", 'connections = "four"')
    with pytest.raises(RecordError, match="connections"):
        rec.loads(text)


def test_unserializable_state_is_a_record_error() -> None:
    with pytest.raises(RecordError, match="cannot write a record"):
        rec.dumps(make(token=None))


def test_a_record_readable_by_others_is_refused(tmp_path: Path) -> None:
    store = rec.RecordStore(tmp_path)
    path = store.new_path()
    store.write(path, make())
    os.chmod(path, 0o644)
    with pytest.raises(RecordError, match="not private"):
        store.read(path)


def test_missing_record(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="does not exist"):
        rec.RecordStore.read(tmp_path / "nope.toml")


def test_a_name_that_is_not_utf8_is_a_clear_error() -> None:
    name = os.fsdecode(b"/srv/caf\xe9.erofs")  # Latin-1 bytes on disk: a lone surrogate in Python
    with pytest.raises(RecordError, match="not valid UTF-8; rename the file"):
        rec.dumps(make(location=name, path=name))
