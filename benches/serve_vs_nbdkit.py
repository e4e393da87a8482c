#!/usr/bin/python3
"""erofs-mount serve against nbdkit's file plugin, side by side, same clients.

Runs with Debian's python3 (it needs python3-libnbd for the random-read
client). Both servers export the same image on unix sockets; runs of the two
alternate, and each figure is the median of the runs. Prints a table with
the ratio erofs-mount / nbdkit for each workload (higher is better for
throughput and IOPS, lower for start-up time).

    benches/serve_vs_nbdkit.py [--size-mib 256] [--runs 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd  # python3-libnbd

ROOT = Path(__file__).resolve().parent.parent
EROFS_MOUNT = str(ROOT / ".venv" / "bin" / "erofs-mount")


def make_image(path: Path, size_mib: int) -> None:
    tree = path.parent / "tree"
    tree.mkdir()
    rng = random.Random(7)
    for i in range(size_mib // 8):
        (tree / f"f{i}").write_bytes(rng.randbytes(8 << 20))
    subprocess.run(["mkfs.erofs", "--quiet", str(path), str(tree)], check=True)


class Server:
    def __init__(self, name: str, argv: list[str], sock: Path) -> None:
        self.name, self.sock = name, sock
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def sequential(server: Server, size: int, request_size: int) -> float:
    """MiB/s of nbdcopy reading the whole export to /dev/null."""
    start = time.perf_counter()
    subprocess.run(["nbdcopy", f"--request-size={request_size}", server.uri, "null:"], check=True)
    return size / (time.perf_counter() - start) / (1 << 20)


def random_reads(server: Server, size: int, depth: int, seconds: float) -> float:
    """4 KiB reads per second at random 4 KiB-aligned offsets, ``depth`` in flight."""
    h = nbd.NBD()
    h.connect_uri(server.uri)
    rng = random.Random(depth)
    blocks = size // 4096
    done = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    if depth == 1:
        while time.perf_counter() < deadline:
            h.pread(4096, rng.randrange(blocks) * 4096)
            done += 1
    else:
        bufs = [nbd.Buffer(4096) for _ in range(depth)]
        cookies = {}
        for i, buf in enumerate(bufs):
            cookies[h.aio_pread(buf, rng.randrange(blocks) * 4096)] = i
        while time.perf_counter() < deadline:
            h.poll(-1)
            for cookie in list(cookies):
                if h.aio_command_completed(cookie):
                    i = cookies.pop(cookie)
                    done += 1
                    cookies[h.aio_pread(bufs[i], rng.randrange(blocks) * 4096)] = i
        while cookies:
            h.poll(-1)
            for cookie in list(cookies):
                if h.aio_command_completed(cookie):
                    cookies.pop(cookie)
    elapsed = time.perf_counter() - start
    h.shutdown()
    return done / elapsed


def startup(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="erofs-bench-"))
    image = work / "image.erofs"
    make_image(image, args.size_mib)
    size = image.stat().st_size
    ours = Server("erofs-mount", [EROFS_MOUNT, "serve", "-q", "--source", f"local:{image}",
                                  "--socket", str(work / "ours.sock")], work / "ours.sock")
    peer = Server("nbdkit", ["nbdkit", "--foreground", "--readonly", "--unix", str(work / "peer.sock"),
                             "file", str(image)], work / "peer.sock")
    workloads = {
        **{f"sequential nbdcopy {rs // 1024} KiB requests (MiB/s)":
           (lambda s, rs=rs: sequential(s, size, rs)) for rs in (65536, 262144, 2 << 20)},
        "random 4 KiB reads, QD1 (IOPS)": lambda s: random_reads(s, size, 1, args.seconds),
        "random 4 KiB reads, QD16 (IOPS)": lambda s: random_reads(s, size, 16, args.seconds),
    }
    print(f"image {size >> 20} MiB, {args.runs} alternating runs each, medians; page cache warm")
    subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)
    print(f"{'workload':52} {'erofs-mount':>12} {'nbdkit':>12} {'ratio':>7}")
    try:
        for name, fn in workloads.items():
            results: dict[str, list[float]] = {"erofs-mount": [], "nbdkit": []}
            for run in range(args.runs):
                for server in ((ours, peer) if run % 2 == 0 else (peer, ours)):
                    results[server.name].append(fn(server))
            a, b = statistics.median(results["erofs-mount"]), statistics.median(results["nbdkit"])
            print(f"{name:52} {a:12.1f} {b:12.1f} {a / b:7.2f}", flush=True)
    finally:
        ours.stop()
        peer.stop()
    for label, argv in (("erofs-mount --help", [EROFS_MOUNT, "--help"]),
                        ("erofs-mount plugins", [EROFS_MOUNT, "plugins"]),
                        ("nbdkit --version (reference)", ["nbdkit", "--version"])):
        print(f"{'start-up ' + label + ' (ms)':52} {startup(argv, 11):12.1f}")
    subprocess.run(["rm", "-rf", str(work)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
