#!/usr/bin/env python3
"""A container's start on a cold host: containerd's overlayfs snapshotter against erofs-mount's snapshotter.

Run as root with the project's venv (.venv/bin/python benches/container_start.py)
after scripts/setup; this machine's kernel has no nbd, so it runs itself in
the test VM (emulated: expect minutes). The image is real files of this
machine: python3 with every library its modules link (one layer), its
standard library (another) and more of /usr (a third, up to --mib MiB in
all), gzip layers on Debian's docker-registry on loopback behind a proxy
that adds 20 ms to every request and lets all answers share one 100 MB/s
link (a regional registry). The command reads a few percent of it:
``python3 -c "import json, email, http.client"``. Each case starts from a
cold host (containerd's state, the snapshotter's root and erofs-mount's
cache all empty, on tmpfs); cases alternate (``--cases`` picks some by
their letters, (o) always among them); medians of --runs are
printed, as seconds to the command's first output (pull included), ratios
to (o), the pull's part, and bytes through the proxy:

(o) containerd's overlayfs snapshotter: ``ctr image pull`` (every layer
    fetched and unpacked), then ``ctr run``;
(i) erofs-mount's snapshotter, the image's index published by another host
    (``index push``, signed; the snapshotter given the key):
    ``erofs-mount snapshotter pull``, then ``ctr run --snapshotter erofs-mount``;
(p) as (i), the index published with the prefetch list of a publisher's
    mount that ran the same command (``index push --prefetch-from``): each
    layer's daemon fetches, in the background, what the command will read;
(t) a zstd:chunked copy of the image (``skopeo copy --dest-compress-format
    zstd:chunked``), no index anywhere: each layer mounted from its table of
    contents;
(n) as (i) with no index anywhere: each layer downloaded once and indexed
    as the snapshotter mounts it.
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
VM_RUN = ROOT / "tests" / "vm" / "vm-run"
LATENCY, RATE = 0.020, 100_000_000
COMMAND = ["python3", "-c", "import json, email, http.client; print('started')"]
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CASES = {"o": "overlayfs: pull, unpack, run", "i": "erofs-mount, published index",
         "p": "erofs-mount, index and prefetch", "t": "erofs-mount, zstd:chunked TOCs", "n": "erofs-mount, no index"}


def python_layers(mib: int) -> list[bytes]:
    """python3 and the libraries it and its extension modules link; its standard library; more of /usr."""
    from tests.vm.test_containerd import _layer

    binaries = [Path("/usr/bin/python3.11"), *sorted(Path("/usr/lib/python3.11/lib-dynload").glob("*.so"))]
    libraries: dict[str, Path] = {}
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) > 2 and parts[2].startswith("/"):
                libraries[f"lib/x86_64-linux-gnu/{parts[0]}"] = Path(os.path.realpath(parts[2]))
            elif parts and parts[0].startswith("/") and "ld-linux" in parts[0]:
                libraries[parts[0].lstrip("/")] = Path(os.path.realpath(parts[0]))
    dirs = sorted({str(Path(n).parent) for n in libraries} | {"usr", "usr/bin"})
    first = [(d, None, None) for d in dirs] + [(n, p, None) for n, p in sorted(libraries.items())] + \
        [("usr/bin/python3", Path("/usr/bin/python3.11"), None)]
    stdlib = _tree(Path("/usr/lib/python3.11"), 1 << 40)
    used = sum(p.stat().st_size for _, p, _ in [*first, *stdlib] if p is not None)
    rest = _tree(Path("/usr/share"), max(0, (mib << 20) - used))
    return [_layer(first), _layer(stdlib), _layer(rest)]


def _tree(top: Path, budget: int) -> list[tuple[str, Path | None, bytes | None]]:
    """``top``'s directories and regular files (no links), as layer entries, up to ``budget`` bytes of files."""
    entries: list[tuple[str, Path | None, bytes | None]] = []
    parents = sorted({str(p) for p in top.relative_to("/").parents if str(p) != "."})
    entries += [(p, None, None) for p in parents]
    for where, dirs, files in os.walk(top):
        dirs.sort()
        base = Path(where)
        entries.append((str(base.relative_to("/")), None, None))
        for name in sorted(files):
            path = base / name
            if path.is_symlink() or not path.is_file():
                continue
            size = path.stat().st_size
            if size > budget:
                return entries
            budget -= size
            entries.append((str(path.relative_to("/")), path, None))
    return entries


