"""Containers from lazy layers: Debian's containerd 1.6 and runc, with erofs-mount's snapshotter as a proxy plugin.

The image is real files (the guest's own dash, coreutils and findutils with
the libraries they link, and data files) in four gzip layers, the last of
which deletes a file of the one before (a whiteout) and makes a directory
opaque, in docker-registry on loopback behind a proxy that logs every
request, with an index published by another cache. Then, as a user would:
``erofs-mount snapshotter pull``, ``ctr run --snapshotter erofs-mount``.

containerd needs a tmpfs for its state (overlayfs cannot have its upper
directory on the guest's overlay root), as the snapshotter's root does,
and cgroup2 mounted for runc.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import cli, devices
from tests.vm.test_local_mount import evict

pytestmark = [pytest.mark.usefixtures("clean_system")]

CONTAINERD = Path("/var/cache/erofs-mount-test/containerd")
EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
TOOLS = ["/bin/dash", "/bin/cat", "/usr/bin/sha256sum", "/usr/bin/find", "/bin/rm", "/bin/ls", "/bin/sleep"]


def _layer(entries: list[tuple[str, Path | None, bytes | None]]) -> bytes:
    """A gzip tar layer: (name in the image, a file of this machine to copy, or bytes; neither: a directory)."""
    import gzip
    import io

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path, data in entries:
            if path is not None:
                info = tar.gettarinfo(str(path), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            elif data is not None:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
            else:
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tar.addfile(info)
    return gzip.compress(out.getvalue(), mtime=0)


def image_layers() -> list[bytes]:
    """Four layers: the libraries, the tools, data files, and a layer that deletes and hides some of them."""
    libraries: dict[str, Path] = {}  # the name each binary asks for (ldd's left side) -> the file
    for tool in TOOLS:
        for line in subprocess.run(["ldd", tool], capture_output=True, text=True, check=True).stdout.splitlines():
            parts = line.split()
            if "=>" in parts and parts[2].startswith("/"):
                libraries[f"lib/x86_64-linux-gnu/{parts[0]}"] = Path(os.path.realpath(parts[2]))
            elif parts and parts[0].startswith("/") and "ld-linux" in parts[0]:
                libraries[parts[0].lstrip("/")] = Path(os.path.realpath(parts[0]))
    lib_entries: list[tuple[str, Path | None, bytes | None]] = [(n, p, None) for n, p in sorted(libraries.items())]
    dirs = sorted({str(Path(n).parent) for n, _, _ in lib_entries} | {"bin", "usr", "usr/bin"})
    lib_layer = [(d, None, None) for d in dirs] + lib_entries
    tool_layer = [(t.lstrip("/"), Path(os.path.realpath(t)), None) for t in TOOLS] + \
        [("bin/sh", Path("/bin/dash"), None)]
    data_files = sorted(p for p in Path("/usr/share/zoneinfo/Europe").iterdir() if p.is_file() and not p.is_symlink())
    data_layer = [("data", None, None), ("data/keep", None, None), ("data/hidden", None, None)] + \
        [(f"data/keep/{p.name}", p, None) for p in data_files[:40]] + \
        [(f"data/hidden/{p.name}", p, None) for p in data_files[40:50]] + \
        [("data/gone", None, b"deleted by the next layer\n"), ("data/big", Path(EROFS_MOUNT), None)]
    big = bytes(range(256)) * (3 << 12)  # 3 MiB of this, read by a container while its layer's daemon is dead
    changes = [("data", None, None), ("data/.wh.gone", None, b""), ("data/hidden", None, None),
               ("data/hidden/.wh..wh..opq", None, b""), ("data/hidden/new", None, b"after the opaque dir\n"),
               ("data/blob", None, big)]
    return [_layer(lib_layer), _layer(tool_layer), _layer(data_layer), _layer(changes)]


class Containerd:
    """containerd (root and state on tmpfs) with the snapshotter as its proxy plugin ``erofs-mount``."""

    def __init__(self, base: Path, options: str, cri_hosts: Path | None = None, sandbox_image: str = "") -> None:
        """``cri_hosts``: with containerd's CRI plugin, as a Kubernetes node configures it for this snapshotter
        (registries' hosts.toml in that directory); without it, the plugin is off (it starts slowly).
        ``sandbox_image``: the CRI plugin's pod sandbox ("pause") image."""
        self.base, self.options = base, options
        self.socket = Path("/run/containerd/containerd.sock")
        self.snapshotter_socket = Path("/run/erofs-mount/snapshotter.sock")
        self.root = base / "snapshotter"
        for where in (Path("/var/lib/containerd"), self.root):
            where.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
        if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
            subprocess.run(["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"], check=True)
        config = base / "containerd.toml"
        cri = "" if cri_hosts is not None else '"io.containerd.grpc.v1.cri", '
        config.write_text(f'''version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = [{cri}"io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[proxy_plugins.erofs-mount]
  type = "snapshot"
  address = "{self.snapshotter_socket}"
''' + ("" if cri_hosts is None else f'''
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image or 'registry.k8s.io/pause:3.6'}"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "erofs-mount"
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{cri_hosts}"
'''))
        self.env = {**os.environ, "PATH": f"{CONTAINERD}/usr/bin:{CONTAINERD}/usr/sbin:{os.environ['PATH']}"}
        self.snapshotter = self.start_snapshotter()
        self.log = open(base / "containerd.log", "w")  # noqa: SIM115 - closed by stop()
        self.daemon = subprocess.Popen([f"{CONTAINERD}/usr/bin/containerd", "--config", str(config)],
                                       stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        _wait_for(self.socket, "containerd")

    def start_snapshotter(self) -> subprocess.Popen[str]:
        self.snapshotter_socket.unlink(missing_ok=True)  # (a killed one leaves its socket: wait for the new one)
        with open(self.base / "snapshotter.log", "a") as log:
            proc = subprocess.Popen([EROFS_MOUNT, "snapshotter", "--address", str(self.snapshotter_socket),
                                     "--root", str(self.root), "-o", self.options], stderr=log, env=self.env)
        _wait_for(self.snapshotter_socket, "the snapshotter")
        return proc

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([f"{CONTAINERD}/usr/bin/ctr", "--address", str(self.socket), *args],
                                capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {result.stderr}\n{self.logs()}")
        return result

    def reconnected(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``ctr`` once containerd has connected to the snapshotter again (it dials a proxy plugin that went away
        with a back-off of its own)."""
        deadline = time.monotonic() + timeout
        while (result := self.ctr(*args, check=False)).returncode != 0 and "connection error" in result.stderr:
            assert time.monotonic() < deadline, f"containerd did not reach the snapshotter again: {result.stderr}"
            time.sleep(1)
        assert result.returncode == 0, result.stderr
        return result

    def view_kept_from_collection(self, key: str, parent: str) -> None:
        """A view containerd's collector leaves alone (``ctr snapshots view`` labels none as a root, unlike
        ``prepare``, so a collection that a prior ``ctr run --rm`` set off may take it at any moment)."""
        import grpc
        from erofs_mount_containerd._api import snapshots_pb2, snapshots_pb2_grpc

        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            snapshots_pb2_grpc.SnapshotsStub(channel).View(
                snapshots_pb2.ViewSnapshotRequest(snapshotter="erofs-mount", key=key, parent=parent,
                                                  labels={"containerd.io/gc.root": "test"}),
                metadata=[("containerd-namespace", "default")], timeout=120)

    def logs(self) -> str:
        return "".join(f"--- {n}\n{(self.base / n).read_text()[-3000:]}" for n in ("snapshotter.log", "containerd.log"))

    def stop(self) -> None:
        for proc in (self.daemon, self.snapshotter):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()
        self.snapshotter_socket.unlink(missing_ok=True)
        for where in (Path("/var/lib/containerd"), self.root):
            subprocess.run(["umount", "-l", str(where)], check=False)


    def assert_nothing_left(self, namespace: str = "default") -> None:
        """No snapshot, device, layer mount or snapshot directory."""
        assert self.ctr("-n", namespace, "snapshots", "--snapshotter", "erofs-mount", "ls").stdout.strip() \
            .splitlines()[1:] == []
        assert devices() == []
        assert os.listdir(self.root / "layers") == [] and os.listdir(self.root / "snapshots") == []


@contextlib.contextmanager
def containerd_running(base: Path, options: str, cri_hosts: Path | None = None,
                       sandbox_image: str = "") -> Iterator[Containerd]:
    """containerd and the snapshotter for the test; their logs printed if it fails."""
    containerd = Containerd(base, options, cri_hosts, sandbox_image)
    try:
        yield containerd
    except BaseException:
        print(containerd.logs())
        raise
    finally:
        containerd.stop()


def _wait_for(path: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{what} did not listen on {path}"
        time.sleep(0.1)


@contextlib.contextmanager
def watching() -> Iterator[subprocess.Popen[str]]:
    """``erofs-mount watch``, as a host runs it: a dead layer's device reattached on the kernel's word."""
    proc = subprocess.Popen([EROFS_MOUNT, "watch"], stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def push_with_signed_index(registry, repository: str, layers: list[bytes], keys: Path,  # noqa: ANN001
                           run: dict[str, object] | None = None) -> None:
    """``repository:t`` of gzip ``layers`` (``run``: its config's Cmd...), and its index published by another
    cache, signed by ``keys/index.key`` (``keys/index.pub``, made here, is what a host trusts)."""
    from tests.oci.test_tar_images import diff_id

    for name in ("index.key", "index.pub"):
        args = ["genpkey", "-algorithm", "ed25519", "-out"] if name.endswith(".key") else \
            ["pkey", "-in", str(keys / "index.key"), "-pubout", "-out"]
        subprocess.run(["openssl", *args, str(keys / name)], check=True)
    registry.push_image(repository, "t", [(b, GZIP_LAYER) for b in layers], diff_ids=[diff_id(b) for b in layers],
                        run=run)
    cli("index", "push", f"oci:{registry.host}/{repository}:t", "-o", "insecure", "--sign", str(keys / "index.key"),
        env={"EROFS_MOUNT_CACHE_DIR": str(keys / "publisher")})


def listing(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.strip())


# (no kernel series does it otherwise: it runs in the newer kernel's guest, whose lane has room for it)
@pytest.mark.kernel(newer="only")
def test_ctr_runs_an_image_whose_layers_erofs_mount_serves_and_survives_what_a_host_does_to_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.oci.faultproxy import FaultProxy
    from tests.oci.registry import Registry
    from tests.oci.test_tar_images import flatten, whole_gets

    layers = image_layers()
    expected = flatten([(b, GZIP_LAYER) for b in layers], tmp_path / "flat")
    dirs = "/bin /data /lib /usr"
    find = f"find {dirs} -printf '%p|%y|%m|%l\\n'; find {dirs} -type f -exec sha256sum {{}} +"
    flat = subprocess.run(["chroot", str(expected), "/bin/sh", "-c", find], capture_output=True, text=True,
                          check=True).stdout  # the same tools, over the flattening
    registry = Registry(tmp_path / "registry")
    proxy = FaultProxy(registry.host)
    try:
        push_with_signed_index(registry, "team/app", layers, tmp_path)
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "fresh-host"))
        reference = f"{proxy.host}/team/app:t"
        with containerd_running(tmp_path, f"insecure,index-key={tmp_path / 'index.pub'}") as containerd:
            pulled = cli("snapshotter", "pull", reference, "-o", "insecure")
            assert pulled.out.strip() == reference, pulled
            assert "snapshotter pull --in-process" in (tmp_path / "snapshotter.log").read_text(), \
                "the pull ran in the snapshotter, handed over"
            assert len(devices()) == len(layers), "one erofs-mount device per layer"
            blobs = {hashlib.sha256(b).hexdigest() for b in layers}
            assert not set(whole_gets(proxy)) & blobs, "a layer was downloaded"

            # the container's output, and its rootfs seen from inside: the OCI flattening, entry by entry
            run = containerd.ctr("run", "--rm", "--snapshotter", "erofs-mount", reference, "first",
                                 "/bin/sh", "-c", "cat /data/hidden/new; " + find)
            assert run.stdout.startswith("after the opaque dir\n"), run.stdout[:500]
            assert listing(run.stdout.removeprefix("after the opaque dir\n")) == listing(flat)

            # writes go to the container's own upper directory: a second container sees the image as it was
            containerd.ctr("run", "--rm", "--snapshotter", "erofs-mount", reference, "writer", "/bin/sh", "-c",
                           "echo new > /data/new && rm /data/keep/Paris && cat /data/new")
            second = containerd.ctr("run", "--rm", "--snapshotter", "erofs-mount", reference, "reader", "/bin/ls",
                                    "/data", "/data/keep/Paris")
            assert "new" not in second.stdout.split() and "/data/keep/Paris" in second.stdout, second.stdout

            # kill -9 of a layer's daemon while a container reads from it: its reads wait, then complete
            where = str(containerd.root / "layers" / hashlib.sha256(layers[3]).hexdigest())
            (row,) = [r for r in devices() if where in r["mountpoints"]]
            evict(Path(row["mountpoints"][0]), row["device"])
            with watching():
                os.kill(int(row["daemon_pid"]), signal.SIGKILL)
                reader = containerd.ctr("run", "--rm", "--snapshotter", "erofs-mount", reference, "while-dead",
                                        "/usr/bin/sha256sum", "/data/blob", timeout=600)
            assert reader.stdout.split()[0] == hashlib.sha256(bytes(range(256)) * (3 << 12)).hexdigest()

            # the snapshotter killed and started again: the same snapshots, and a new container runs; the host
            # "rebooted" meanwhile (no layer mounted, no device: erofs-mount umount of each), so the snapshotter
            # mounts each layer a snapshot uses again as it starts
            before = listing(containerd.ctr("snapshots", "--snapshotter", "erofs-mount", "ls").stdout)
            containerd.snapshotter.kill()
            containerd.snapshotter.wait()
            for row in devices():
                cli("umount", row["mountpoints"][0])
            assert devices() == []
            containerd.snapshotter = containerd.start_snapshotter()
            assert listing(containerd.reconnected("snapshots", "--snapshotter", "erofs-mount", "ls").stdout) == before
            assert len(devices()) == len(layers), "each layer mounted again at the snapshotter's start"
            again = containerd.ctr("run", "--rm", "--snapshotter", "erofs-mount", reference, "after-restart",
                                   "/bin/cat", "/data/hidden/new")
            assert again.stdout == "after the opaque dir\n"

            # the image removed and collected: no device, mount, record or directory is left
            containerd.ctr("image", "rm", "--sync", reference)
            containerd.assert_nothing_left()
    finally:
        proxy.stop()
        registry.stop()
        shutil.rmtree(tmp_path / "flat", ignore_errors=True)


def sparse_layer(tmp_path: Path) -> tuple[bytes, str]:
    """A layer erofs-mount refuses (a sparse file, in PAX form: not supported yet) and containerd unpacks; the
    sha256 of that file."""
    import gzip

    where = tmp_path / "sparse"
    where.mkdir()
    with open(where / "holey", "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"data")
    stream = subprocess.run(["tar", "--format=posix", "--sparse", "--numeric-owner", "-C", str(where), "-cf", "-",
                             "holey"], capture_output=True, check=True).stdout
    expected = hashlib.sha256((where / "holey").read_bytes()).hexdigest()
    return gzip.compress(stream, mtime=0), expected


@pytest.mark.kernel
def test_bad_requests_through_ctr_and_a_layer_erofs_mount_cannot_mount(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each bad request is one clear error and changes no snapshot; a layer erofs-mount refuses is applied by
    containerd (its diff service), and the image runs."""
    from erofs_mount_containerd.pull import chain_ids

    from tests.oci.registry import Registry
    from tests.oci.test_tar_images import diff_id

    tools = image_layers()[:2]
    sparse, holey_sha256 = sparse_layer(tmp_path)
    layers = [*tools, sparse]
    registry = Registry(tmp_path / "registry")
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        registry.push_image("team/sparse", "t", [(b, GZIP_LAYER) for b in layers],
                            diff_ids=[diff_id(b) for b in layers])
        reference = f"{registry.host}/team/sparse:t"
        with containerd_running(tmp_path, "insecure") as containerd:
            cli("snapshotter", "pull", reference, "-o", "insecure")
            assert len(devices()) == 2, "the sparse layer is containerd's, the others erofs-mount's"
            assert "is a sparse file" in (tmp_path / "snapshotter.log").read_text()
            run = containerd.ctr("run", "--rm", "--snapshotter", "erofs-mount", reference, "sparse",
                                 "/usr/bin/sha256sum", "/holey")
            assert run.stdout.split()[0] == holey_sha256

            snapshots = ("snapshots", "--snapshotter", "erofs-mount")
            chain = chain_ids([diff_id(b) for b in layers])  # the snapshots' names: the layers' chain IDs
            containerd.view_kept_from_collection("a-view", chain[-1])
            before = listing(containerd.ctr(*snapshots, "ls").stdout)
            first = chain[0]
            for args in (("info", "no-such-key"), ("prepare", "k1", "no-such-parent"), ("commit", "c1", "a-view"),
                         ("rm", first)):
                failed = containerd.ctr(*snapshots, *args, check=False)
                assert failed.returncode != 0 and len(failed.stderr.strip().splitlines()) == 1, (args, failed.stderr)
            assert listing(containerd.ctr(*snapshots, "ls").stdout) == before, "a bad request changed a snapshot"
            containerd.ctr(*snapshots, "rm", "a-view")

            # a layer another image holds at another place in its chain: mounted once, kept while either image is
            extra = _layer([("extra", None, None), ("extra/file", None, b"the second image\n")])
            registry.push_image("team/second", "t", [(extra, GZIP_LAYER), (tools[0], GZIP_LAYER)],
                                diff_ids=[diff_id(extra), diff_id(tools[0])])
            cli("snapshotter", "pull", f"{registry.host}/team/second:t", "-o", "insecure", "--in-process")
            assert len(devices()) == 3, "the layer both images hold is mounted once"
            containerd.ctr("image", "rm", "--sync", reference)
            assert len(devices()) == 2, "the shared layer stays mounted for the second image"
            containerd.ctr("image", "rm", "--sync", f"{registry.host}/team/second:t")
            containerd.assert_nothing_left()
    finally:
        registry.stop()


def run_pod(runtime, image: str, logs: Path) -> list[str]:  # noqa: ANN001 - CRI's RuntimeServiceStub
    """What a kubelet does for a pod of one container that runs ``cat /etc/motd`` from ``image``: its sandbox
    (the host's network), the container made, started and waited for, then both removed. The lines it
    printed, from its CRI log."""
    from tests.containerd.cri import api_pb2 as cri

    logs.mkdir()
    sandbox = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="reader", uid="6f1b6c1e", namespace="default"),  # host UTS
        log_directory=str(logs), linux=cri.LinuxPodSandboxConfig(security_context=cri.LinuxSandboxSecurityContext(
            namespace_options=cri.NamespaceOption(network=cri.NamespaceMode.Value("NODE")))))
    pod = runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=sandbox), timeout=600).pod_sandbox_id
    try:
        made = runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=sandbox, config=cri.ContainerConfig(
                metadata=cri.ContainerMetadata(name="cat"), image=cri.ImageSpec(image=image),
                command=["/bin/cat", "/etc/motd"], log_path="cat.log")), timeout=600).container_id
        runtime.StartContainer(cri.StartContainerRequest(container_id=made), timeout=600)
        deadline = time.monotonic() + 300
        while (status := runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=made), timeout=60).status
               ).state != cri.ContainerState.Value("CONTAINER_EXITED"):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status.exit_code == 0, status
        printed = [line.split(" ", 3)[3] for line in (logs / "cat.log").read_text().splitlines()]  # TIME STREAM TAG
        runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=made), timeout=120)
    finally:
        runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    return printed


