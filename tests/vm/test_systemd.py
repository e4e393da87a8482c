"""Daemons under systemd as PID 1: each in a service of its own, outliving the service that mounted.

These run in the guest that boots systemd (``vm-run --systemd``): the units
are real, started through systemd's private socket as on any systemd
machine without a D-Bus daemon. That boot reaches no ``sysinit.target``, so
the units the test installs have no default dependencies (a drop-in for the
shipped watch unit says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.imagetree import file_sha256
from tests.vm.conftest import EROFS_MOUNT, RUN_DIR, cli, daemon_pids, devices
from tests.vm.test_local_mount import Readers, daemon_pid, evict, largest

pytestmark = [pytest.mark.kernel(systemd=True), pytest.mark.usefixtures("clean_system")]

UNITS = Path("/run/systemd/system")
APP = "app-images.service"
WATCH = "erofs-mount-watch.service"


def systemctl(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["systemctl", "--no-pager", *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"systemctl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def unit_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().rpartition("/")[2]


def journal(unit: str) -> list[dict[str, str]]:
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", "-u", unit], capture_output=True,
                         text=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines()]


def wait_for_service_daemon(device: str, old: int, timeout: float = 120) -> int:
    """The device's daemon once it is not ``old`` and runs in a service of its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = next(d for d in devices() if d["device"] == device)
        pid = row["daemon_pid"]
        if row["state"] == "serving" and pid not in (None, old):
            with contextlib.suppress(OSError):
                if unit_of(int(pid)).startswith("erofs-mountd-"):
                    return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"{device} has no new daemon in a service of its own after {timeout:.0f} s")


def wait_for_journal(unit: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in e.get("MESSAGE", "") for e in journal(unit)):
        assert time.monotonic() < deadline, f"{unit} did not log {text!r}"
        time.sleep(0.2)


def install(name: str, text: str) -> None:
    (UNITS / name).write_text(text)
    systemctl("daemon-reload")


@pytest.mark.timeout(900)
def test_daemons_outlive_the_service_that_mounted_and_watch_reattaches_in_services(
        sample: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    assert (UNITS).is_dir() and Path("/proc/1/comm").read_text().strip() == "systemd"
    image, sums = sample
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # the watch unit as `erofs-mount systemd-units` writes it, running this tree's command
    cli("systemd-units", "--into", str(UNITS))
    (UNITS / f"{WATCH}.d").mkdir(exist_ok=True)
    (UNITS / f"{WATCH}.d" / "vm.conf").write_text("[Unit]\nDefaultDependencies=no\n")
    # an application's oneshot that mounts its image, as a user writes one
    install(APP, f"[Unit]\nDefaultDependencies=no\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
                 f"ExecStart={EROFS_MOUNT} mount --source local:{image} {mnt}\n")
    try:
        systemctl("start", APP)
        (row,) = devices()
        device, pid = str(row["device"]), int(row["daemon_pid"])

        # the daemon is the main process of a service of its own, not in the app's
        unit = unit_of(pid)
        assert unit.startswith("erofs-mountd-") and unit.endswith(".service"), unit
        show = dict(line.split("=", 1) for line in systemctl("show", unit, "-p", "MainPID", "-p", "Type",
                                                             "-p", "WatchdogUSec", "-p", "ActiveState").split())
        assert show == {"MainPID": str(pid), "Type": "notify", "WatchdogUSec": "30s", "ActiveState": "active"}
        assert json.loads(cli("stats", device, "--json").out)["result"][device[5:]]["unit"] == unit
        # its log is the journal's, with priorities, and no log file is kept
        lines = [e for e in journal(unit) if "serving " + device[5:] in e.get("MESSAGE", "")]
        assert lines and lines[0]["PRIORITY"] == "6" and lines[0]["SYSLOG_IDENTIFIER"] == "erofs-mountd", lines
        assert not list(RUN_DIR.glob("*.log"))

        # the service that mounted stops: its cgroup is killed, the daemon is not in it
        systemctl("stop", APP)
        assert systemctl("show", APP, "-p", "ActiveState").strip() == "ActiveState=inactive"
        assert daemon_pids() == [pid]
        for rel, digest in sums.items():
            assert file_sha256(mnt / rel) == digest, rel

        systemctl("start", WATCH)
        wait_for_journal(WATCH, "watching nbd devices")
        # kill -9: the watch service reattaches it with no command run: a held read completes
        # (served by a daemon forked from watch), then a daemon in a new service takes the device over
        rel = largest(mnt, sums)
        evict(mnt, device)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists():  # a read sent to a dying daemon waits for the kernel's 30 s check
            time.sleep(0.001)
        with open(mnt / rel, "rb") as f:
            assert f.read(4096)
        print(f"kill -9 to a held read completing: {time.monotonic() - killed:.2f} s")
        new = wait_for_service_daemon(device, pid)
        print(f"kill -9 to a daemon in a service of its own: {time.monotonic() - killed:.2f} s")
        assert unit_of(new) != unit
        wait_for_journal(WATCH, f"{device[5:]}: moved to a daemon in a service of its own")
        # the killed daemon could say nothing: its service's stop command said which command brings it back
        wait_for_journal(unit, "if its device is still attached, its reads wait until erofs-mount reattach --all")
        (said,) = [e["MESSAGE"] for e in journal(unit) if "reattach --all" in e.get("MESSAGE", "")]
        assert said.startswith("the daemon ended (signal: killed "), said

        with Readers(mnt, sums, count=2, pause=0.05) as readers:
            readers.wait_for_reads(4)
            # a daemon that stops answering (SIGSTOP) misses its watchdog pings: systemd ends it, watch reattaches
            stopped, frozen = new, time.monotonic()
            os.kill(stopped, signal.SIGSTOP)
            new = wait_for_service_daemon(device, stopped, timeout=180)
            assert not Path(f"/proc/{stopped}").exists()
            print(f"a frozen daemon replaced after {time.monotonic() - frozen:.0f} s (watchdog 30 s)")
            readers.wait_for_reads(4)

            # restart hands the device to a daemon in a new service; the old service ends
            old_unit = unit_of(new)
            cli("restart", device)
            newest = daemon_pid(device)
            assert newest != new and unit_of(newest) != old_unit
            assert systemctl("show", old_unit, "-p", "ActiveState").strip() != "ActiveState=active"
            readers.wait_for_reads(4)
        assert readers.errors == [] and readers.mismatches == []
        for rel, digest in sums.items():
            assert file_sha256(mnt / rel) == digest, rel
        assert daemon_pids() == [newest]
        watch_log = [e["MESSAGE"] for e in journal(WATCH)]
        assert any(f"{device[5:]}: reattached" in m for m in watch_log), watch_log

        cli("umount", str(mnt))
        time.sleep(0.5)
        assert not systemctl("list-units", "--all", "--plain", "--no-legend", "erofs-mountd-*").strip()
    finally:
        systemctl("stop", WATCH, APP, check=False)
        if any(d["mountpoints"] == [str(mnt)] for d in devices()):
            cli("umount", str(mnt), check=False)
