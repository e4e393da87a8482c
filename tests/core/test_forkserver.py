"""CommandServer: erofs-mount's commands run in forks of a warm process, as the executable runs them."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from erofs_mount_core import CommandServer
from tests.vm.conftest import EROFS_MOUNT


@pytest.fixture
def server() -> Iterator[CommandServer]:
    commands = CommandServer()
    try:
        yield commands
    finally:
        commands.close()


def test_a_command_gives_what_the_executable_gives(server: CommandServer, tmp_path: Path) -> None:
    for args in (["--version"], ["list", "--json"], ["mount", "--source", "local:/nonexistent", str(tmp_path / "no")],
                 ["no-such-command"], ["plugins", "oci"]):
        forked = server.run(args, timeout=60)
        executed = subprocess.run([EROFS_MOUNT, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert (forked.returncode, forked.stdout, forked.stderr) == \
            (executed.returncode, executed.stdout, executed.stderr), args


def test_commands_from_many_threads_at_once_each_get_their_own_output(server: CommandServer,
                                                                     tmp_path: Path) -> None:
    results: dict[int, subprocess.CompletedProcess[str]] = {}

    def one(n: int) -> None:
        results[n] = server.run(["mount", "--source", "local:/x", str(tmp_path / f"mountpoint-{n}")], timeout=60)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n, result in results.items():
        assert result.returncode != 0 and result.stdout == ""
        assert result.stderr.splitlines() == [f"Error: mountpoint {tmp_path / f'mountpoint-{n}'} does not exist "
                                              "or is not a directory"], result


def test_a_command_past_its_timeout_is_killed(server: CommandServer, tmp_path: Path) -> None:
    image, sock = tmp_path / "bytes", tmp_path / "serve.sock"
    image.write_bytes(b"\0" * 8192)
    started = time.monotonic()
    result = server.run(["serve", "-s", f"local:{image}", "--any-bytes", "--socket", str(sock)], timeout=3)
    assert result.returncode == 1 and result.stderr.endswith("took more than 3 s"), result
    assert time.monotonic() - started < 30
    assert sock.exists(), "it was serving"
    for _ in range(100):  # SIGKILL: its socket file stays, nobody listens on it
        with socket.socket(socket.AF_UNIX) as client:
            try:
                client.connect(str(sock))
            except ConnectionRefusedError:
                return
        time.sleep(0.05)
    raise AssertionError("the command still serves after its timeout")


def test_a_command_ended_by_a_signal_has_its_negative_status_as_subprocess_gives(server: CommandServer,
                                                                               tmp_path: Path) -> None:
    image = tmp_path / "bytes"
    image.write_bytes(b"\0" * 8192)
    ended: list[subprocess.CompletedProcess[str]] = []
    thread = threading.Thread(target=lambda: ended.append(server.run(
        ["serve", "-s", f"local:{image}", "--any-bytes", "--socket", str(tmp_path / "sock")], timeout=120)))
    thread.start()
    command = None
    for _ in range(400):
        waiters = children_of(server._pid)
        command = next((c for w in waiters for c in children_of(w)), None)
        if command is not None and (tmp_path / "sock").exists():
            break
        time.sleep(0.05)
    assert command is not None
    os.kill(command, signal.SIGKILL)
    thread.join(60)
    assert ended[0].returncode == -signal.SIGKILL, ended


def test_the_command_gets_the_environment_it_is_given(server: CommandServer) -> None:
    env = {"PATH": os.environ["PATH"], "EROFS_MOUNT_LOAD_PLUGINS": "local"}
    result = server.run(["plugins"], timeout=60, env=env)
    executed = subprocess.run([EROFS_MOUNT, "plugins"], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (executed.returncode, executed.stdout, executed.stderr)
    assert result.stdout != server.run(["plugins"], timeout=60).stdout, "the server's own environment loads all"


def children_of(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(proc.name))
    return found


def test_the_fork_has_none_of_the_caller_s_log_handlers(tmp_path: Path) -> None:
    caller_log = tmp_path / "caller.log"
    handler = logging.FileHandler(caller_log)
    logging.getLogger().addHandler(handler)
    try:
        commands = CommandServer()
        try:
            result = commands.run(["mount", "--source", "local:/x", str(tmp_path / "none")], timeout=60)
        finally:
            commands.close()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert result.returncode != 0 and caller_log.read_text() == ""


def test_the_server_ends_with_its_caller_s_end_and_refuses_after(tmp_path: Path) -> None:
    commands = CommandServer()
    pid = commands._pid
    commands.close()
    assert not Path(f"/proc/{pid}").exists()
    result = commands.run(["--version"], timeout=10)
    assert result.returncode == 1 and "fork server is gone" in result.stderr


def test_a_malformed_request_is_dropped_and_the_server_serves_on(server: CommandServer) -> None:
    r, w = os.pipe()
    try:
        socket.send_fds(server._socket, [b"not json"], [w])
        socket.send_fds(server._socket, [b'{"args": ["--version", 3]}'], [w, w, w])
        socket.send_fds(server._socket, [b'{"args": ["--version"], "env": {"A": 1}}'], [w, w, w])
    finally:
        os.close(w)
    assert os.read(r, 1) == b"", "the server closed the descriptors it was sent"
    os.close(r)
    assert server.run(["--version"], timeout=60).returncode == 0


def test_no_descriptor_of_the_caller_s_reaches_the_server(tmp_path: Path) -> None:
    held = tmp_path / "the-caller-s-file"
    fd = os.open(held, os.O_RDWR | os.O_CREAT)  # (a fork inherits it, close-on-exec or not)
    try:
        commands = CommandServer()
        try:
            assert commands.run(["--version"], timeout=60).returncode == 0  # (the server is past its start)
            links = [os.readlink(f"/proc/{commands._pid}/fd/{n}") for n in os.listdir(f"/proc/{commands._pid}/fd")]
            assert str(held) not in links
        finally:
            commands.close()
    finally:
        os.close(fd)


def test_a_server_that_died_leaves_its_commands_to_new_interpreters_and_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The OOM killer or a stray kill ends the server: no command is lost. Each runs as the executable
    would, in a new interpreter (``python -I -m erofs_mount_core._main``), and one line says why."""
    commands = CommandServer()
    try:
        os.kill(commands._pid, signal.SIGKILL)
        os.waitpid(commands._pid, 0)
        want = subprocess.run([EROFS_MOUNT, "--version"], capture_output=True, text=True)
        with caplog.at_level("WARNING", logger="erofs_mount"):
            for _ in range(2):
                got = commands.run(["--version"], timeout=60)
                assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
            bad = commands.run(["mount", "--no-such-option"], timeout=60)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) >= 1
        assert [r.getMessage() for r in caplog.records if "fork server ended" in r.getMessage()] != []
        assert len([r for r in caplog.records if "fork server ended" in r.getMessage()]) == 1
    finally:
        commands.close()
