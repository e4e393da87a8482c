#!/usr/bin/python3
"""Time from kill -9 of a daemon to a held read completing: ``watch`` against a reattach by hand.

A read of a file whose blocks are not cached is started as soon as the
killed daemon is gone, so it waits in the kernel for a new daemon. ``watch``
reattaches on the kernel's LINK_DEAD event with a daemon forked from itself;
the peer is what an operator's script or the timer unit runs, ``erofs-mount
reattach DEVICE`` started at the moment of the kill (a new interpreter that
loads the plugins, then forks the daemon). Runs of the two alternate; prints
each one's median and the ratio.

Needs the nbd driver: where this machine's kernel has none, the benchmark
runs itself in the test VM (tests/vm/vm-run, emulated: expect seconds, not
the fraction of a second of real hardware).

    .venv/bin/python benches/reattach_latency.py [--runs 5]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EROFS_MOUNT = str(ROOT / ".venv" / "bin" / "erofs-mount")
VM_RUN = ROOT / "tests" / "vm" / "vm-run"
BLKFLSBUF = 0x1261


def have_nbd() -> bool:
    return subprocess.run(["modprobe", "nbd"], capture_output=True).returncode == 0 and Path("/dev/nbd0").exists()


def cli(*args: str) -> str:
    return subprocess.run([EROFS_MOUNT, *args], check=True, capture_output=True, text=True).stdout


def daemon_pid(device: str) -> int:
    (row,) = [r for r in json.loads(cli("list", "--json"))["result"] if r["device"] == device]
    return int(row["daemon_pid"])


def evict(path: Path, device: str) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    fd = os.open(device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    finally:
        os.close(fd)


def held_read(path: Path, device: str, by_hand: bool) -> float:
    """Seconds from the kill to the read's last byte."""
    evict(path, device)
    pid = daemon_pid(device)
    start = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    helper = subprocess.Popen([EROFS_MOUNT, "reattach", device], stdout=subprocess.DEVNULL) if by_hand else None
    # read once the daemon is gone: a request sent while it was dying is lost with it, and the kernel
    # sends it again only at its next check of stuck requests (every 30 s), whoever reattaches
    while Path(f"/proc/{pid}").exists():
        time.sleep(0.001)
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    took = time.perf_counter() - start
    if helper is not None:
        helper.wait(120)
    return took


def wait_for_a_new_daemon(device: str, old: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if daemon_pid(device) != old:
                return
        except (subprocess.CalledProcessError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"{device} was not reattached")


def bench(runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "tree").mkdir()
        (base / "tree" / "data").write_bytes(random.Random(1).randbytes(4 << 20))
        subprocess.run(["mkfs.erofs", "--quiet", str(base / "image.erofs"), str(base / "tree")], check=True)
        (base / "mnt").mkdir()
        device = cli("mount", "--source", f"local:{base / 'image.erofs'}", str(base / "mnt")).strip()
        watch = subprocess.Popen([EROFS_MOUNT, "watch"], stderr=subprocess.DEVNULL)
        times: dict[str, list[float]] = {"watch": [], "reattach by hand": []}
        try:
            time.sleep(2)  # watch is listening
            for _ in range(runs):
                for name in times:
                    by_hand = name != "watch"
                    if by_hand:
                        watch.send_signal(signal.SIGSTOP)  # the peer alone: watch must not race it
                    old = daemon_pid(device)
                    times[name].append(held_read(base / "mnt" / "data", device, by_hand))
                    wait_for_a_new_daemon(device, old)
                    if by_hand:
                        watch.send_signal(signal.SIGCONT)
        finally:
            watch.send_signal(signal.SIGCONT)
            watch.terminate()
            watch.wait(30)
            cli("umount", str(base / "mnt"))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"kill -9 to a held 4 MiB read completing, median of {runs} ({os.uname().release}):")
    for name, median in medians.items():
        print(f"  {name:18} {median:7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"  ratio watch / by hand: {medians['watch'] / medians['reattach by hand']:.2f} (lower is better)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run it as root: it mounts")
    if not have_nbd():
        if os.environ.get("VMTEST_GUEST") == "1":
            raise SystemExit("no nbd driver in the guest either")
        print("this kernel has no nbd driver: running in the test VM (emulated)", file=sys.stderr)
        sys.exit(subprocess.run([str(VM_RUN), "--timeout", "1200", "--", sys.executable, __file__,
                                 "--runs", str(args.runs)]).returncode)
    bench(args.runs)


if __name__ == "__main__":
    main()
