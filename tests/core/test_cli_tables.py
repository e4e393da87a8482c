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
from erofs_mount_core import _listing as listing
from erofs_mount_core import _plugins as plugins
from tests.core.test_plugins import M, eps


def row(device: str | None, **fields: object) -> dict[str, object]:
    return {**listing._blank_row(device, None), **fields}


ROWS = [
    row("/dev/nbd0", state="serving", mountpoints=["/mnt/app"], mount_options="ro,nosuid,nodev",
        source="oci:reg:5000/app:1.4", serving="reg:5000/app:1.4#sha256:ab12", daemon_pid=1234, size=64 << 20,
        since="2026-11-29T10:00:00+00:00", connections=4, dead_timeout=86400,
        record="/run/erofs-mount/nbd-a.toml", read_bytes=3 << 20,
        last_error="read of 4096 bytes at 0 failed: registry answered 503"),
    row("/dev/nbd1", state="dead", source="local:/srv/a b.erofs", serving="/srv/a b.erofs", daemon_pid=99,
        size=1 << 20, connections=1, dead_timeout=600, record="/run/erofs-mount/nbd-b.toml",
        why="its daemon is gone: reads wait (up to 600 s) until a reattach",
        reattach_command="erofs-mount reattach /dev/nbd1"),
    row("/dev/nbd12", state="other", record="/elsewhere", why="not attached by erofs-mount"),
    row(None, state="detached", record="/run/erofs-mount/nbd-c.toml", why="its device was disconnected"),
]


def test_columns_line_up_and_each_state_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "list_devices", lambda: ROWS)
    lines = CliRunner().invoke(cli.cli, ["list"]).output.splitlines()
    header = ["DEVICE", "STATE", "SIZE", "SINCE", "CONN", "TIMEOUT", "SERVED", "MOUNTPOINT", "SOURCE"]
    assert lines[0].split() == header
    assert lines[1].split()[:8] == ["/dev/nbd0", "serving", "64.0", "MiB", "2026-11-29T10:00:00Z", "4", "86400s", "3.0"]
    assert "oci:reg:5000/app:1.4 = reg:5000/app:1.4#sha256:ab12" in lines[1]
    assert "local:/srv/a b.erofs" in lines[2] and "= /srv/a b.erofs" not in lines[2]
    assert lines[3].split()[:2] == ["/dev/nbd12", "other"] and lines[4].split()[:2] == ["-", "detached"]
    for column in header[1:]:
        at = lines[0].index(column)
        assert all(line[at - 2:at] == "  " and line[at] != " " for line in lines[1:5]), column
    assert "/run/erofs-mount" not in "\n".join(lines[:5]), "the record path is for --wide"
    assert lines[5:] == [
        "/dev/nbd0: last error: read of 4096 bytes at 0 failed: registry answered 503",
        "/dev/nbd1: dead: its daemon is gone: reads wait (up to 600 s) until a reattach "
        "(run: erofs-mount reattach /dev/nbd1)",
        "/dev/nbd12: other: not attached by erofs-mount",
        "/run/erofs-mount/nbd-c.toml: detached: its device was disconnected",
    ]


def test_wide_adds_flags_pid_and_record(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "list_devices", lambda: ROWS)
    lines = CliRunner().invoke(cli.cli, ["list", "--wide"]).output.splitlines()
    assert lines[0].split()[-4:] == ["FLAGS", "PID", "RECORD", "SOURCE"]
    assert "ro,nosuid,nodev  1234  /run/erofs-mount/nbd-a.toml  oci:reg:5000/app:1.4" in lines[1]


def test_list_json_is_the_rows_in_the_versioned_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setattr(listing, "list_devices", lambda: ROWS)
    document = json.loads(CliRunner().invoke(cli.cli, ["list", "--json"]).output)
    assert document == {"schema_version": 1, "command": "list", "result": ROWS}


def test_nothing_attached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listing, "list_devices", lambda: [])
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

    given, rest = mounts.split_options({"layer": "1", "insecure": ""})
    assert given.flags == mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV and given.data == ""
    assert rest == {"layer": "1", "insecure": ""}
    given, rest = mounts.split_options({"suid": "", "dev": "", "noexec": "", "ro": ""})
    assert given.flags == mounts.MS_RDONLY | mounts.MS_NOEXEC and rest == {}
    given, rest = mounts.split_options({"context": "system_u:object_r:container_file_t:s0", "fill": ""})
    assert given.data == "context=system_u:object_r:container_file_t:s0" and rest == {"fill": ""}
    with pytest.raises(UsageError, match="needs a value"):
        mounts.split_options({"context": ""})
    with pytest.raises(UsageError, match="read-only"):
        mounts.split_options({"rw": ""})
    with pytest.raises(UsageError, match="takes no value"):
        mounts.split_options({"nosuid": "1"})


def test_reattach_all_exits_with_the_code_its_failures_share_or_1(monkeypatch: pytest.MonkeyPatch) -> None:
    from erofs_mount_core._errors import KernelError, SourceChangedError

    def outcomes(*errors: Exception | None) -> None:
        monkeypatch.setattr(lifecycle, "reattach_all", lambda: [
            lifecycle.Reattached(i, error) for i, error in enumerate(errors)])

    changed = SourceChangedError("local:/a.erofs is no longer the image that was mounted")
    outcomes(None, changed)
    result = CliRunner().invoke(cli.cli, ["reattach", "--all"])
    assert result.exit_code == 4 and result.stdout == "/dev/nbd0\n", "as 'reattach DEV' would for that device"
    assert result.stderr == f"Error: /dev/nbd1: {changed}\n"
    outcomes(changed, KernelError("the kernel said no"))
    assert CliRunner().invoke(cli.cli, ["reattach", "--all"]).exit_code == 1
    outcomes(None)
    import json

    result = CliRunner().invoke(cli.cli, ["reattach", "--all", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == {
        "schema_version": 1, "command": "reattach",
        "result": [{"device": "/dev/nbd0", "reattached": True, "error": None, "exit_code": None,
                    "next_attempt_in": None}]}
