#!/usr/bin/env python3
"""A fresh host's first start of an ordinary image: a docker-style pull against erofs-mount's lazy mounts.

Run with the project's venv (.venv/bin/python benches/cold_start.py) after
scripts/setup. The image is real files of this machine (/usr, --mib MiB
uncompressed, default 160) in three gzip layers on Debian's
docker-registry on loopback, read through a proxy (in a process of its
own) that adds 20 ms to every request and lets all answers share one
100 MB/s link (a regional registry). The workload reads 6% of the files
(chosen at random, each whole, in 128 KiB reads as the kernel asks, four
files at a time as the kernel's four connections would; the docker-style
case reads as many of the unpacked files). The layers are gzip: a zstd layer written as one
large frame (``zstd -T0`` of a whole layer) has no point to start reading
from but its beginning, so every host downloads and unpacks it, whatever
was published. Runs alternate (``--cases`` picks some), each case
from an empty cache; medians of --runs are printed, as seconds, ratios to
(a) and bytes through the proxy:

(a) docker-style pull and unpack: each layer fetched with one GET, piped
    into its decompressor and ``tar -x`` into a tmpfs, then the workload;
(b) erofs-mount, first host, no index anywhere: every layer downloaded once
    and indexed, then the workload's reads by range;
(c) a fresh host with an index another host published (``index push``,
    signed; ``-o index-key``): no layer downloaded;
(d) as (c), with the prefetch list of a publisher's mount that ran the
    same workload (``index push --prefetch-from``, done here in-process: this
    machine's kernel may lack nbd), replayed behind the workload's reads;
(e) a zstd:chunked copy of the image made by skopeo, fresh host: the TOCs;
(f) as (e), with its prefetch list published alone (a TOC image needs no
    index).

The workload's four readers read as fast as they can: the worst case for a
prefetch, which can only fetch what they are about to ask for. (c1)-(f1)
read the same files one after another, as a program that starts reads its
modules, the case a prefetch is for.

Every erofs-mount case runs as a serving daemon does (its background work
started: the prefetch, when there is a list), with the span store on, as
by default. Its cache is on the disk of the bench's temporary directory,
while (a) unpacks into a tmpfs: the writes of the erofs-mount cases cost
what a disk costs, those of (a) what memory costs.

"Mounted" is the source open that ``mount`` makes before it attaches the
device (this machine's kernel may lack nbd; attaching adds the same to
every erofs-mount case).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EROFS_MOUNT = str(ROOT / ".venv" / "bin" / "erofs-mount")

from benches.oci_images import DECOMPRESS, layer, push, real_files  # noqa: E402
from tests.oci.faultproxy import FaultProxy  # noqa: E402
from tests.oci.registry import Registry  # noqa: E402

LATENCY, RATE = 0.020, 100_000_000
FRACTION = 0.06
CASES = {"a": "docker-style pull + unpack", "b": "first host, no index", "c": "published index",
         "d": "published index + prefetch", "e": "zstd:chunked (skopeo)", "f": "zstd:chunked + prefetch",
         "c1": "(c), one reader", "d1": "(d), one reader", "e1": "(e), one reader", "f1": "(f), one reader"}


class ProxyProcess:
    """The measured registry's proxy (20 ms a request, one 100 MB/s link) in a process of its own. In the
    bench's process its threads would take the GIL from the erofs-mount cases, which run in that process, and
    not from (a)'s curl, gzip and tar."""

    def __init__(self, upstream: str) -> None:
        self._child = subprocess.Popen([sys.executable, __file__, "--proxy-for", upstream], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        assert self._child.stdout is not None
        self.host = self._child.stdout.readline().strip()
        if not self.host:
            raise RuntimeError("the proxy's process did not start")

    def _ask(self, what: str) -> int:
        assert self._child.stdin is not None and self._child.stdout is not None
        self._child.stdin.write(what + "\n")
        self._child.stdin.flush()
        return int(self._child.stdout.readline())

    @property
    def sent_bytes(self) -> int:
        """Bodies sent since the last reset."""
        return self._ask("sent")

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        if self._child.stdin is not None:
            self._child.stdin.close()
        self._child.wait(30)


def serve_proxy(upstream: str) -> None:
    """The proxy's process: its address on stdout, then the bytes sent for each ``sent`` line read, until EOF."""
    proxy = FaultProxy(upstream)
    proxy.latency, proxy.rate = LATENCY, RATE
    print(proxy.host, flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "reset":
                proxy.sent_bytes = 0
            print(proxy.sent_bytes, flush=True)
    finally:
        proxy.stop()


def pull_and_unpack(proxy: ProxyProcess, repo: str, layers: list[tuple[bytes, str, str]], into: Path,
                    files: list[str]) -> tuple[float, float, int]:
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir()
    start = time.perf_counter()
    for blob, media, _ in layers:
        url = f"http://{proxy.host}/v2/{repo}/blobs/sha256:{hashlib.sha256(blob).hexdigest()}"
        how = "zstd" if media.endswith("zstd") else "gzip"
        subprocess.run(f"curl -sf {url} | {DECOMPRESS[how]} | tar -x -C {into}", shell=True, check=True)
    pulled = time.perf_counter() - start
    at_mount = proxy.sent_bytes  # (the rootfs is there once pulled: that is its "mounted")
    def read(name: str) -> None:
        with open(into / name, "rb") as f:
            while f.read(128 << 10):
                pass

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(read, files))
    return pulled, time.perf_counter() - start, at_mount


def lazy(proxy: FaultProxy | ProxyProcess, reference: str, options: dict[str, str], count: int,
         readers: int = 4) -> tuple[float, float, int]:
    """(seconds to the source open, seconds to the workload done, bytes fetched by the open) of one mount from
    an empty cache, the workload read by ``readers`` at once (1: one file after another, as a program that
    starts reads its modules). The workload is ``count`` files chosen as in every case (the merged tree, so the block
    order, is the same)."""
    from erofs_mount_oci import open_reference

    start = time.perf_counter()
    source = open_reference(reference, {"insecure": "", "readahead-kib": "512", **options})
    mounted = time.perf_counter() - start
    at_mount = proxy.sent_bytes
    source.start_background()  # as the daemon does once it serves

    def read(extent: Any) -> None:
        base = extent.first_block * 4096
        for offset in range(0, extent.size, 128 << 10):
            source.pread(min(128 << 10, -(-extent.size // 4096) * 4096 - offset), base + offset)

    try:
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(read, random.Random(1).sample(list(source.layout.extents), count)))  # type: ignore
    finally:
        source.close()
    return mounted, time.perf_counter() - start, at_mount


def published_with_prefetch(reference: str, work: Path, count: int) -> None:
    """What ``index push --sign kd --prefetch-from MOUNTPOINT`` pushes after the publisher's mount ran the
    workload: the indexes of the layers without a TOC and the order it read the image in, signed by a key of
    its own (so that (c), which trusts another key, does not use it)."""
    from erofs_mount_oci.credentials import CredentialSource
    from erofs_mount_oci.layers import indexed
    from erofs_mount_oci.options import client_for
    from erofs_mount_oci.platform import Platform
    from erofs_mount_oci.prefetch import cached, list_name
    from erofs_mount_oci.published import load_signing_key, push
    from erofs_mount_oci.reference import parse
    from erofs_mount_oci.registry import Registry as Api

    if not (work / "kd").exists():
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(work / "kd")], check=True)
        subprocess.run(["openssl", "pkey", "-in", str(work / "kd"), "-pubout", "-out", str(work / "kd.pub")],
                       check=True)
    os.environ["EROFS_MOUNT_CACHE_DIR"] = str(work / f"publisher-{hashlib.sha256(reference.encode()).hexdigest()}")
    proxy_free = FaultProxy(reference.partition("/")[0])  # no latency: the publisher's own run is not measured
    try:
        lazy(proxy_free, reference.replace(reference.partition("/")[0], proxy_free.host), {}, count)
    finally:
        proxy_free.stop()
    ref = parse(reference)
    client = client_for(ref, insecure=True, ca=None, credentials=CredentialSource("anonymous"), hosts_dir="")
    try:
        api = Api(client, ref, insecure=True)
        manifest, digest, chosen = api.image_manifest(Platform.host())
        listed = cached(list_name(digest))
        assert listed is not None and listed.entries, "the publisher's run kept no reads"
        layers = [layer for layer in api.tar_layers(manifest, digest, chosen) if layer.toc is None]
        diff_ids = [api.diff_ids(manifest)[layer.index] for layer in layers]
        found = indexed(api, layers, diff_ids).indexes
        subject = {"mediaType": manifest["mediaType"], "digest": digest, "size": api.manifest_size(digest)}
        push(api, subject, layers, diff_ids, found, load_signing_key(str(work / "kd")), listed)
        print(f"prefetch list of {reference}: {len(listed.entries)} units, from the publisher's run of the workload",
              flush=True)
    finally:
        client.close()


def main() -> int:
    if sys.argv[1:2] == ["--proxy-for"]:  # (the proxy's own process: see ProxyProcess)
        serve_proxy(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=160, help="uncompressed size of the image (default 160)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"which cases, by name, comma-separated (default {','.join(CASES)}); (a), the "
                             "baseline, is always run")
    args = parser.parse_args()
    chosen = ["a", *(c for c in args.cases.split(",") if c != "a")]
    if set(chosen) - set(CASES):
        parser.error(f"--cases: unknown case(s) {', '.join(sorted(set(chosen) - set(CASES)))}")
    work = Path(tempfile.mkdtemp(prefix="erofs-mount-cold-"))
    tmpfs = Path(tempfile.mkdtemp(prefix="erofs-mount-unpack-", dir="/dev/shm"))
    registry = Registry(work / "registry")
    proxy = ProxyProcess(registry.host)
    try:
        files = real_files(args.mib)
        a, b = len(files) * 60 // 100, len(files) * 85 // 100
        layers = [layer(work, "base", files[:a], "gzip"), layer(work, "mid", files[a:b], "gzip"),
                  layer(work, "top", files[b:], "gzip")]
        push(registry, "bench/app", layers)
        compressed = sum(len(blob) for blob, _, _ in layers)
        workload = random.Random(1).sample(files, max(1, int(len(files) * FRACTION)))
        read = sum(os.lstat("/" + f).st_size for f in workload)
        print(f"{len(files)} files, {args.mib} MiB in 3 gzip layers ({compressed / 2**20:.1f} MiB compressed); "
              f"workload: {len(workload)} files, {read / 2**20:.1f} MiB; proxy: {LATENCY * 1000:.0f} ms per request, "
              f"{RATE / 1e6:.0f} MB/s", flush=True)
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(work / "k")], check=True)
        subprocess.run(["openssl", "pkey", "-in", str(work / "k"), "-pubout", "-out", str(work / "k.pub")],
                       check=True)
        reference = f"{registry.host}/bench/app:v1"
        env = dict(os.environ, EROFS_MOUNT_CACHE_DIR=str(work / "publisher"))
        subprocess.run([EROFS_MOUNT, "index", "push", f"oci:{reference}", "-o", "insecure", "--sign", str(work / "k")],
                       check=True, env=env, capture_output=True)
        if {"d", "d1"} & set(chosen):
            published_with_prefetch(reference, work, len(workload))
        subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", "-f", "oci",
                        "--dest-compress-format", "zstd:chunked", f"docker://{reference}",
                        f"docker://{registry.host}/bench/chunked:v1"], check=True)
        if {"f", "f1"} & set(chosen):
            published_with_prefetch(f"{registry.host}/bench/chunked:v1", work, len(workload))  # its list alone
        via, chunked = f"{proxy.host}/bench/app:v1", f"{proxy.host}/bench/chunked:v1"
        cases = {
            "a": lambda: pull_and_unpack(proxy, "bench/app", layers, tmpfs / "rootfs", workload),
            "b": lambda: lazy(proxy, via, {"index": "off"}, len(workload)),
            "c": lambda: lazy(proxy, via, {"index-key": str(work / "k.pub")}, len(workload)),
            "d": lambda: lazy(proxy, via, {"index-key": str(work / "kd.pub")}, len(workload)),
            "e": lambda: lazy(proxy, chunked, {}, len(workload)),
            "f": lambda: lazy(proxy, chunked, {"index-key": str(work / "kd.pub")}, len(workload)),
            "c1": lambda: lazy(proxy, via, {"index-key": str(work / "k.pub")}, len(workload), readers=1),
            "d1": lambda: lazy(proxy, via, {"index-key": str(work / "kd.pub")}, len(workload), readers=1),
            "e1": lambda: lazy(proxy, chunked, {}, len(workload), readers=1),
            "f1": lambda: lazy(proxy, chunked, {"index-key": str(work / "kd.pub")}, len(workload), readers=1),
        }
        times: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in chosen}
        for run in range(args.runs):
            for name in chosen:
                case = cases[name]
                os.environ["EROFS_MOUNT_CACHE_DIR"] = str(work / f"cache-{name}-{run}")
                proxy.reset()
                mounted, done, at_mount = case()
                times[name].append((mounted, done, at_mount, proxy.sent_bytes))
                shutil.rmtree(work / f"cache-{name}-{run}", ignore_errors=True)
        base_mounted = statistics.median(t[0] for t in times["a"])
        base_done = statistics.median(t[1] for t in times["a"])
        print(f"medians of {args.runs} runs; ratios to (a)")
        for name, rows in times.items():
            m, d = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
            before, total = statistics.median(r[2] for r in rows), statistics.median(r[3] for r in rows)
            print(f"({name}) {CASES[name]:28} mounted {m:7.2f} s ({m / base_mounted:5.2f}x)   workload done "
                  f"{d:7.2f} s ({d / base_done:5.2f}x)   fetched {before / 2**20:7.1f} MiB before mounted "
                  f"({before / compressed:6.1%} of the image), {total / 2**20:7.1f} MiB in all")
        done = {k: statistics.median(r[1] for r in rows) for k, rows in times.items()}
        pairs = [(with_list, without) for with_list, without in (("d", "c"), ("f", "e"), ("d1", "c1"), ("f1", "e1"))
                 if with_list in done and without in done]
        if pairs:
            print("workload done with a prefetch list / without: " + ", ".join(
                f"({w})/({wo}) {done[w] / done[wo]:.2f}x" for w, wo in pairs))
        print("goals: (c), (e) mounted <= 0.05x with <= 3% fetched; workload done <= 0.2x; (d) <= 0.6x (c); "
              "(b) <= 0.6x")
    finally:
        proxy.stop()
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmpfs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