def say(what: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def first_output(command: list[str], env: dict[str, str]) -> float:
    """Seconds until ``command`` prints its first line (it must then finish well)."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    took = time.monotonic() - started
    _out, err = proc.communicate(timeout=600)
    if line.strip() != "started" or proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}...: {line!r} {err}")
    return took


def one(case: str, reference: str, keys: Path, work: Path, proxy) -> tuple[float, float, int]:  # noqa: ANN001
    from tests.vm.conftest import cli
    from tests.vm.test_containerd import Containerd

    base = Path(tempfile.mkdtemp(dir=work))
    os.environ["EROFS_MOUNT_CACHE_DIR"] = str(base / "cache")
    options = "insecure" + (f",index-key={keys / 'index.pub'}" if case in ("i", "p") else ",index=off")
    if case in ("p", "t"):
        reference = reference.replace("/bench/python:", f"/bench/python-{case}:")
    containerd = Containerd(base, options)
    sent = proxy.sent_bytes
    try:
        started = time.monotonic()
        if case == "o":
            containerd.ctr("image", "pull", "--plain-http", reference, timeout=1800)
            run = [f"{containerd.env['PATH'].split(':')[0]}/ctr", "--address", str(containerd.socket), "run", "--rm",
                   reference, f"bench-{case}", *COMMAND]
        else:
            cli("snapshotter", "pull", reference, "-o", "insecure")
            run = [f"{containerd.env['PATH'].split(':')[0]}/ctr", "--address", str(containerd.socket), "run", "--rm",
                   "--snapshotter", "erofs-mount", reference, f"bench-{case}", *COMMAND]
        pulled = time.monotonic() - started
        took = pulled + first_output(run, containerd.env)
        containerd.ctr("image", "rm", "--sync", reference)
        return took, pulled, proxy.sent_bytes - sent
    finally:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)


def publish_with_prefetch(reference: str, work: Path) -> None:
    """The publisher: its own mount of the image runs the command (chroot), then ``index push
    --prefetch-from`` that mount, signed."""
    from erofs_mount_oci.prefetch import FLUSH_EVERY

    from tests.vm.conftest import cli

    mountpoint = work / "publisher-mnt"
    mountpoint.mkdir()
    env = {"EROFS_MOUNT_CACHE_DIR": str(work / "publisher-p")}
    cli("mount", "--source", f"oci:{reference}", "-o", "insecure", str(mountpoint), env=env)
    try:
        subprocess.run(["chroot", str(mountpoint), "/usr/bin/python3", *COMMAND[1:]], check=True,
                       capture_output=True)
        time.sleep(FLUSH_EVERY + 1)  # the daemon keeps its list every few seconds
        cli("index", "push", f"oci:{reference}", "-o", "insecure", "--sign", str(work / "index.key"),
            "--prefetch-from", str(mountpoint), env=env)
    finally:
        cli("umount", str(mountpoint), env=env)


def bench(runs: int, mib: int, cases: list[str]) -> None:
    from tests.oci.faultproxy import FaultProxy
    from tests.oci.registry import Registry
    from tests.oci.test_tar_images import diff_id
    from tests.vm.conftest import cli

    work = Path(tempfile.mkdtemp(prefix="container-start-"))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(work)], check=True)
    registry = Registry(work / "registry")
    proxy = FaultProxy(registry.host)
    try:
        say("making the image's layers and pushing them")
        layers = python_layers(mib)
        registry.push_image("bench/python", "t", [(b, GZIP) for b in layers], diff_ids=[diff_id(b) for b in layers])
        for name, args in (("index.key", ["genpkey", "-algorithm", "ed25519", "-out"]),
                           ("index.pub", ["pkey", "-in", str(work / "index.key"), "-pubout", "-out"])):
            subprocess.run(["openssl", *args, str(work / name)], check=True)
        say("publishing the image's index")
        cli("index", "push", f"oci:{registry.host}/bench/python:t", "-o", "insecure", "--sign",
            str(work / "index.key"), env={"EROFS_MOUNT_CACHE_DIR": str(work / "publisher")})
        if "p" in cases:
            registry.push_image("bench/python-p", "t", [(b, GZIP) for b in layers],
                                diff_ids=[diff_id(b) for b in layers])
            say("publishing an index with the prefetch list of a publisher's run")
            publish_with_prefetch(f"{registry.host}/bench/python-p:t", work)
        if "t" in cases:
            say("copying the image to zstd:chunked (skopeo)")
            subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", "-f", "oci",
                            "--dest-compress-format", "zstd:chunked", f"docker://{registry.host}/bench/python:t",
                            f"docker://{registry.host}/bench/python-t:t"], check=True, timeout=1200)
        proxy.latency, proxy.rate = LATENCY, RATE
        reference = f"{proxy.host}/bench/python:t"
        results: dict[str, list[tuple[float, float, int]]] = {case: [] for case in cases}
        for run in range(runs):
            order = cases if run % 2 == 0 else cases[::-1]
            for case in order:
                results[case].append(one(case, reference, work, work, proxy))
                took, pulled, sent = results[case][-1]
                print(f"run {run + 1} ({case}): {took:.1f} s (pull {pulled:.1f} s), {sent >> 20} MiB", file=sys.stderr)
        total = sum(len(b) for b in layers)
        print(f"image: {len(layers)} gzip layers, {total >> 20} MiB compressed; command: {' '.join(COMMAND)}")
        base = statistics.median(t for t, _, _ in results["o"])
        print(f"{'':36} {'first output':>12} {'ratio':>6} {'of it, pull':>11} {'through the proxy':>18}")
        for case, name in CASES.items():
            if case not in cases:
                continue
            seconds = statistics.median(t for t, _, _ in results[case])
            pulled = statistics.median(p for _, p, _ in results[case])
            sent = statistics.median(b for _, _, b in results[case])
            print(f"({case}) {name:32} {seconds:10.1f} s {seconds / base:5.2f}x {pulled:9.1f} s "
                  f"{sent / (1 << 20):14.1f} MiB")
    finally:
        proxy.stop()
        registry.stop()
        subprocess.run(["umount", "-l", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=150, help="uncompressed size of the image (default 150)")
    parser.add_argument("--cases", default="oiptn",
                        help="which cases, by their letters (default oiptn); (o), the baseline, is always run")
    args = parser.parse_args()
    cases = ["o", *(c for c in CASES if c in args.cases and c != "o")]
    if set(args.cases) - set(CASES):
        parser.error(f"--cases: unknown case(s) {''.join(sorted(set(args.cases) - set(CASES)))}")
    if os.geteuid() != 0:
        raise SystemExit("run it as root: it mounts")
    if os.environ.get("VMTEST_GUEST") != "1":
        print("running in the test VM (emulated): this kernel has no nbd driver", file=sys.stderr)
        sys.exit(subprocess.run([str(VM_RUN), "--cpus", "2", "--mem", "4G", "--timeout", "7200", "--",
                                 sys.executable, __file__, "--runs", str(args.runs), "--mib",
                                 str(args.mib), "--cases", "".join(cases)]).returncode)
    subprocess.run(["modprobe", "nbd"], check=False)
    bench(args.runs, args.mib, cases)


if __name__ == "__main__":
    main()
