"""``erofs-mount serve`` with real NBD clients: libnbd's nbdinfo, nbdcopy and nbdfuse.

These run on the host (no nbd driver needed): nbdfuse turns the export into a
file that the host kernel mounts as EROFS through a loop device.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.imagetree import file_sha256, make_tree, mkfs

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("serve")
    sums = make_tree(base / "tree", files=60, max_size=2 << 20)
    return mkfs(base / "image.erofs", base / "tree"), sums


class Server:
    def __init__(self, spec: str, sock: Path, *options: str, preexec_fn: Any = None) -> None:
        self.sock = sock
        self.proc = subprocess.Popen([EROFS_MOUNT, "serve", "--source", spec, *options, "--socket", str(sock)],
                                     stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        self.said = ""
        assert self.proc.stderr is not None
        while "serving " not in self.said:  # its first line comes once it listens (the file is bound before)
            line = self.proc.stderr.readline()
            assert line, f"serve did not start listening: {self.said}"
            self.said += line

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=20)
        return self.said + err


@pytest.fixture
def server(image: tuple[Path, dict[str, str]], tmp_path: Path) -> Iterator[Server]:
    s = Server(f"local:{image[0]}", tmp_path / "nbd.sock")
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_nbdinfo_reports_size_and_read_only(server: Server, image: tuple[Path, dict[str, str]]) -> None:
    out = subprocess.run(["nbdinfo", "--json", server.uri], check=True, capture_output=True, text=True).stdout
    (export,) = json.loads(out)["exports"]
    assert export["export-size"] == image[0].stat().st_size
    assert export["is_read_only"] is True
    assert export["can_multi_conn"] is True


def test_nbdcopy_copies_byte_for_byte(server: Server, image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    for request_size in ("4096", "262144", "4194304"):
        copy = tmp_path / f"copy-{request_size}.img"
        subprocess.run(["nbdcopy", f"--request-size={request_size}", server.uri, str(copy)], check=True)
        assert file_sha256(copy) == file_sha256(image[0])


def test_nbdfuse_file_mounts_as_erofs(server: Server, image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    check_nbdfuse_mount(server, image[1], tmp_path)


def check_nbdfuse_mount(server: Server, sums: dict[str, str], tmp_path: Path) -> None:
    """nbdfuse exposes the export as a file; the host mounts it (erofs on loop) and checks every file."""
    fuse_dir, mnt = tmp_path / "fuse", tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", "--readonly", str(fuse_dir / "image"), server.uri])
    try:
        for _ in range(200):
            if (fuse_dir / "image").exists():
                break
            time.sleep(0.05)
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(fuse_dir / "image"), str(mnt)], check=True)
        try:
            for rel, digest in sums.items():
                assert file_sha256(mnt / rel) == digest, rel
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], check=False)
        fuse.wait(20)


def _raw_client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(10)
    return s


def test_two_clients_and_a_misbehaving_one(server: Server, image: tuple[Path, dict[str, str]],
                                          tmp_path: Path) -> None:
    bad = [_raw_client(server.sock) for _ in range(4)]
    bad[0].sendall(b"garbage" * 10)                                    # not even client flags
    bad[1].sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0))  # wrong option magic
    bad[2].sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 1 << 30))  # huge option
    bad[3].sendall(struct.pack(">I", 3)[:2])                            # half of the client flags, then silence
    copies = [tmp_path / "a.img", tmp_path / "b.img"]
    procs = [subprocess.Popen(["nbdcopy", server.uri, str(c)]) for c in copies]
    assert [p.wait(60) for p in procs] == [0, 0]
    for c in copies:
        assert file_sha256(c) == file_sha256(image[0])
    for s in bad[:3]:
        assert s.recv(65536, socket.MSG_WAITALL) is not None  # server closes them
    for s in bad:
        s.close()
    err = server.stop()
    assert "bad option magic" in err and "too large" in err


def test_a_client_that_dies_mid_request_does_not_stop_the_server(server: Server,
                                                                image: tuple[Path, dict[str, str]]) -> None:
    s = _raw_client(server.sock)
    greeting = s.recv(18, socket.MSG_WAITALL)
    assert greeting[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 1, 0))  # EXPORT_NAME ""
    size, _flags = struct.unpack(">QH", s.recv(10, socket.MSG_WAITALL))
    assert size == image[0].stat().st_size
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096)[:13])  # half a request
    s.close()
    out = subprocess.run(["nbdinfo", "--size", server.uri], check=True, capture_output=True, text=True).stdout
    assert int(out) == size
    assert "after 13 of 28 bytes" in server.stop()


def test_sigterm_removes_the_socket(server: Server) -> None:
    err = server.stop()
    assert server.proc.returncode == 0
    assert not server.sock.exists()
    assert "stopping" in err


def test_sigterm_at_any_moment_of_start_up_ends_cleanly(image: tuple[Path, dict[str, str]],
                                                         tmp_path: Path) -> None:
    """A signal while the server binds, logs or starts waiting: exit 0, socket gone, no hang."""
    for attempt in range(25):
        sock = tmp_path / f"s{attempt}.sock"
        proc = subprocess.Popen([EROFS_MOUNT, "serve", "--source", f"local:{image[0]}", "--socket", str(sock)],
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(attempt % 5 / 2000)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err and "Logging error" not in err, err
        assert not sock.exists()


@pytest.mark.timeout(10)
def test_a_stop_signal_cannot_be_lost() -> None:
    """Its exception passes `except Exception` (as in logging), and a lost one still ends wait()."""
    from erofs_mount_core import _serve as serving

    with serving._StopSignals() as signals:
        with pytest.raises(serving._Stop):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Exception:
                pass
        with pytest.raises(serving._Stop):
            signals.wait()  # the signal came and went before wait(): it must not sleep forever
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_bad_listen_arguments() -> None:
    for args in (["--listen", "nonsense"], [], ["--socket", "/tmp/x.sock", "--listen", "127.0.0.1:1"]):
        proc = subprocess.run([EROFS_MOUNT, "serve", "--any-bytes", "--source", "local:/etc/hostname", *args],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("Error: "), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/tmp/x.sock")


def serve_run(image: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"local:{image}", *args, "--run", command],
                          capture_output=True, text=True, timeout=60)


def test_run_serves_the_command_on_a_private_socket_then_exits(image: tuple[Path, dict[str, str]],
                                                               tmp_path: Path) -> None:
    copy = tmp_path / "copy.img"
    result = serve_run(image[0], f'nbdcopy "$uri" {copy} && echo "$unixsocket"')
    assert result.returncode == 0, result.stderr
    assert file_sha256(copy) == file_sha256(image[0])
    private_socket = Path(result.stdout.strip())
    assert private_socket.name == "nbd.sock" and not private_socket.parent.exists()


def test_run_passes_on_the_exit_status_and_the_tcp_port(image: tuple[Path, dict[str, str]]) -> None:
    assert serve_run(image[0], "exit 3").returncode == 3
    result = serve_run(image[0], 'nbdinfo --size "$uri"; echo "$port"', "--listen", "127.0.0.1:0")
    assert result.returncode == 0, result.stderr
    size, port = result.stdout.split()
    assert int(size) == image[0].stat().st_size and int(port) > 0


def test_sigterm_stops_the_run_command_too(image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    proc = subprocess.Popen([EROFS_MOUNT, "serve", "-q", "--source", f"local:{image[0]}",
                             "--run", f"echo $$ > {marker}; exec sleep 60"], stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.05)
    child = int(marker.read_text())
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_stop_that_comes_as_the_run_command_starts_ends_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM between the --run command's fork and the return of its handle (on a loaded machine the command
    runs before that): the command is ended all the same, not left holding serve's stderr for a minute."""
    from erofs_mount_core import _serve

    real, started = subprocess.Popen, []

    def started_then_stopped(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGTERM)
        return started[-1]

    monkeypatch.setattr(_serve.subprocess, "Popen", started_then_stopped)
    try:
        with _serve._StopSignals() as signals, pytest.raises(_serve._Stop):
            _serve._run_captive("exec sleep 60", "unix:/nonexistent.sock", signals)
        assert started[0].poll() is not None, "the --run command outlived serve's stop"
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


