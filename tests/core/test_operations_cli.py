"""restart, watch, stats and metrics as a user meets them on a machine: one line per refusal.

Their work on real devices: tests/vm/test_operations.py. Here, the machine
has no nbd device (this host's kernel has no nbd driver).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))


def run(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [EROFS_MOUNT, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [("restart", "--all"), ("restart", "/dev/nbd0"), ("watch",), ("stats",),
                                  ("metrics",), ("list",), ("list", "--json")])
def test_each_needs_root_and_says_so_in_one_line(args: tuple[str, ...]) -> None:
    result = run(*args, user=65534)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"{args[0]} needs root" in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "said"), [
    (("cache", "list"), "using the cache /var/cache/erofs-mount needs root"),
    (("cache", "prune", "--max-size", "0"), "using the cache /var/cache/erofs-mount needs root"),
    (("systemd-units",), "writing units into /etc/systemd/system needs root"),
])
def test_the_cache_and_the_units_as_a_user_say_needs_root_in_one_line(args: tuple[str, ...], said: str,
                                                                       tmp_path: Path) -> None:
    """They once gave a PermissionError traceback, or (prune) 'removed 0 files' and success."""
    Path("/var/cache/erofs-mount").mkdir(mode=0o700, exist_ok=True)  # root's, as a first mount makes it
    result = run(*args, user=65534)
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and said in result.stderr and "Traceback" not in result.stderr


def test_with_no_device_attached() -> None:
    import json

    from prometheus_client.parser import text_string_to_metric_families

    assert run("stats").stdout == "no erofs-mount devices attached\n"
    assert json.loads(run("stats", "--json").stdout) == {"schema_version": 1, "command": "stats", "result": {}}
    families = list(text_string_to_metric_families(run("metrics").stdout))
    assert families and all(f.samples == [] for f in families)
    result = run("restart", "--all")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_usage_and_a_device_that_is_not_there_are_one_line() -> None:
    for args in (("restart",), ("restart", "/dev/nbd0", "--all"), ("restart", "/dev/sda"), ("stats", "/tmp")):
        result = run(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("Error:"), (args, result.stderr)


def test_watch_without_the_nbd_driver_is_one_line() -> None:
    result = run("watch")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: the kernel has no nbd driver: load it with 'modprobe nbd' "
        "(a kernel built with CONFIG_BLK_DEV_NBD is needed)"], result.stderr


def test_a_mountpoint_names_its_device_and_another_mountpoint_is_said_to_be_none() -> None:
    for command in ("reattach", "stats", "restart"):
        result = run(command, "/proc")  # a mountpoint, of no nbd device
        assert result.returncode != 0
        assert result.stderr.strip().splitlines() == ["Error: /proc is not an erofs-mount mountpoint"], result


def test_reattach_force_is_for_one_device() -> None:
    result = run("reattach", "--all", "--force")
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith("--force is for one DEVICE")


def test_version_names_the_core_and_every_installed_plugin() -> None:
    lines = run("--version").stdout.splitlines()
    assert lines[0].startswith("erofs-mount ")
    for name, dist in (("local", "erofs-mount-local"), ("oci", "erofs-mount-oci"), ("tar", "erofs-mount-tar")):
        assert any(line.startswith(f"  plugin {name}: {dist} ") for line in lines), lines


def test_a_plugin_name_misspelt_in_load_plugins_is_said_to_be_missing() -> None:
    import os

    result = subprocess.run([EROFS_MOUNT, "plugins"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "EROFS_MOUNT_LOAD_PLUGINS": "locl"})
    assert "no plugins installed" not in result.stdout
    assert "locl" in result.stdout and "no installed plugin has that name (installed: " in result.stdout
    assert ", local, " in result.stdout or "(installed: local, " in result.stdout


def test_a_plugin_s_documentation_is_plain_text_and_json_when_asked() -> None:
    import json

    text = run("plugins", "local").stdout
    assert "``" not in text and text.startswith("erofs-mount source local:PATH: ")
    document = json.loads(run("plugins", "local", "--json").stdout)
    assert (document["schema_version"], document["command"]) == (1, "plugins")
    shown = document["result"]
    assert shown["options"] == [] and shown["wraps_sources"] is False
    assert json.loads(run("plugins", "tar", "--json").stdout)["result"]["wraps_sources"] is True
    assert (shown["scheme"], shown["distribution"]) == ("local", "erofs-mount-local")
    assert shown["documentation"] == text.rstrip("\n")


def test_mount_takes_the_source_as_its_first_argument_and_says_what_a_source_looks_like(tmp_path: Path) -> None:
    """`mount /x.erofs mnt`, as mount(8) users type it: one line naming the form, not click's complaint."""
    result = run("mount", "/srv/app.erofs", str(tmp_path))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "Error: source '/srv/app.erofs' is not of the form SCHEME:LOCATION (for example local:/srv/app.erofs)"]
    for args in (("mount", str(tmp_path)), ("mount", "-s", "local:/a", "local:/b", str(tmp_path))):
        result = run(*args)
        assert result.returncode == 2 and "give SOURCE and MOUNTPOINT" in result.stderr, result


