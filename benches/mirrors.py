#!/usr/bin/env python3
"""Reads through a pull-through mirror (containerd's hosts.toml), against reads from the registry itself.

Run with the project's venv (.venv/bin/python benches/mirrors.py) after
scripts/setup. It starts two docker-registry instances on 127.0.0.1, an
upstream (behind a proxy that counts the blob bytes it serves) and a
pull-through cache of it (the registry's proxy mode), pushes an EROFS layer,
writes a hosts.toml naming the mirror, then prints:

1. fleet: ``--hosts`` simulated hosts (each its own source, client and cache,
   on a thread) read the whole layer at once in random orders through the
   mirror: the upstream's blob bytes over the layer's size (goal <= 1.1);
   all at once, and with one host first (the mirror has the blob before the
   others ask); then all at once through nginx as a range-caching mirror
   (1 MiB slices, ``proxy_cache_lock``: concurrent misses of a slice wait
   for one fetch), as an operator's caching proxy is configured;
2. latency of random 4 KiB reads (median; blocks of 4 KiB, so no cache
   helps) through the mirror, warm, against the registry directly,
   and with a dead mirror listed first: the time it adds per read after
   the first (goal < 5 ms);
3. side by side with nbdkit's curl plugin on the same mirror URL, over NBD
   (python3-libnbd): erofs-mount serve and nbdkit, random 4 KiB reads at
   queue depth 1, median microseconds and the ratio.
"""

from __future__ import annotations

import argparse
import http.server
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append("/usr/lib/python3/dist-packages")  # python3-libnbd, for the NBD client

from erofs_mount_oci import open_reference  # noqa: E402

from tests.oci.registry import EROFS_LAYER, Registry, free_port  # noqa: E402

EROFS_MOUNT = str(ROOT / ".venv" / "bin" / "erofs-mount")