@pytest.mark.kernel
def test_a_kubelet_s_pull_through_containerd_s_cri_plugin_mounts_the_layers_lazily(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Kubernetes setup the user guide gives (CRI's ``snapshotter = "erofs-mount"``,
    ``disable_snapshot_annotations = false``), driven as a kubelet drives it, by CRI's ImageService and
    RuntimeService over gRPC (no crictl is packaged here): containerd's CRI plugin labels each layer's
    Prepare, the snapshotter mounts it from the published index, and no layer is downloaded; a pod then
    runs from it (its sandbox the same image, as the node's pause image, on the host's network: no CNI
    here), its container's output is right, and removing the pod and the image through CRI leaves
    nothing."""
    import grpc

    from tests.containerd.cri import api_pb2 as cri
    from tests.containerd.cri import api_pb2_grpc as cri_grpc
    from tests.oci.faultproxy import FaultProxy
    from tests.oci.registry import Registry
    from tests.oci.test_tar_images import whole_gets

    layers = [*image_layers()[:2], _layer([("etc", None, None), ("etc/motd", None, b"pulled by a kubelet\n")])]
    registry = Registry(tmp_path / "registry")
    proxy = FaultProxy(registry.host)
    try:
        push_with_signed_index(registry, "team/pod", layers, tmp_path, run={"Cmd": ["/bin/sleep", "3600"]})
        monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "node"))
        hosts = tmp_path / "certs.d"
        (hosts / proxy.host).mkdir(parents=True)
        (hosts / proxy.host / "hosts.toml").write_text(f'server = "http://{proxy.host}"\n')
        reference = f"{proxy.host}/team/pod:t"
        with containerd_running(tmp_path, f"insecure,index-key={tmp_path / 'index.pub'}", hosts,
                                sandbox_image=reference) as containerd, \
                grpc.insecure_channel(f"unix:{containerd.socket}") as channel:
            images = cri_grpc.ImageServiceStub(channel)
            pulled = images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=reference)), timeout=600)
            assert pulled.image_ref.startswith("sha256:"), pulled
            assert len(devices()) == len(layers), "one erofs-mount device per layer"
            assert not set(whole_gets(proxy)) & {hashlib.sha256(b).hexdigest() for b in layers}, \
                "containerd or erofs-mount downloaded a layer"
            status = images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=reference)), timeout=60)
            assert status.image.id == pulled.image_ref and reference in status.image.repo_tags

            run = containerd.ctr("-n", "k8s.io", "run", "--rm", "--snapshotter", "erofs-mount", reference, "pod",
                                 "/bin/cat", "/etc/motd")
            assert run.stdout == "pulled by a kubelet\n"
            assert run_pod(cri_grpc.RuntimeServiceStub(channel), reference, tmp_path / "pod-logs") == \
                ["pulled by a kubelet"]

            images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=pulled.image_ref)), timeout=120)
            deadline = time.monotonic() + 120  # containerd collects the image's snapshots after it
            while devices() and time.monotonic() < deadline:
                time.sleep(1)
            containerd.assert_nothing_left("k8s.io")
    finally:
        proxy.stop()
        registry.stop()
