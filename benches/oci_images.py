#!/usr/bin/env python3
"""A registry image of tar layers: first mount against a docker-style pull and unpack, then reads, then sharing.

Run with the project's venv (.venv/bin/python benches/oci_images.py) after
scripts/setup. It makes a three-layer image of real files from this machine
(/usr: about --mib MiB uncompressed; gzip, gzip, zstd layers), pushes it to
Debian's docker-registry on loopback, and prints, medians of --runs runs
taken alternately:

1. first mount (``erofs-mount serve`` with an empty cache: every layer
   downloaded once and indexed, in parallel) against what a docker-style
   pull does: one sequential GET per layer (curl) piped into its
   decompressor and ``tar -x`` into a tmpfs, layer after layer;
2. reading 5% of the files (chosen at random, each read whole in 128 KiB
   reads, as the kernel asks) from a mount whose indexes are cached: bytes
   fetched from the registry against the files' size;
3. first mount of a second image that shares the base layer: bytes
   downloaded against the image's size.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EROFS_MOUNT = str(ROOT / ".venv" / "bin" / "erofs-mount")

from tests.oci.faultproxy import FaultProxy  # noqa: E402
from tests.oci.registry import Registry  # noqa: E402

SOURCES = ["usr/lib/python3", "usr/lib/python3.11", "usr/include", "usr/share/perl", "usr/share/doc",
           "usr/lib/x86_64-linux-gnu", "usr/share/locale", "usr/lib/gcc"]
MEDIA = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip", "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
DECOMPRESS = {"gzip": "gzip -dc", "zstd": "zstd -dc"}


def real_files(mib: int) -> list[str]:
    listed = subprocess.run(["find", *[p for p in SOURCES if Path("/", p).exists()], "-xdev", "-type", "f"],
                            cwd="/", capture_output=True, text=True, check=True).stdout.splitlines()
    chosen, total = [], 0
    for name in sorted(listed):
        size = os.lstat("/" + name).st_size
        if total + size <= mib << 20:
            chosen.append(name)
            total += size
    return chosen


def layer(work: Path, name: str, files: list[str], compression: str) -> tuple[bytes, str, str]:
    """(blob, media type, diff_id) of a layer holding ``files``."""
    names = work / f"{name}.names"
    names.write_text("\n".join(files) + "\n")
    stream = subprocess.run(["tar", "-C", "/", "--no-recursion", "-cf", "-", "-T", str(names)],
                            capture_output=True, check=True).stdout
    blob = subprocess.run(["gzip", "-c"] if compression == "gzip" else ["zstd", "-q", "-c", "-T0"], input=stream,
                          capture_output=True, check=True).stdout
    return blob, MEDIA[compression], "sha256:" + hashlib.sha256(stream).hexdigest()


def push(registry: Registry, repo: str, layers: list[tuple[bytes, str, str]]) -> None:
    registry.push_image(repo, "v1", [(b, m) for b, m, _ in layers], diff_ids=[d for _, _, d in layers])


def pull_and_unpack(registry: Registry, repo: str, layers: list[tuple[bytes, str, str]], into: Path) -> float:
    """What a docker-style pull does: each layer fetched with one GET, decompressed and extracted in order."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir()
    start = time.perf_counter()
    for blob, media, _ in layers:
        url = f"http://{registry.host}/v2/{repo}/blobs/sha256:{hashlib.sha256(blob).hexdigest()}"
        how = "zstd" if media.endswith("zstd") else "gzip"
        subprocess.run(f"curl -sf {url} | {DECOMPRESS[how]} | tar -x -C {into}", shell=True, check=True)
    return time.perf_counter() - start


def first_mount(reference: str, cache: Path) -> float:
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"oci:{reference}", "-o", "insecure", "--run", "true"],
                   check=True, env=dict(os.environ, EROFS_MOUNT_CACHE_DIR=str(cache)))
    return time.perf_counter() - start


