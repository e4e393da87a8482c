"""mount(8)'s helper, the -o names the core keeps, and the kernel log's word on expired devices.

What mount(8) passes to a helper was read from util-linux's mount on
Debian 12 (a helper that prints its argv): ``-o rw,...`` unless the line
says ``ro``, fstab's ``_netdev`` and ``nofail`` kept, ``x-*`` dropped.
The helper mounting for real is tests/vm/test_operations.py's fstab test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from erofs_mount_core import _mount_helper as helper
from erofs_mount_core._nbd import kernel_log
from erofs_mount_core._plugins import PluginHost
from tests.core.test_plugins import M, eps

HELPER = Path(sys.prefix) / "bin" / helper.NAME


def test_an_fstab_line_becomes_one_erofs_mount_command() -> None:
    argv = ["oci:reg.example/app@sha256:ab", "/mnt/app", "-o",
            "rw,nosuid,nodev,layer=0,_netdev,nofail,dead-timeout=600,connections=2,noexec"]
    assert helper._mount_command(argv) == [
        "mount", "oci:reg.example/app@sha256:ab", "/mnt/app", "--dead-timeout", "600", "--connections", "2",
        "-o", "nosuid,nodev,layer=0,noexec"]
    assert helper._mount_command(["local:/a b.erofs", "/mnt", "-v", "-t", "erofs-mount"]) == [
        "mount", "local:/a b.erofs", "/mnt"]
    assert helper._mount_command(["local:/x", "/mnt", "-f", "-o", "ro"]) is None, "-f: mount(8)'s fake mount"
    context = 'context="system_u:object_r:container_file_t:s0:c127,c456"'  # a comma inside quotes: one option
    assert helper._mount_command(["local:/x", "/mnt", "-o", f"rw,{context},noexec"]) == [
        "mount", "local:/x", "/mnt", "-o", f"{context},noexec"]


def test_a_quoted_value_keeps_its_commas() -> None:
    from erofs_mount_core._cli import _parse_options

    assert _parse_options(('nosuid,context="system_u:object_r:t:s0:c1,c2",layer=0',)) == {
        "nosuid": "", "context": "system_u:object_r:t:s0:c1,c2", "layer": "0"}


@pytest.mark.parametrize(("argv", "said"), [
    (["local:/x"], "give SOURCE and DIR"),
    (["local:/x", "/mnt", "-N", "/proc/1/ns/mnt"], "-N"),
    (["local:/x", "/mnt", "-w"], "read-only"),
    (["local:/x", "/mnt", "-t", "ext4"], "erofs-mount only"),
    (["local:/x", "/mnt", "-q"], "option -q not recognized"),
    (["local:/x", "/mnt", "-o", "connections=abc"], "-o connections=abc: connections takes a whole number from 1"),
    (["local:/x", "/mnt", "-o", "dead-timeout=-1"], "-o dead-timeout=-1: dead-timeout takes a whole number"),
    (["local:/x", "/mnt", "-o", "block-size=3000"], "block-size takes one of 512, 1024, 2048, 4096"),
])
def test_what_the_helper_cannot_do_is_one_line_and_exit_2(argv: list[str], said: str) -> None:
    result = subprocess.run([str(HELPER), *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ") and said in line, line


def test_the_helper_has_its_own_help_and_usage() -> None:
    for flag in ("--help", "-h"):
        result = subprocess.run([str(HELPER), flag], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.startswith(f"Usage: {helper.NAME} SOURCE DIR [-sfnvr]")
        assert "connections=N" in result.stdout and "-w, -N" in result.stdout
    result = subprocess.run([str(HELPER), "local:/x"], capture_output=True, text=True, timeout=60)
    assert "[-sfnvr]" in result.stderr and f"{helper.NAME} --help" in result.stderr
    assert helper._mount_command(["local:/x", "/mnt", "-r", "-s", "-n", "-v"]) == ["mount", "local:/x", "/mnt"]


def test_the_helper_reaches_the_mount_command_with_its_errors(tmp_path: Path) -> None:
    """As a user: the mount command's own one-line errors come back through the helper."""
    for spec, target, said in [
        ("/srv/app.erofs", tmp_path, "Error: source '/srv/app.erofs' is not of the form SCHEME:LOCATION "
                                     "(for example local:/srv/app.erofs)"),
        ("local:/srv/app.erofs", Path("/"), "Error: / is already a mountpoint: unmount it first, mount elsewhere, "
                                            "or mount over it with --stack"),
    ]:
        result = subprocess.run([str(HELPER), spec, str(target), "-o", "rw,_netdev"],
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stdout, result.stderr.splitlines()) == (2, "", [said])


def test_a_plugin_declaring_a_mount_flag_as_its_option_fails_to_load_saying_which() -> None:
    host = PluginHost(eps(bad=f"{M}:claims_a_mount_flag", ok=f"{M}:declares_options"))
    bad, ok = sorted(host.plugins, key=lambda i: i.name)
    assert bad.status == "failed" and host.schemes() == ["mem"]
    assert str(bad.error) == ("PluginError: scheme 'flagged': source option(s) _netdev, noexec clash with "
                              "mount(8)'s or erofs-mount's own -o names; rename them")
    assert ok.options == {"mem": ["size", "tag"]}


@pytest.mark.parametrize(("record", "found"), [
    (b"4,1432,5120345678,-;block nbd3: shutting down sockets\n SUBSYSTEM=block\n DEVICE=b43:48\n",
     (3, 5120.345678, "shutting down sockets")),
    (b"6,1431,5120345600,-;block nbd3: NBD_DISCONNECT\n", (3, 5120.3456, "NBD_DISCONNECT")),
    (b"3,1433,5120345679,-;block nbd3: Dead connection, failed to find a fallback\n", None),
    (b"4,1434,99,-;block nbd12: shutting down sockets", (12, 0.000099, "shutting down sockets")),
    (b"4,1435,99,-;sd 0:0:0:0: shutting down sockets", None),
])
def test_the_kernel_log_names_a_device_expired_or_disconnected(record: bytes, found: object) -> None:
    """The lines as 6.1 and 6.12 write them (seen in the kernel tests' guests)."""
    assert kernel_log.parse(record) == found


def test_reading_the_kernel_log_never_fails() -> None:
    assert isinstance(kernel_log.said(), dict)  # this host's /dev/kmsg, or none at all


def test_a_user_running_the_helper_is_refused_in_one_line(tmp_path: Path) -> None:
    """mount(8) runs a helper with the user's own privileges for an fstab line marked ``user``."""
    tmp_path.chmod(0o755)
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(HELPER),
                             "local:/srv/app.erofs", str(tmp_path), "-o", "rw,user"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == ["Error: mount needs root (CAP_SYS_ADMIN): run it as root"]