# -- a client cannot take the server down: timeouts, a cap, descriptors run out ---------------

def _wait_closed(s: socket.socket, within: float) -> bytes:
    """Everything the server sent until it closed the connection; fails if it is still open after ``within``."""
    s.settimeout(within)
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    return got


def test_a_client_that_never_negotiates_is_dropped(image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    server = Server(f"local:{image[0]}", tmp_path / "nbd.sock", "--handshake-timeout", "1")
    try:
        silent = _raw_client(server.sock)
        assert _wait_closed(silent, within=10)[:8] == b"NBDMAGIC"  # the greeting, then nothing, then closed
        silent.close()
        assert subprocess.run(["nbdinfo", "--size", server.uri], capture_output=True, timeout=30).returncode == 0
    finally:
        err = server.stop()
    assert "no handshake within 1 s" in err


def test_clients_past_the_cap_are_turned_away(image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    server = Server(f"local:{image[0]}", tmp_path / "nbd.sock", "--max-clients", "2")
    try:
        held = [_raw_client(server.sock) for _ in range(2)]
        for s in held:
            assert s.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
        extra = _raw_client(server.sock)
        assert _wait_closed(extra, within=10) == b"", "turned away without a greeting"
        extra.close()
        for s in held:
            s.close()
        time.sleep(0.5)
        assert subprocess.run(["nbdinfo", "--size", server.uri], capture_output=True, timeout=30).returncode == 0
    finally:
        err = server.stop()
    assert "refused: 2 clients already" in err


def test_running_out_of_descriptors_does_not_stop_accepting(image: tuple[Path, dict[str, str]],
                                                           tmp_path: Path) -> None:
    import resource

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    server = Server(f"local:{image[0]}", tmp_path / "nbd.sock", preexec_fn=few_descriptors)
    try:
        crowd = [_raw_client(server.sock) for _ in range(40)]  # more than the server can hold open
        time.sleep(1)
        for s in crowd:
            s.close()
        time.sleep(1)
        out = subprocess.run(["nbdinfo", "--size", server.uri], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and int(out.stdout) == image[0].stat().st_size
    finally:
        err = server.stop()
    assert "accepting a client failed" in err


def test_a_file_whose_name_is_not_utf8_is_served(image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.erofs")
    os.symlink(os.fsencode(image[0]), odd)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([os.fsencode(EROFS_MOUNT), b"serve", b"--source", b"local:" + odd, b"--socket",
                             os.fsencode(sock)], stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        out = subprocess.run(["nbdinfo", "--json", f"nbd+unix:///?socket={sock}"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["exports"][0]["export-size"] == image[0].stat().st_size
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert b"Traceback" not in err


def test_a_second_server_on_a_live_socket_is_refused_and_each_removes_only_its_own(
        image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    first = Server(f"local:{image[0]}", sock)
    try:
        second = subprocess.run([EROFS_MOUNT, "serve", "--any-bytes", "--source", "local:/etc/hostname",
                                 "--socket", str(sock)], capture_output=True, text=True, timeout=30)
        assert second.returncode == 2 and "address in use" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        info = subprocess.run(["nbdinfo", "--size", first.uri], capture_output=True, text=True, check=True)
        assert int(info.stdout) == image[0].stat().st_size, "clients of the socket still reach the first server"
        sock.unlink()  # the socket file replaced under the first server by another's
        other = Server("local:/etc/hostname", sock, "--any-bytes")
        first.stop()
        assert sock.exists(), "the first server removed a socket it did not make"
        other.stop()
        assert not sock.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.proc.kill()


def test_a_stale_socket_of_a_killed_server_is_taken_over(image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    killed = Server(f"local:{image[0]}", sock)
    killed.proc.kill()
    killed.proc.communicate()
    assert sock.exists()
    again = Server(f"local:{image[0]}", sock)
    deadline = time.monotonic() + 30
    while subprocess.run(["nbdinfo", "--size", again.uri], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline and again.proc.poll() is None, "the stale socket was not taken over"
        time.sleep(0.1)
    again.stop()
    assert again.proc.returncode == 0 and not sock.exists()


def test_a_socket_path_too_long_and_a_timeout_that_is_no_number_are_one_line(tmp_path: Path) -> None:
    long = tmp_path / ("s" * 120)
    for args, says in ((["--socket", str(long)], "AF_UNIX path too long"),
                       (["--socket", str(tmp_path / "s"), "--handshake-timeout", "nan"], "is not a number of seconds"),
                       (["--socket", str(tmp_path / "s"), "--handshake-timeout", "inf"], "")):
        proc = subprocess.run([EROFS_MOUNT, "serve", "--any-bytes", "--source", "local:/etc/hostname", *args],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and says in proc.stderr and "None" not in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_killed_run_s_private_directory_is_removed_by_the_next_run(image: tuple[Path, dict[str, str]]) -> None:
    import glob
    import tempfile

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "erofs-mount-serve-*")))
    proc = subprocess.Popen([EROFS_MOUNT, "serve", "-q", "--source", f"local:{image[0]}", "--run", "sleep 60"],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (left := set(glob.glob(os.path.join(tempfile.gettempdir(), "erofs-mount-serve-*/nbd.sock")))):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    leftover = {os.path.dirname(p) for p in left} - before
    assert leftover and all(os.path.isdir(d) for d in leftover)
    live = subprocess.Popen([EROFS_MOUNT, "serve", "-q", "--source", f"local:{image[0]}", "--run", "sleep 60"],
                            stderr=subprocess.DEVNULL)  # a live one: its directory is left alone
    time.sleep(1)
    done = subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"local:{image[0]}", "--run", "true"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not any(os.path.exists(d) for d in leftover), "the killed server's directory is still there"
    assert live.poll() is None and len(set(glob.glob(os.path.join(tempfile.gettempdir(),
                                                                  "erofs-mount-serve-*"))) - before) == 1
    live.kill()
    live.wait()


def test_serve_interrupted_while_its_source_opens_exits_130(tmp_path: Path) -> None:
    """A large archive is still being indexed when SIGINT comes: interrupted (130), not a clean stop (0)."""
    import tarfile

    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(200_000):
            tar.addfile(tarfile.TarInfo(f"f{i}"))
    proc = subprocess.Popen([EROFS_MOUNT, "serve", "--source", f"tar:{archive}", "--run", "true"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                     "EROFS_MOUNT_CACHE_DIR": str(tmp_path / "c")})
    deadline = time.monotonic() + 120
    while not (tmp_path / "c" / "tar-index").is_dir():  # the source is opening: its index is looked for first
        assert proc.poll() is None and time.monotonic() < deadline, "serve ended before it opened the source"
        time.sleep(0.01)
    assert proc.poll() is None, "the archive was indexed before the signal: make it larger"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


@pytest.mark.parametrize("what", ["random", "empty", "ext4", "tar.gz", "truncated"])
def test_serve_exports_only_an_erofs_image_unless_any_bytes_says_so(what: str, image: tuple[Path, dict[str, str]],
                                                                    tmp_path: Path) -> None:
    path = tmp_path / what
    if what == "random":
        path.write_bytes(os.urandom(1 << 16))
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "ext4":
        path.write_bytes(bytes(4 << 20))
        subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    elif what == "tar.gz":
        subprocess.run(["tar", "-czf", str(path), "-C", str(image[0].parent), image[0].name], check=True)
    else:
        path.write_bytes(image[0].read_bytes()[:image[0].stat().st_size // 2])
    refused = subprocess.run([EROFS_MOUNT, "serve", "--source", f"local:{path}", "--run", "true"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 4 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "EROFS image" in refused.stderr and str(path) in refused.stderr, refused.stderr
    served = subprocess.run([EROFS_MOUNT, "serve", "-q", "--any-bytes", "--source", f"local:{path}", "--run",
                             'nbdinfo --size "$uri"'], capture_output=True, text=True, timeout=60)
    assert served.returncode == 0 and int(served.stdout) >= path.stat().st_size, served.stderr


def test_tar_of_an_erofs_image_is_no_empty_archive(image: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    env = {**os.environ, "EROFS_MOUNT_CACHE_DIR": str(tmp_path / "cache")}
    refused = subprocess.run([EROFS_MOUNT, "serve", "--source", f"tar:{image[0]}", "--run", "true"],
                             capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 4 and "is not a tar archive: it holds no entry" in refused.stderr, refused.stderr
    empty = tmp_path / "empty.tar"
    empty.write_bytes(bytes(10240))
    served = subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"tar:{empty}", "--run", "true"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert served.returncode == 0, served.stderr
