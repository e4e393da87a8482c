"""Chaos through the real nbd driver: hung daemons, racing commands, and kill -9 at random moments.

They run in the stock kernel's guest (the dead-connection timeout in both,
the stalled registry in the newer one's only, to balance the two runs).

The soak test runs ``EROFS_MOUNT_SOAK_CYCLES`` kill -9 cycles (10 by default;
``EROFS_MOUNT_SOAK_CYCLES=100 scripts/test -k soak`` for the long run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.imagetree import file_sha256
from tests.vm.conftest import EROFS_MOUNT, assert_clean, cli, daemon_pids, devices, records
from tests.vm.test_local_mount import Readers, daemon_pid, evict, kill_daemon, mount

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_system")]

SOAK_CYCLES = int(os.environ.get("EROFS_MOUNT_SOAK_CYCLES", "10"))


def held_read(path: Path) -> tuple[threading.Thread, list[str]]:
    """A reader of ``path`` on a thread of its own: its sha256, or the error, lands in the list."""
    got: list[str] = []

    def read() -> None:
        try:
            got.append(file_sha256(path))
        except OSError as exc:
            got.append(f"error: {exc}")

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, got


def test_reattach_force_ends_a_stopped_daemon_and_the_held_reads_complete(
        sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = sample
    device = mount(image, mountpoint)
    try:
        with Readers(mountpoint, sums, pause=0.05) as readers:
            readers.wait_for_reads(8)
            pid = daemon_pid(device)
            evict(mountpoint, device)
            os.kill(pid, signal.SIGSTOP)  # holds its lock, serves nothing
            time.sleep(1)
            left = cli("reattach", device).err.strip()  # a plain reattach leaves it: nothing to do, exit 0
            assert left == f"{device[5:]}: its daemon is alive and serving: nothing to do"
            forced = cli("reattach", "--force", str(mountpoint))  # a mountpoint names its device
            assert forced.out.strip() == device
            assert "does not answer its control socket" in forced.err and str(pid) in forced.err, forced
            readers.wait_for_reads(10)
            assert pid not in daemon_pids() and daemon_pid(device) != pid
        assert readers.errors == [] and readers.mismatches == []
        healthy = cli("reattach", "--force", device).err.strip()  # exit 0: nothing to do
        assert "answers and serves" in healthy and len(healthy.splitlines()) == 1, healthy
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


@pytest.mark.kernel(newer="only")  # in the newer kernel's guest, which has more room in its run
def test_reattach_force_ends_a_daemon_stuck_on_a_registry_that_stopped_mid_body(
        sample: tuple[Path, dict[str, str]], mountpoint: Path, tmp_path: Path) -> None:
    from tests.oci.faultproxy import FaultProxy
    from tests.oci.registry import EROFS_LAYER, Registry

    image, sums = sample
    registry = Registry(tmp_path / "registry")
    proxy = FaultProxy(registry.host)
    try:
        registry.push_image("chaos/app", "1", [(image.read_bytes(), EROFS_LAYER)])
        device = cli("mount", "--source", f"oci:{proxy.host}/chaos/app:1", "-o", "insecure",
                     str(mountpoint)).out.strip()
        try:
            rel = max(sums, key=lambda r: (mountpoint / r).stat().st_size)
            proxy.inject("blob", "stall")  # the next blob answer: half its body, then nothing
            reader, got = held_read(mountpoint / rel)
            deadline = time.monotonic() + 60
            while stats(device).get("oldest_request_seconds", 0) < 3:
                assert time.monotonic() < deadline, "the read never reached the stalled registry"
                time.sleep(0.2)
            assert reader.is_alive(), "the read waits on the stalled registry"
            forced = cli("reattach", "--force", "--stuck-after", "2", device)
            assert "has had a request in its hands" in forced.err, forced
            reader.join(90)  # the kernel sends an in-flight request again within its 30 s timer
            assert got == [sums[rel]]
            assert_files(mountpoint, sums)
        finally:
            cli("umount", str(mountpoint))
    finally:
        proxy.stop()
        registry.stop()
    assert_clean()


def test_two_reattaches_at_once_one_wins_the_other_says_so(sample: tuple[Path, dict[str, str]],
                                                           mountpoint: Path) -> None:
    image, sums = sample
    device = mount(image, mountpoint)
    try:
        for _ in range(2):
            evict(mountpoint, device)
            kill_daemon(device)
            results = run_at_once([["reattach", device], ["reattach", device]])
            assert all(r.returncode == 0 and r.stdout.strip() == device for r in results), results
            said = [r.stderr.strip() for r in results if r.stderr]  # the other found the winner's daemon
            assert said == [f"{device[5:]}: its daemon is alive and serving: nothing to do"], results
            assert len(daemon_pids()) == 1
            assert_files(mountpoint, sums)
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


def test_reattach_all_against_umount_ends_clean(sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, _sums = sample
    for _ in range(2):
        device = mount(image, mountpoint)
        evict(mountpoint, device)
        kill_daemon(device)
        results = run_at_once([["reattach", "--all"], ["umount", str(mountpoint)]])
        umount = results[1]
        assert umount.returncode == 0, results
        for r in results:
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 1, results
        deadline = time.monotonic() + 20
        while daemon_pids() or records():  # a daemon that reattached as umount ran ends with its device
            assert time.monotonic() < deadline, (daemon_pids(), records(), results)
            time.sleep(0.2)
        assert_clean()


def test_two_mounts_onto_one_mountpoint_at_once_one_wins_the_other_says_so(
        sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = sample
    results = run_at_once([["mount", "--source", f"local:{image}", str(mountpoint)]] * 2)
    try:
        won = [r for r in results if r.returncode == 0]
        assert len(won) == 1, results
        (lost,) = [r for r in results if r.returncode != 0]
        err = lost.stderr.strip()
        assert len(err.splitlines()) == 1 and "already a mountpoint" in err, results
        assert len(devices()) == 1 and len(daemon_pids()) == 1
        assert_files(mountpoint, sums)
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


@pytest.mark.timeout(900 + 60 * SOAK_CYCLES)
def test_soak_kill_at_random_moments_under_four_readers(sample: tuple[Path, dict[str, str]],
                                                        mountpoint: Path) -> None:
    image, sums = sample
    rng = random.Random(16)
    device = mount(image, mountpoint)
    moments = {"between requests": 0, "during a read burst": 0, "during reattach": 0}
    try:
        with Readers(mountpoint, sums, pause=0.02) as readers:
            readers.wait_for_reads(8)
            started = time.monotonic()
            for _ in range(SOAK_CYCLES):
                moment = rng.choice(sorted(moments))
                moments[moment] += 1
                if moment == "between requests":
                    evict(mountpoint, device)
                    kill_the_daemon()
                elif moment == "during a read burst":
                    evict(mountpoint, device)  # the readers now fetch from the daemon
                    time.sleep(rng.uniform(0, 0.5))
                    kill_the_daemon()
                else:  # the daemon that reattach starts is killed as soon as it shows
                    kill_the_daemon()
                    old = set(daemon_pids())
                    proc = subprocess.Popen([EROFS_MOUNT, "reattach", device], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)
                    deadline = time.monotonic() + 60
                    while not (set(daemon_pids()) - old) and proc.poll() is None:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                    time.sleep(rng.uniform(0, 0.3))
                    for pid in set(daemon_pids()) - old:
                        os.kill(pid, signal.SIGKILL)
                    _out, err = proc.communicate(timeout=120)
                    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
                    wait_until_no_daemon()
                reattach_until_served(device)
                assert len(daemon_pids()) == 1
            readers.wait_for_reads(10)  # reads sent to a killed daemon come back within the kernel's 30 s timer
            took = time.monotonic() - started
        print(f"soak: {SOAK_CYCLES} kill -9 cycles ({moments}) in {took:.0f} s; {readers.reads} reads, "
              f"{len(readers.errors)} errors, {len(readers.mismatches)} wrong")
        assert readers.errors == [] and readers.mismatches == []
        assert len(daemon_pids()) == 1
    finally:
        cli("umount", str(mountpoint))
    assert_clean()


# -- helpers ---------------------------------------------------------------------------------


def stats(device: str) -> dict[str, object]:
    return json.loads(cli("stats", device, "--json").out)["result"][device.removeprefix("/dev/")]


def assert_files(mountpoint: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert file_sha256(mountpoint / rel) == digest, rel


def run_at_once(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Start every command at the same moment; their results, in order."""
    procs = [subprocess.Popen([EROFS_MOUNT, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def kill_the_daemon() -> None:
    """SIGKILL the one daemon there is (found in /proc: no command has to start) and wait until it is gone."""
    (pid,) = daemon_pids()
    os.kill(pid, signal.SIGKILL)
    wait_until_no_daemon()


def wait_until_no_daemon(timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while daemon_pids():
        assert time.monotonic() < deadline, daemon_pids()
        time.sleep(0.02)


def reattach_until_served(device: str, attempts: int = 5) -> None:
    for _ in range(attempts):
        result = cli("reattach", device, check=False)
        if result.code == 0 or "alive" in result.err:
            return
        time.sleep(0.5)
    raise AssertionError(f"{device} was not reattached: {result}")


@pytest.mark.kernel(newer=True)
def test_past_the_dead_connection_timeout_reads_fail_and_a_later_reattach_restores_the_device(
        sample: tuple[Path, dict[str, str]], mountpoint: Path) -> None:
    image, sums = sample
    first, second = sorted(sums, key=lambda rel: -(image.parent / "tree" / rel).stat().st_size)[:2]
    device = mount(image, mountpoint, "--dead-timeout", "4")
    try:
        evict(mountpoint, device)
        kill_daemon(device)
        started = time.monotonic()
        reader, got = held_read(mountpoint / first)
        reader.join(60)
        waited = time.monotonic() - started
        assert got and got[0].startswith("error") and "Input/output error" in got[0], got
        assert 3 <= waited < 30, f"the read failed after {waited:.1f} s, the dead timeout is 4 s"
        started = time.monotonic()
        with pytest.raises(OSError, match="Input/output error"):
            file_sha256(mountpoint / second)
        at_once = time.monotonic() - started
        print(f"{os.uname().release}: a read held past the 4 s dead timeout failed after {waited:.1f} s, "
              f"the next read in {at_once:.2f} s")
        assert at_once < 2, "past the timeout the device fails reads at once"
        cli("reattach", device)
        assert_files(mountpoint, sums)
    finally:
        cli("umount", str(mountpoint))
    assert_clean()
