#!/usr/bin/env python3
"""The tar source against GNU gzip and tar on the same archive: indexing, index size, reads.

Run with the project's venv (.venv/bin/python benches/tar_archives.py) after
scripts/setup. It makes a tar of real files from this machine (/usr: Python
and Perl libraries, headers, shared libraries; about --mib MiB), its tar.gz,
then prints, each a median of --runs runs taken alternately:

1. indexing the tar.gz (the one pass: tree, span hashes, checkpoints, the
   archive's sha256, the layout) against ``gzip -dc ARCHIVE | tar -t``;
2. the index's size against the uncompressed archive;
3. a full sequential read of the image through ``erofs-mount serve`` and
   nbdcopy (cold, then warm in the same server) against ``gzip -dc``, and
   warm tar.gz against the plain tar through the same source;
4. cold random 4 KiB reads of file data: bytes decompressed per byte read
   (each read checks one whole 1 MiB span, inflated from the checkpoint
   before it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EROFS_MOUNT = str(ROOT / ".venv" / "bin" / "erofs-mount")
SOURCES = ["usr/lib/python3", "usr/lib/python3.11", "usr/include", "usr/share/perl", "usr/share/doc",
           "usr/lib/x86_64-linux-gnu"]


def make_archive(work: Path, mib: int) -> tuple[Path, Path]:
    """A plain tar of real files up to ``mib`` MiB, and its tar.gz."""
    listed = subprocess.run(["find", *[p for p in SOURCES if Path("/", p).exists()], "-xdev", "-type", "f"],
                            cwd="/", capture_output=True, text=True, check=True).stdout.splitlines()
    chosen, total = [], 0
    for name in sorted(listed):
        size = os.lstat("/" + name).st_size
        if total + size > mib << 20:
            continue
        chosen.append(name)
        total += size
    names = work / "names"
    names.write_text("\n".join(chosen) + "\n")
    plain = work / "real.tar"
    subprocess.run(["tar", "-C", "/", "--no-recursion", "-cf", str(plain), "-T", str(names)], check=True)
    gz = work / "real.tar.gz"
    with open(gz, "wb") as out:
        subprocess.run(["gzip", "-c", str(plain)], stdout=out, check=True)
    return plain, gz


def timed(command: list[str] | str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, shell=isinstance(command, str), check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    return time.perf_counter() - start


INDEX_ONLY = """
import sys, time
from erofs_mount_local import LocalFile
from erofs_mount_tar import index
archive = LocalFile(sys.argv[1])
start = time.perf_counter()
built = index.build(archive, sys.argv[1])
print(time.perf_counter() - start, len(built.to_bytes()), built.stream_size)
"""


def index_once(archive: Path) -> tuple[float, int, int]:
    out = subprocess.run([sys.executable, "-c", INDEX_ONLY, str(archive)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def serve_reads(archive: Path, work: Path, cache: Path) -> tuple[float, float]:
    """Seconds for a cold, then a warm, nbdcopy of the whole image from one server (index already cached)."""
    out = work / "copy.img"
    script = (f'a=$(date +%s.%N); nbdcopy "$uri" {out}; b=$(date +%s.%N); nbdcopy "$uri" {out}; '
              f'c=$(date +%s.%N); echo "$a $b $c"')
    result = subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"tar:{archive}", "-o", "cache-mib=1024",
                             "--run", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "EROFS_MOUNT_CACHE_DIR": str(cache)})
    a, b, c = map(float, result.stdout.split())
    out.unlink()
    return b - a, c - b


COLD_RANDOM = """
import random, sys
from erofs_mount_local import LocalFile
from erofs_mount_core import CacheSettings
from erofs_mount_tar.archive_source import mount_archive
import bisect
image = mount_archive(LocalFile(sys.argv[1]), CacheSettings(), progress=False)
stream = image.backing.inner.inner          # under the span cache and its check
checkpoints = sorted(stream._reader.block_offsets().values())
inflated = [0]
pread = stream.pread
def counting(length, offset):
    inflated[0] += offset + length - checkpoints[bisect.bisect_right(checkpoints, offset) - 1]
    return pread(length, offset)
stream.pread = counting
rng = random.Random(1)
first, last = image.layout.data_start, image.layout.blocks
n = int(sys.argv[2])
for _ in range(n):
    image.pread(4096, rng.randrange(first, last) * 4096)
image.close()
print(inflated[0] / (n * 4096))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="uncompressed archive size (default 256)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--random-reads", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tar-bench.") as tmp:
        work = Path(tmp)
        plain, gz = make_archive(work, args.mib)
        print(f"archive: {plain.stat().st_size >> 20} MiB tar, {gz.stat().st_size >> 20} MiB tar.gz, "
              f"{sum(1 for _ in open(work / 'names'))} files")

        ours, peer, size, stream = [], [], 0, 1
        for _ in range(args.runs):
            peer.append(timed(f"gzip -dc {gz} | tar -t"))
            seconds, size, stream = index_once(gz)
            ours.append(seconds)
        o, p = statistics.median(ours), statistics.median(peer)
        print(f"1. indexing: erofs-mount {o:.2f} s, gzip -dc | tar -t {p:.2f} s: ratio {o / p:.2f} (goal <= 1.25)")
        print(f"2. index: {size / 1024:.0f} KiB, {100 * size / stream:.2f}% of the uncompressed archive "
              "(goal <= 3%)")

        cache = work / "cache"
        timed([EROFS_MOUNT, "serve", "-q", "--source", f"tar:{gz}", "--run", "true"],
              env={"EROFS_MOUNT_CACHE_DIR": str(cache)})
        timed([EROFS_MOUNT, "serve", "-q", "--source", f"tar:{plain}", "--run", "true"],
              env={"EROFS_MOUNT_CACHE_DIR": str(cache)})
        cold, warm, plain_warm, gunzip = [], [], [], []
        for _ in range(args.runs):
            gunzip.append(timed(f"gzip -dc {gz} > /dev/null"))
            c, w = serve_reads(gz, work, cache)
            cold.append(c)
            warm.append(w)
            plain_warm.append(serve_reads(plain, work, cache)[1])
        c, w, pw, g = (statistics.median(x) for x in (cold, warm, plain_warm, gunzip))
        mib = stream / (1 << 20)
        print(f"3. full read of the image via serve + nbdcopy: cold {mib / c:.0f} MiB/s, warm {mib / w:.0f} MiB/s; "
              f"gzip -dc {mib / g:.0f} MiB/s: cold ratio {g / c:.2f}")
        print(f"   warm tar.gz vs warm plain tar through tar: {pw / w:.2f} (goal >= 0.9)")

        spread = [float(subprocess.run([sys.executable, "-c", COLD_RANDOM, str(gz), str(args.random_reads)],
                                       capture_output=True, text=True, check=True,
                                       env={**os.environ, "EROFS_MOUNT_CACHE_DIR": str(cache)}).stdout)
                  for _ in range(3)]
        print(f"4. cold random 4 KiB reads: {statistics.median(spread):.0f} bytes decompressed per byte read "
              "(each read checks its whole 1 MiB span, inflated from the checkpoint before it)")


if __name__ == "__main__":
    main()