def test_dash_capital_v_is_the_version() -> None:
    assert run("-V").stdout == run("--version").stdout and run("-V").stdout.startswith("erofs-mount ")


def test_stack_lets_a_mount_past_the_mountpoint_check() -> None:
    """Over / (a mountpoint): refused, unless --stack, which goes on to the kernel's check and the source."""
    refused = run("mount", "local:/nonexistent.erofs", "/")
    assert refused.returncode == 2 and "already a mountpoint" in refused.stderr
    stacked = run("mount", "--stack", "local:/nonexistent.erofs", "/")
    assert stacked.returncode != 0 and "already a mountpoint" not in stacked.stderr
    assert stacked.stderr.count("\n") == 1, stacked.stderr


def test_mount_checks_the_kernel_before_it_reads_the_source(tmp_path: Path) -> None:
    """On a host without the nbd driver, a mount of an archive says so before indexing a byte of it."""
    if Path("/sys/module/nbd").exists():
        pytest.skip("this kernel has the nbd driver")
    archive = tmp_path / "a.tar"
    archive.write_bytes(bytes(10240))
    cache = tmp_path / "cache"
    result = subprocess.run([EROFS_MOUNT, "mount", f"tar:{archive}", str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "EROFS_MOUNT_CACHE_DIR": str(cache)})
    assert result.returncode == 3 and "nbd" in result.stderr, result.stderr
    assert not cache.exists(), "the archive was indexed before the kernel was asked"


@pytest.mark.parametrize(("args", "said"), [
    (("serve", "--source", "oci:UPPER/Case::bad@@", "--run", "true"), "has more than one '@'"),
    (("serve", "--source", "oci:reg.example/app@", "--run", "true"), "ends in '@' with no digest"),
    (("serve", "--source", "oci:reg.example/app", "-o", "layer=-1", "--run", "true"),
     "layer='-1': give a layer's index"),
    (("serve", "--source", "local:/x", "--run", ""), "give a command to run"),
    (("serve", "--source", "local:/x", "-o", "=x", "--run", "true"), "has no name"),
    (("serve", "--source", "local:/x", "-o", "nosuid", "--run", "true"), "-o nosuid: an option of mount"),
    (("serve", "--source", "oci:reg.example/app", "-o", "cache-mib=99999999999999999999", "--run", "true"),
     "cache-mib=99999999999999999999 is more than"),
    (("mount", "local:/x", "/tmp", "-o", "suid,nosuid"), "-o suid and -o nosuid say opposite things"),
    (("reattach", "--stuck-after", "5", "/dev/nbd0"), "--stuck-after goes with --force"),
])
def test_an_unclear_or_contradictory_call_is_one_line_that_says_why(args: tuple[str, ...], said: str) -> None:
    result = run(*args)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_an_empty_option_is_nothing(tmp_path: Path) -> None:
    image = tmp_path / "a.erofs"
    (tmp_path / "t").mkdir()
    subprocess.run(["mkfs.erofs", str(image), str(tmp_path / "t")], check=True, capture_output=True)
    result = run("serve", "-q", "--source", f"local:{image}", "-o", "", "--run", "true")
    assert result.returncode == 0, result.stderr


def test_a_path_that_is_not_utf8_is_printed_as_the_shell_quotes_it(tmp_path: Path) -> None:
    name = os.fsdecode(bytes(tmp_path) + b"/gone-\xff.erofs")
    result = subprocess.run([EROFS_MOUNT, "serve", "--source", f"local:{name}", "--run", "true"],
                            capture_output=True)
    assert result.returncode != 0
    line = result.stderr.decode()
    assert "\\udcff" not in line and "gone-\\xff.erofs'" in line and "$'" in line, line