def fetched_bytes(proxy: FaultProxy, sizes: dict[str, int]) -> int:
    """Bytes of blob answers through the proxy: ranges as asked, whole GETs as the blob's size."""
    paths = [path for method, path, _ in proxy.log if method == "GET" and "/blobs/" in path]
    total = 0
    for path, asked in zip(paths, proxy.ranges, strict=True):
        if asked is None:
            total += sizes.get(path.rpartition(":")[2], 0)
        else:
            first, _, last = asked.removeprefix("bytes=").partition("-")
            total += int(last) - int(first) + 1
    return total


def read_some_files(reference: str, fraction: float) -> tuple[int, int]:
    """(files' bytes read, reads) of a random ``fraction`` of the image's files, as the kernel would read them."""
    from erofs_mount_oci import open_reference

    source = open_reference(reference, {"insecure": "", "readahead-kib": "128"})
    try:
        files = list(source.layout.extents)
        chosen = random.Random(1).sample(files, max(1, int(len(files) * fraction)))
        total = 0
        for extent in chosen:
            base = extent.first_block * 4096
            for offset in range(0, extent.size, 128 << 10):
                n = min(128 << 10, -(-extent.size // 4096) * 4096 - offset)
                source.pread(n, base + offset)
            total += extent.size
        return total, len(chosen)
    finally:
        source.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=300, help="uncompressed size of the image (default 300)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="erofs-mount-bench-"))
    tmpfs = Path(tempfile.mkdtemp(prefix="erofs-mount-unpack-", dir="/dev/shm"))
    registry = Registry(work / "registry")
    try:
        files = real_files(args.mib)
        base_end, mid_end = len(files) * 60 // 100, len(files) * 85 // 100
        print(f"making a {args.mib} MiB image of {len(files)} files from /usr ...", flush=True)
        layers = [layer(work, "base", files[:base_end], "gzip"), layer(work, "mid", files[base_end:mid_end], "gzip"),
                  layer(work, "top", files[mid_end:], "zstd")]
        push(registry, "bench/app", layers)
        own = layer(work, "own", files[:50], "gzip")
        push(registry, "bench/other", [layers[0], own])
        reference = f"{registry.host}/bench/app:v1"
        compressed = sum(len(b) for b, _, _ in layers)
        print(f"layers: {', '.join(f'{len(b) >> 20} MiB' for b, _, _ in layers)} compressed")

        ours, theirs = [], []
        for _ in range(args.runs):
            theirs.append(pull_and_unpack(registry, "bench/app", layers, tmpfs / "rootfs"))
            ours.append(first_mount(reference, work / "cache"))
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"1. first mount (download + index, {len(layers)} layers): {a:.2f} s; "
              f"curl | decompress | tar -x to tmpfs: {b:.2f} s; ratio {a / b:.2f} (goal <= 1.0)")

        os.environ["EROFS_MOUNT_CACHE_DIR"] = str(work / "cache")
        sizes = {hashlib.sha256(blob).hexdigest(): len(blob) for blob, _, _ in [*layers, own]}
        proxy = FaultProxy(registry.host)
        try:
            total, count = read_some_files(reference.replace(registry.host, proxy.host), 0.05)
            got = fetched_bytes(proxy, sizes)
            print(f"2. reading 5% of the files ({count} files, {total >> 20} MiB) from a warm index: "
                  f"{got >> 20} MiB fetched from the registry, {got / max(total, 1):.2f} bytes per byte read "
                  f"(the image is {compressed >> 20} MiB compressed)")
            proxy.log.clear()
            proxy.ranges.clear()
            second = f"{proxy.host}/bench/other:v1"
            subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"oci:{second}", "-o", "insecure", "--run",
                            "true"], check=True)
            got = fetched_bytes(proxy, sizes)
            print(f"3. first mount of an image sharing the base layer ({len(layers[0][0]) >> 20} MiB): "
                  f"{got / 1024:.0f} KiB downloaded; its own layer is {len(own[0]) / 1024:.0f} KiB")
        finally:
            proxy.stop()
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmpfs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
