#!/usr/bin/python3
"""Reattach and re-mount of a registry image of thousands of files, against a local image of the same files.

The image is real files from this machine (/usr, --mib MiB, a few thousand
entries, as a Debian root filesystem has) in --layers layers (gzip, the
last one zstd; default 3) on Debian's docker-registry on loopback; the peer is the same files
made into one EROFS image by mkfs.erofs and mounted with ``local:``. Once
the registry image's layers are indexed (a first mount, not timed), runs
alternate, and each prints its median:

1. kill -9 of the daemon to a held read completing, ``erofs-mount reattach
   DEVICE`` started at the kill: the oci image against the local one (the
   merged layout is loaded from the cache, not merged again);
2. ``erofs-mount mount`` of the oci image with its indexes cached, and the
   share of it that the second open takes (the daemon rebuilds the source
   from the record, as every reattach does): one ``open_reference`` and one
   reopen from its state, timed in one process.

Needs the nbd driver: where this machine's kernel has none, the benchmark
runs itself in the test VM (tests/vm/vm-run, emulated: expect seconds).

    .venv/bin/python benches/reattach_images.py [--runs 5] [--mib 64] [--layers 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benches.oci_images import layer, push, real_files  # noqa: E402
from benches.reattach_latency import EROFS_MOUNT, VM_RUN, cli, have_nbd, held_read, wait_for_a_new_daemon  # noqa: E402
from tests.oci.registry import Registry  # noqa: E402


def reattach_by_hand(mnt: Path, device: str, probe: str) -> float:
    old = int(next(r for r in _rows() if r["device"] == device)["daemon_pid"])
    took = held_read(mnt / probe, device, by_hand=True)
    wait_for_a_new_daemon(device, old)
    return took


def _rows() -> list[dict]:
    import json

    return json.loads(cli("list", "--json"))["result"]


def timed_mount(reference: str, mnt: Path) -> tuple[float, str]:
    start = time.perf_counter()
    device = cli("mount", "--source", f"oci:{reference}", "-o", "insecure", str(mnt)).strip()
    return time.perf_counter() - start, device


def open_and_reopen(reference: str) -> tuple[float, float]:
    """Seconds of the command's open and of the daemon's reopen from the state, in this process."""
    from erofs_mount_oci import open_reference, reopen

    start = time.perf_counter()
    source = open_reference(reference, {"insecure": ""})
    opened = time.perf_counter() - start
    state = source.state()
    source.close()
    start = time.perf_counter()
    reopen(state).close()
    return opened, time.perf_counter() - start


def bench(runs: int, mib: int, count: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="erofs-mount-bench-"))
    os.environ["EROFS_MOUNT_CACHE_DIR"] = str(work / "cache")
    registry = Registry(work / "registry")
    mounted: list[Path] = []
    try:
        files = real_files(mib)
        probe = max((f for f in files if os.path.isfile("/" + f) and not os.path.islink("/" + f)
                     and os.path.getsize("/" + f) <= 4 << 20), key=lambda f: os.path.getsize("/" + f))
        cuts = [0, *(len(files) * (100 - 40 // 2 ** i) // 100 for i in range(count - 1)), len(files)]
        layers = [layer(work, f"l{i}", files[cuts[i]:cuts[i + 1]], "zstd" if i == count - 1 else "gzip")
                  for i in range(count)]
        push(registry, "bench/rootfs", layers)
        reference = f"{registry.host}/bench/rootfs:v1"
        tree = work / "tree"
        tree.mkdir()
        for blob, media, _ in layers:
            how = "zstd -dc" if media.endswith("zstd") else "gzip -dc"
            subprocess.run(f"{how} | tar -x -C {tree}", shell=True, input=blob, check=True)
        subprocess.run(["mkfs.erofs", "--quiet", str(work / "local.erofs"), str(tree)], check=True)
        sizes = ", ".join(f"{len(b) / 2**20:.1f} MiB" for b, _, _ in layers)
        print(f"{len(files)} files, {mib} MiB, {count} layers ({sizes} compressed); probe {probe} "
              f"({os.path.getsize('/' + probe) >> 10} KiB); kernel {os.uname().release}", flush=True)

        local_mnt, oci_mnt = work / "local", work / "oci"
        local_mnt.mkdir()
        oci_mnt.mkdir()
        local = cli("mount", "--source", f"local:{work / 'local.erofs'}", str(local_mnt)).strip()
        mounted.append(local_mnt)
        start = time.perf_counter()
        _, oci = timed_mount(reference, oci_mnt)  # indexes every layer: not compared
        mounted.append(oci_mnt)
        print(f"first mount (layers downloaded and indexed): {time.perf_counter() - start:.1f} s", flush=True)

        times: dict[str, list[float]] = {"local": [], "oci": []}
        for _ in range(runs):
            times["local"].append(reattach_by_hand(local_mnt, local, probe))
            times["oci"].append(reattach_by_hand(oci_mnt, oci, probe))
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"1. kill -9 to a held read of the probe completing, `erofs-mount reattach` by hand, median of {runs}:")
        for name, median in medians.items():
            print(f"   {name:6} {median:6.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times[name])})")
        print(f"   ratio oci / local: {medians['oci'] / medians['local']:.2f} (goal <= 2)")

        cli("umount", str(oci_mnt))
        mounted.remove(oci_mnt)
        mounts, opens, reopens = [], [], []
        for _ in range(runs):
            took, _ = timed_mount(reference, oci_mnt)
            mounts.append(took)
            cli("umount", str(oci_mnt))
            opened, reopened = open_and_reopen(reference)
            opens.append(opened)
            reopens.append(reopened)
        m, o, r = (statistics.median(x) for x in (mounts, opens, reopens))
        print(f"2. mount with cached indexes, median of {runs}: {m:.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in mounts)})")
        print(f"   in one process: open {o:.2f} s, the daemon's reopen from the state {r:.2f} s: "
              f"the second open is {r / m:.0%} of the mount (goal <= 20%)")
    finally:
        for mnt in reversed(mounted):
            subprocess.run([EROFS_MOUNT, "umount", str(mnt)], capture_output=True)
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64, help="uncompressed size of the image (default 64)")
    parser.add_argument("--layers", type=int, default=3, help="how many layers (default 3)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run it as root: it mounts")
    if not have_nbd():
        if os.environ.get("VMTEST_GUEST") == "1":
            raise SystemExit("no nbd driver in the guest either")
        print("this kernel has no nbd driver: running in the test VM (emulated)", file=sys.stderr)
        sys.exit(subprocess.run([str(VM_RUN), "--mem", "3G", "--timeout", "3000", "--", sys.executable, __file__,
                                 "--runs", str(args.runs), "--mib", str(args.mib), "--layers",
                                 str(args.layers)]).returncode)
    bench(args.runs, args.mib, args.layers)


if __name__ == "__main__":
    main()
