#!/usr/bin/env python3
"""The oci source against a local registry: HTTP requests and bytes per NBD read, cold and warm.

Run with the project's venv (.venv/bin/python benches/oci_reads.py) after
scripts/setup. It starts docker-registry on 127.0.0.1, pushes an EROFS layer,
then:

1. reads it in-process the way the kernel does (sequential 128 KiB reads,
   then 4 KiB reads at random offsets), counting HTTP requests per NBD read
   and bytes fetched per byte read, cold (new source) and warm (cached);
2. serves it with ``erofs-mount serve`` beside the same image as ``local:``,
   and copies both with nbdcopy, alternating, reporting median MiB/s and
   the ratio oci-warm / local.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erofs_mount_oci import open_reference  # noqa: E402

from tests.oci.registry import EROFS_LAYER, Registry  # noqa: E402

EROFS_MOUNT = str(ROOT / ".venv" / "bin" / "erofs-mount")


def make_image(work: Path, size_mib: int) -> Path:
    tree = work / "tree"
    tree.mkdir()
    rng = random.Random(3)
    for i in range(size_mib // 4):
        (tree / f"f{i}").write_bytes(rng.randbytes(4 << 20))
    image = work / "layer.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True)
    return image


def counted_pass(source: object, reads: list[tuple[int, int]]) -> tuple[float, float, float]:
    """(HTTP requests per NBD read, bytes fetched per byte read, seconds)."""
    blob = source.inner  # type: ignore[attr-defined]  # the blob under the core's block cache
    start = blob.counters()
    requests0, fetched0 = start.get("http_requests", 0), start.get("http_bytes", 0)
    start = time.perf_counter()
    for offset, length in reads:
        source.pread(length, offset)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - start
    wanted = sum(length for _o, length in reads)
    end = blob.counters()
    return (end["http_requests"] - requests0) / len(reads), (end["http_bytes"] - fetched0) / wanted, seconds


def serve(spec: str, sock: Path, *options: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([EROFS_MOUNT, "serve", "-q", "--source", spec, *options, "--socket", str(sock)])
    deadline = time.monotonic() + 20
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"serve {spec} did not start")
        time.sleep(0.02)
    return proc


def copy_mib_s(sock: Path, size: int) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", "--request-size=131072", f"nbd+unix:///?socket={sock}", "null:"], check=True)
    return size / (time.perf_counter() - start) / (1 << 20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="erofs-oci-bench-"))
    registry = Registry(work / "registry")
    try:
        image = make_image(work, args.size_mib)
        data = image.read_bytes()
        size = len(data)
        registry.push_image("bench/app", "v1", [(data, EROFS_LAYER)])
        ref = f"{registry.host}/bench/app:v1"
        sequential = [(off, min(128 << 10, size - off)) for off in range(0, size, 128 << 10)]
        rng = random.Random(1)
        scattered = [(rng.randrange(size // 4096) * 4096, 4096) for _ in range(2000)]
        print(f"layer {size >> 20} MiB on docker-registry at {registry.host}")
        print(f"{'pass':44} {'HTTP req/NBD read':>18} {'fetched/read':>13} {'MiB/s':>9}")
        for label, options, reads in (
            ("cold sequential 128 KiB, readahead 4 MiB", {}, sequential),
            ("cold sequential 128 KiB, no readahead", {"readahead-kib": "0"}, sequential),
            ("cold random 4 KiB", {"readahead-kib": "0"}, scattered),
        ):
            source = open_reference(ref, {"insecure": "", **options})
            try:
                per_read, amplification, seconds = counted_pass(source, reads)
                print(f"{label:44} {per_read:18.3f} {amplification:13.2f} "
                      f"{sum(n for _o, n in reads) / seconds / (1 << 20):9.1f}")
                per_read, amplification, seconds = counted_pass(source, reads)
                print(f"{'  the same again, warm':44} {per_read:18.3f} {amplification:13.2f} "
                      f"{sum(n for _o, n in reads) / seconds / (1 << 20):9.1f}")
            finally:
                source.close()

        local = serve(f"local:{image}", work / "local.sock")
        oci = serve(f"oci:{ref}", work / "oci.sock", "-o", "insecure")
        try:
            cold = copy_mib_s(work / "oci.sock", size)
            results: dict[str, list[float]] = {"local": [], "oci": []}
            for run in range(args.runs):
                for name in (("local", "oci") if run % 2 == 0 else ("oci", "local")):
                    results[name].append(copy_mib_s(work / f"{name}.sock", size))
        finally:
            for proc in (local, oci):
                proc.terminate()
                proc.wait(20)
        a, b = statistics.median(results["oci"]), statistics.median(results["local"])
        print(f"\nnbdcopy through erofs-mount serve, 128 KiB requests, medians of {args.runs}:")
        print(f"  oci cold {cold:.1f} MiB/s; oci warm {a:.1f} MiB/s; local {b:.1f} MiB/s; "
              f"ratio oci warm / local {a / b:.2f}")
    finally:
        registry.stop()
        subprocess.run(["rm", "-rf", str(work)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
