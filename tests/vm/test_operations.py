"""Operations on live devices through the real nbd driver: hot restart, watch, stats and metrics.

What they check does not differ between kernels (file descriptors handed
between processes, the LINK_DEAD multicast both series send), so they run in
the newer kernel's guest only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.imagetree import file_sha256
from tests.vm.conftest import EROFS_MOUNT, RUN_DIR, cli, daemon_pids, devices
from tests.vm.test_local_mount import Readers, daemon_pid, evict, largest, mount

pytestmark = [pytest.mark.kernel(newer="only"), pytest.mark.usefixtures("clean_system")]


def stats(device: str) -> dict[str, object]:
    return json.loads(cli("stats", device, "--json").out)["result"][device.removeprefix("/dev/")]


def served(devs: list[str]) -> dict[str, tuple[int, int]]:
    """Each device's daemon pid and bytes served, asked as ``list`` asks (the record's daemon, over its
    control socket) without starting a command: each costs seconds in the emulated guest."""
    from erofs_mount_core._control import ask_stats

    found = {}
    for d in devs:
        counts = ask_stats(Path(Path(f"/sys/block/{d.removeprefix('/dev/')}/backend").read_text().strip()))
        found[d] = (daemon_pid(d), int(counts["read_bytes"]))
    return found


@pytest.mark.timeout(900)
def test_restart_all_under_readers_five_times_fails_no_read(sample: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    image, sums = sample
    points = [tmp_path / "a", tmp_path / "b"]
    for p in points:
        p.mkdir()
    devs = [mount(image, p) for p in points]
    try:
        readers = [Readers(p, sums, count=2, pause=0.1) for p in points]  # four, leaving the CPUs some room
        for r in readers:
            r.__enter__()
        try:
            for r in readers:
                r.wait_for_reads(4)
            after = served(devs)
            for cycle in range(5):
                before = after
                out = cli("restart", "--all").out
                after = served(devs)
                for d in devs:
                    assert f"{d}: daemon {before[d][0]} -> {after[d][0]}" in out
                    assert after[d][0] != before[d][0], f"cycle {cycle}: {d} kept its daemon"
                    assert after[d][1] >= before[d][1], "the counts go on across a restart"
                assert sorted(daemon_pids()) == sorted(pid for pid, _ in after.values()), "one daemon per device"
                for r in readers:
                    r.wait_for_reads(2)
        finally:
            for r in readers:
                r.__exit__()
        assert [r.errors for r in readers] == [[], []] and [r.mismatches for r in readers] == [[], []]
        print(f"reads during five restarts: {sum(r.reads for r in readers)}")
    finally:
        for p in points:
            cli("umount", str(p))


def settled(device: str, timeout: float = 60) -> dict[str, object]:
    """The device's counts once nothing else reads it (the mount's and udev's probes are done)."""
    deadline = time.monotonic() + timeout
    last = stats(device)
    while time.monotonic() < deadline:
        time.sleep(1)
        now = stats(device)
        if now["requests"] == last["requests"]:
            return now
        last = now
    raise AssertionError(f"{device} is still being read: {last}")


def test_counters_count_what_was_read_and_the_metrics_parse(sample: tuple[Path, dict[str, str]],
                                                           mountpoint: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    image, _sums = sample
    device = mount(image, mountpoint)
    try:
        before = settled(device)
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 64 << 10)
            for n in range(16):
                assert os.preadv(fd, [buf], n * (64 << 10)) == 64 << 10
        finally:
            os.close(fd)
        after = stats(device)
        assert after["read_bytes"] - before["read_bytes"] == 1 << 20
        reads = after["requests"]["read"] - before["requests"]["read"]
        assert 16 <= reads <= 256, "the kernel may split a 64 KiB read, never merge O_DIRECT ones"
        assert sum(after["latency"]["counts"]) == sum(after["requests"].values())
        assert after["errors"] == 0 and after["last_error"] is None
        (row,) = devices()
        assert row["read_bytes"] >= 1 << 20 and row["last_error"] is None
        families = {f.name: f for f in text_string_to_metric_families(cli("metrics").out)}
        name = device.removeprefix("/dev/")
        (served,) = [s.value for s in families["erofs_mount_read_bytes"].samples if s.labels["device"] == name]
        assert served >= after["read_bytes"]
        assert [s.value for s in families["erofs_mount_daemon_up"].samples] == [1]
        text = cli("stats").out
        assert text.startswith(f"{device}: daemon {daemon_pid(device)}, 1 connection(s)") and "latency: mean" in text
    finally:
        cli("umount", str(mountpoint))


class Watch:
    """``erofs-mount watch`` in the background, its log in a file."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.proc = subprocess.Popen([EROFS_MOUNT, "watch"], stdout=subprocess.DEVNULL,
                                         stderr=stderr, start_new_session=True)
        self.wait_for("watching nbd devices")

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not self.lines(text):
            assert self.proc.poll() is None, f"watch exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"no {text!r} in: {self.log.read_text()}"
            time.sleep(0.05)
        return self.lines(text)[-1]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


@pytest.mark.timeout(600)
def test_watch_reattaches_at_once_and_backs_off_a_device_it_cannot(sample: tuple[Path, dict[str, str]],
                                                                    tmp_path: Path) -> None:
    image, sums = sample
    good, lost = tmp_path / "good", tmp_path / "lost"
    good.mkdir()
    lost.mkdir()
    watch = Watch(tmp_path / "watch.log")
    try:
        device = mount(image, good)
        rel = largest(good, sums)
        for attempt in range(2):  # the second time, the daemon killed is one watch forked
            evict(good, device)
            old = daemon_pid(device)
            killed = time.monotonic()
            os.kill(old, signal.SIGKILL)
            while Path(f"/proc/{old}").exists():  # a read sent to a dying daemon waits for the kernel's 30 s check
                time.sleep(0.001)
            with open(good / rel, "rb") as f:  # waits in the kernel until a daemon serves the device again
                assert f.read(4096)
            took = time.monotonic() - killed
            assert file_sha256(good / rel) == sums[rel]
            new = daemon_pid(device)
            assert new != old and daemon_pids() == [new]
            print(f"kill -9 to a held read completing, attempt {attempt + 1}: {took:.2f} s "
                  f"({watch.wait_for('reattached').split(': ', 1)[1]})")

        stopped = daemon_pid(device)  # a daemon that hangs: watch's probe (every 30 s) replaces it
        evict(good, device)
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        assert file_sha256(good / rel) == sums[rel]
        took = time.monotonic() - started
        line = watch.wait_for(f"{device[5:]}: its daemon (pid {stopped})")
        assert "does not answer its control socket" in line and "ending it" in line, line
        assert stopped not in daemon_pids() and len(daemon_pids()) == 1
        print(f"SIGSTOP to a held read completing through watch's probe: {took:.1f} s")

        other = mount(image, lost)
        (row,) = [d for d in devices() if d["device"] == other]
        (RUN_DIR / Path(str(row["record"])).name).unlink()
        os.kill(int(row["daemon_pid"]), signal.SIGKILL)
        watch.wait_for(f"{other[5:]}: reattach failed")
        time.sleep(12)  # attempts at 0 and 10 s; the next is due at 30 s
        failures = watch.lines(f"{other[5:]}: reattach failed")
        assert len(failures) == 2, failures
        assert "next attempt in 10 s" in failures[0] and "next attempt in 20 s" in failures[1]
        assert watch.proc.poll() is None
    finally:
        watch.stop()
        for p in (good, lost):
            if any(d["mountpoints"] == [str(p)] for d in devices()):
                cli("umount", str(p))
    assert daemon_pids() == []
