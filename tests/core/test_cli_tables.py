"""`erofs-mount list` and `plugins` as a person reads them: aligned columns.

The rows of `list` come from the kernel and the records (covered by the
kernel tests); here they are given, to check the table itself.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from erofs_mount_core import UsageError
from erofs_mount_core import _cli as cli
from erofs_mount_core import _lifecycle as lifecycle
from erofs_mount_core import _plugins as plugins
from tests.core.test_plugins import M, eps


def row(device: str, **fields: object) -> dict[str, object]:
    base = {"device": device, "mountpoints": [], "mount_options": None, "source": None, "serving": None,
            "daemon_pid": None, "daemon_alive": None, "record": None, "read_bytes": None, "last_error": None,
            "error": None}
    return {**base, **fields}


def test_columns_line_up_and_a_pinned_digest_follows_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "list_devices", lambda: [
        row("/dev/nbd0", mountpoints=["/mnt/app"], mount_options="ro,nosuid,nodev", source="oci:reg:5000/app:1.4",
            serving="reg:5000/app:1.4#sha256:ab12", daemon_pid=1234, daemon_alive=True,
            record="/run/erofs-mount/nbd-a.toml", read_bytes=3 << 20,
            last_error="read of 4096 bytes at 0 failed: registry answered 503"),
        row("/dev/nbd1", source="local:/srv/a b.erofs", serving="/srv/a b.erofs", daemon_pid=99,
            daemon_alive=False, record="/run/erofs-mount/nbd-b.toml"),
        row("/dev/nbd12", record="/elsewhere", error="not attached by erofs-mount"),
    ])
    lines = CliRunner().invoke(cli.cli, ["list"]).output.splitlines()
    assert lines[0].split() == ["DEVICE", "MOUNTPOINT", "OPTIONS", "DAEMON", "SERVED", "SOURCE", "RECORD"]
    assert " ro,nosuid,nodev " in lines[1] and " 3.0 MiB " in lines[1]
    assert "oci:reg:5000/app:1.4 = reg:5000/app:1.4#sha256:ab12" in lines[1]
    assert "local:/srv/a b.erofs " in lines[2] and "= /srv/a b.erofs" not in lines[2]
    assert "99 DEAD" in lines[2] and "- ?" in lines[3] and "not attached by erofs-mount" in lines[3]
    for column in ("MOUNTPOINT", "OPTIONS", "DAEMON", "SERVED", "SOURCE", "RECORD"):
        at = lines[0].index(column)
        assert all(line[at - 2:at] == "  " and line[at] != " " for line in lines[1:4]), column
    assert lines[4:] == ["/dev/nbd0: last error: read of 4096 bytes at 0 failed: registry answered 503"]


def test_nothing_attached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "list_devices", lambda: [])
    assert CliRunner().invoke(cli.cli, ["list"]).output == "no nbd devices attached\n"


def test_plugins_table_shows_failures_and_conflicts(monkeypatch: pytest.MonkeyPatch) -> None:
    host = plugins.PluginHost(eps(a=f"{M}:good", b=f"{M}:other_mem", gone="no_such_module_xyz"))
    monkeypatch.setattr(plugins, "PluginHost", lambda: host)
    lines = CliRunner().invoke(cli.cli, ["plugins"]).output.splitlines()
    assert lines[0].split() == ["SCHEME", "PLUGIN", "DISTRIBUTION", "STATUS", "WHAT"]
    rows = [line.split(None, 4) for line in lines[1:]]
    assert ["mem", "a", "-", "conflict"] == rows[0][:4]
    assert ["mem", "b", "-", "conflict"] == rows[1][:4]
    assert rows[2][:4] == ["-", "gone", "-", "failed"] and "no_such_module_xyz" in rows[2][4]
    assert lines[-1] == "conflict: scheme 'mem' is claimed by a, b; it cannot be used"


def test_mount_flags_are_taken_from_the_options_and_default_to_nosuid_nodev() -> None:
    from erofs_mount_core import _mounts as mounts

    flags, rest = mounts.split_options({"layer": "1", "insecure": ""})
    assert flags == mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV and rest == {"layer": "1", "insecure": ""}
    flags, rest = mounts.split_options({"suid": "", "dev": "", "noexec": "", "ro": ""})
    assert flags == mounts.MS_RDONLY | mounts.MS_NOEXEC and rest == {}
    with pytest.raises(UsageError, match="read-only"):
        mounts.split_options({"rw": ""})
    with pytest.raises(UsageError, match="takes no value"):
        mounts.split_options({"nosuid": "1"})
