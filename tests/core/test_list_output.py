"""`erofs-mount list` as a person reads it: aligned columns, pinned digests shown.

The rows come from the kernel and the records (covered by the kernel tests);
here they are given, to check the table itself.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from erofs_mount_core import cli, engine


def row(device: str, **fields: object) -> dict[str, object]:
    base = {"device": device, "mountpoints": [], "source": None, "serving": None, "daemon_pid": None,
            "daemon_alive": None, "record": None, "error": None}
    return {**base, **fields}


def test_columns_line_up_and_a_pinned_digest_follows_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "list_devices", lambda: [
        row("/dev/nbd0", mountpoints=["/mnt/app"], source="oci:reg:5000/app:1.4",
            serving="reg:5000/app:1.4#sha256:ab12", daemon_pid=1234, daemon_alive=True,
            record="/run/erofs-mount/nbd-a.toml"),
        row("/dev/nbd1", source="local:/srv/a b.erofs", serving="/srv/a b.erofs", daemon_pid=99,
            daemon_alive=False, record="/run/erofs-mount/nbd-b.toml"),
        row("/dev/nbd12", record="/elsewhere", error="not attached by erofs-mount"),
    ])
    lines = CliRunner().invoke(cli.cli, ["list"]).output.splitlines()
    assert lines[0].split() == ["DEVICE", "MOUNTPOINT", "DAEMON", "SOURCE", "RECORD"]
    assert "oci:reg:5000/app:1.4 = reg:5000/app:1.4#sha256:ab12" in lines[1]
    assert "local:/srv/a b.erofs " in lines[2] and "= /srv/a b.erofs" not in lines[2]
    assert "99 DEAD" in lines[2] and "- ?" in lines[3] and "not attached by erofs-mount" in lines[3]
    for column in ("MOUNTPOINT", "DAEMON", "SOURCE", "RECORD"):
        at = lines[0].index(column)
        assert all(line[at - 2:at] == "  " and line[at] != " " for line in lines[1:]), column


def test_nothing_attached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "list_devices", lambda: [])
    assert CliRunner().invoke(cli.cli, ["list"]).output == "no nbd devices attached\n"