class CountingProxy:
    """Forwards to the upstream registry and counts the blob bytes it sends."""

    def __init__(self, upstream: str) -> None:
        self.blob_bytes = 0
        self._lock = threading.Lock()
        client = httpx.Client(base_url=f"http://{upstream}", timeout=60)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:  # noqa: N802
                self._forward("HEAD")

            def do_GET(self) -> None:  # noqa: N802
                self._forward("GET")

            def _forward(self, method: str) -> None:
                keep = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "range", "accept")}
                with client.stream(method, self.path, headers=keep) as answer:
                    self.send_response(answer.status_code)
                    for k, v in answer.headers.items():
                        if k.lower() not in ("transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.end_headers()
                    if method == "GET":
                        for chunk in answer.iter_raw(1 << 20):
                            self.wfile.write(chunk)
                            if "/blobs/" in self.path:
                                with outer._lock:
                                    outer.blob_bytes += len(chunk)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


NGINX_CONF = """
user root;
daemon off;
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    proxy_cache_path {work}/nginx-cache levels=1:2 keys_zone=blobs:10m max_size=4g inactive=1h
                     use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location ~ /blobs/ {{
            slice 1m;
            proxy_cache blobs;
            proxy_cache_key $uri$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 120s;
            proxy_http_version 1.1;
            proxy_pass http://{upstream};
        }}
        location / {{
            proxy_http_version 1.1;
            proxy_pass http://{upstream};
        }}
    }}
}}
"""


class Nginx:
    """nginx as a range-caching mirror of ``upstream``: blobs cached in 1 MiB slices, one fetch per slice."""

    def __init__(self, work: Path, upstream: str) -> None:
        port = free_port()
        work.mkdir()
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, port=port, upstream=upstream))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stderr=subprocess.DEVNULL)
        self.host = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"http://{self.host}/v2/", timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("nginx did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def make_layer(work: Path, size_mib: int, seed: int) -> bytes:
    tree = work / f"tree{seed}"
    tree.mkdir()
    rng = random.Random(seed)
    for i in range(max(1, size_mib // 4)):
        (tree / f"f{i}").write_bytes(rng.randbytes(4 << 20))
    image = work / f"layer{seed}.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(tree)], check=True)
    return image.read_bytes()


def hosts_dir(work: Path, name: str, registry: str, mirrors: list[str]) -> str:
    directory = work / name / registry
    directory.mkdir(parents=True)
    text = f'server = "http://{registry}"\n' + "".join(
        f'\n[host."http://{m}"]\n  capabilities = ["pull"]\n  dial_timeout = "200ms"\n' for m in mirrors)
    (directory / "hosts.toml").write_text(text)
    return str(work / name)


def fleet(reference: str, hosts: str, n: int, size: int) -> float:
    """Seconds for ``n`` hosts to read the whole layer, each in its own random order."""
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            source = open_reference(reference, {"insecure": "", "hosts-dir": hosts, "cache-mib": "16"})
            try:
                offsets = list(range(0, size, 1 << 20))
                random.Random(seed).shuffle(offsets)
                for off in offsets:
                    source.pread(min(1 << 20, size - off), off)
            finally:
                source.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - start


def read_latency(reference: str, hosts: str, size: int, reads: int) -> tuple[float, float]:
    """(first read, median of the later reads), in ms: random 4 KiB reads, each from a new block (a new
    source each call: nothing is cached from the last)."""
    rng = random.Random(5)
    source = open_reference(reference, {"insecure": "", "hosts-dir": hosts, "cache-mib": "1", "block-kib": "4",
                                        "readahead-kib": "0"})
    try:
        times = []
        for _ in range(reads):
            off = rng.randrange(0, size - 4096) & ~4095
            t = time.perf_counter()
            source.pread(4096, off)
            times.append((time.perf_counter() - t) * 1000)
    finally:
        source.close()
    return times[0], statistics.median(times[1:])


def nbd_latency(sock: str, size: int, reads: int, seed: int) -> float:
    """Median microseconds of random 4 KiB reads at queue depth 1 over NBD (new offsets each ``seed``:
    erofs-mount's block cache must not answer a later run)."""
    import nbd

    handle = nbd.NBD()
    handle.connect_unix(sock)
    rng = random.Random(seed)
    times = []
    for _ in range(reads):
        off = rng.randrange(0, size - 4096) & ~4095
        t = time.perf_counter()
        handle.pread(4096, off)
        times.append((time.perf_counter() - t) * 1e6)
    handle.shutdown()
    return statistics.median(times)


def serve(argv: list[str], sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} did not start")
        time.sleep(0.05)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--reads", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        upstream = Registry(work / "upstream")
        counting = CountingProxy(upstream.host)
        mirror = Registry(work / "mirror", mirror_of=types.SimpleNamespace(scheme="http", host=counting.host,
                                                                              users={}))
        try:
            via_mirror = hosts_dir(work, "mirror-hosts", counting.host, [mirror.host])
            dead = hosts_dir(work, "dead-hosts", counting.host, [f"127.0.0.1:{free_port()}", mirror.host])

            for seed, first in ((1, 0), (3, 1)):
                data = make_layer(work, args.size_mib, seed)
                upstream.push_image(f"bench/fleet{seed}", "1", [(data, EROFS_LAYER)])
                counting.blob_bytes = 0
                reference = f"{counting.host}/bench/fleet{seed}:1"
                if first:  # one host reads it first: the mirror has it before the others ask
                    fleet(reference, via_mirror, first, len(data))
                took = fleet(reference, via_mirror, args.hosts - first, len(data))
                how = "all at once" if not first else "one first, then the others at once"
                print(f"fleet, {how}: {args.hosts} hosts read a {len(data) >> 20} MiB layer through the mirror "
                      f"({took:.1f} s); the upstream served {counting.blob_bytes / len(data):.2f}x the layer "
                      "(goal <= 1.1)")

            nginx = Nginx(work / "nginx", counting.host)
            try:
                data = make_layer(work, args.size_mib, 4)
                upstream.push_image("bench/fleet4", "1", [(data, EROFS_LAYER)])
                counting.blob_bytes = 0
                took = fleet(f"{counting.host}/bench/fleet4:1", hosts_dir(work, "nginx-hosts", counting.host,
                                                                          [nginx.host]), args.hosts, len(data))
                print(f"fleet, all at once through nginx caching 1 MiB slices: {args.hosts} hosts read a "
                      f"{len(data) >> 20} MiB layer ({took:.1f} s); the upstream served "
                      f"{counting.blob_bytes / len(data):.2f}x the layer (goal <= 1.1)")
            finally:
                nginx.stop()

            data = make_layer(work, args.size_mib, 2)
            upstream.push_image("bench/lat", "1", [(data, EROFS_LAYER)])
            reference = f"{counting.host}/bench/lat:1"
            read_latency(reference, via_mirror, len(data), 2)  # the mirror fetches and keeps the blob
            upstream.push_image("bench/lat", "1", [(data, EROFS_LAYER)])
            rows: dict[str, list[float]] = {"registry directly": [], "through the mirror": [],
                                            "dead mirror first": []}
            firsts = []
            for _ in range(args.runs):  # directly: without the counting proxy, which would slow it
                rows["registry directly"].append(read_latency(f"{upstream.host}/bench/lat:1", "none", len(data),
                                                              args.reads)[1])
                rows["through the mirror"].append(read_latency(reference, via_mirror, len(data), args.reads)[1])
                first, later = read_latency(reference, dead, len(data), args.reads)
                rows["dead mirror first"].append(later)
                firsts.append(first)
            for name, values in rows.items():
                print(f"random 4 KiB read, {name}: {statistics.median(values):.2f} ms (median of {args.runs} runs)")
            added = statistics.median(rows["dead mirror first"]) - statistics.median(rows["through the mirror"])
            print(f"a dead first mirror adds {added:+.2f} ms per read after the first (goal < 5 ms); "
                  f"the first read, which finds it dead: {statistics.median(firsts):.0f} ms")

            digest = "sha256:" + __import__("hashlib").sha256(data).hexdigest()
            url = f"http://{mirror.host}/v2/bench/lat/blobs/{digest}?ns={counting.host}"
            ours_sock, theirs_sock = work / "ours.sock", work / "theirs.sock"
            ours = serve([EROFS_MOUNT, "serve", "--source", f"oci:{reference}", "-o",
                          f"insecure,hosts-dir={via_mirror},block-kib=4,readahead-kib=0",
                          "--socket", str(ours_sock)], ours_sock)
            theirs = serve(["nbdkit", "--foreground", "--unix", str(theirs_sock), "curl", url], theirs_sock)
            try:
                mine, peer = [], []
                for run in range(args.runs):
                    mine.append(nbd_latency(str(ours_sock), len(data), args.reads, seed=run))
                    peer.append(nbd_latency(str(theirs_sock), len(data), args.reads, seed=run))
                a, b = statistics.median(mine), statistics.median(peer)
                print(f"over NBD through the mirror, random 4 KiB QD1: erofs-mount {a:.0f} us, nbdkit curl "
                      f"{b:.0f} us; ratio {a / b:.2f} (lower is better)")
            finally:
                for proc in (ours, theirs):
                    proc.terminate()
                    proc.wait(10)
        finally:
            mirror.stop()
            counting.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
