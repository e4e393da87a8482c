"""CommandSocket and run_through: a command started as a new process runs in a warm one's fork instead, with
the caller's output, environment, directory and signals, and only for root."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from erofs_mount_core import CommandServer, CommandSocket, __version__
from tests.vm.conftest import EROFS_MOUNT

#: a caller as the containerd plugin's ``snapshotter pull`` is one: a new process that hands its command over
CALLER = """
import sys
from pathlib import Path
from erofs_mount_core import run_through
code = run_through(Path(sys.argv[1]), sys.argv[2:])
sys.exit(99 if code is None else code)
"""

#: a caller that speaks the protocol itself, as anyone who can reach the socket might: what comes back on the
#: status pipe (nothing when turned away)
RAW_CALLER = """
import json, os, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.connect(sys.argv[1])
status, theirs = os.pipe()
try:
    socket.send_fds(conn, [json.dumps({"args": sys.argv[2:], "env": {}, "cwd": "/"}).encode()], [1, 2, theirs])
except OSError:
    pass  # closed before it was read: turned away
os.close(theirs)
conn.close()
print(repr(os.read(status, 100)))
"""


@pytest.fixture
def commands() -> Iterator[CommandServer]:
    server = CommandServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def listening(commands: CommandServer, tmp_path: Path) -> Iterator[CommandSocket]:
    listener = CommandSocket(tmp_path / "commands.sock", commands, [])
    try:
        yield listener
    finally:
        listener.close()


def hand_over(path: Path, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CALLER, str(path), *args], capture_output=True, text=True,
                          timeout=60, **kwargs)  # type: ignore[call-overload]


def test_a_command_handed_over_gives_what_the_executable_gives_with_the_caller_s_environment(
        listening: CommandSocket) -> None:
    for env in ({}, {"EROFS_MOUNT_LOAD_PLUGINS": "local"}):
        for args in (["--version"], ["plugins"], ["no-such-command"], ["mount", "--source", "local:/x", "/nowhere"]):
            handed = hand_over(listening.path, *args, env={**os.environ, **env})
            executed = subprocess.run([EROFS_MOUNT, *args], capture_output=True, text=True, env={**os.environ, **env},
                                      stdin=subprocess.DEVNULL)
            assert (handed.returncode, handed.stdout, handed.stderr) == \
                (executed.returncode, executed.stdout, executed.stderr), (env, args)
    assert "local " in hand_over(listening.path, "plugins", env={**os.environ, "EROFS_MOUNT_LOAD_PLUGINS": "local"}
                                 ).stdout


def test_a_command_handed_over_works_in_the_caller_s_directory_and_ends_on_the_caller_s_signal(
        listening: CommandSocket, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "bytes").write_bytes(b"\0" * 8192)
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(listening.path), "serve", "-s", "local:bytes",
                               "--any-bytes", "--socket", "serve.sock"], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (work / "serve.sock").exists():  # its relative paths are the caller's directory's
        assert caller.poll() is None and time.monotonic() < deadline, caller.communicate()
        time.sleep(0.05)
    caller.send_signal(signal.SIGINT)
    out, err = caller.communicate(timeout=60)
    assert caller.returncode == 0 and err.endswith("erofs-mount serve: stopping\n"), (out, err)  # serve's Ctrl-C
    assert not (work / "serve.sock").exists(), "the command itself ended, not only its caller"


def test_only_the_commands_under_the_listener_s_prefix_run(commands: CommandServer, tmp_path: Path) -> None:
    listener = CommandSocket(tmp_path / "plugins.sock", commands, ["plugins"])
    try:
        handed = hand_over(listener.path, "--version")  # runs as "erofs-mount plugins --version"
        executed = subprocess.run([EROFS_MOUNT, "plugins", "--version"], capture_output=True, text=True)
        assert (handed.returncode, handed.stderr) == (executed.returncode, executed.stderr) != (0, "")
    finally:
        listener.close()
    assert not listener.path.exists()


def test_with_nothing_listening_the_caller_runs_the_command_itself(tmp_path: Path) -> None:
    assert hand_over(tmp_path / "nobody.sock", "--version").returncode == 99
    (tmp_path / "left.sock").touch()
    assert hand_over(tmp_path / "left.sock", "--version").returncode == 99


def test_a_peer_that_is_not_root_runs_nothing_even_where_the_socket_s_mode_lets_it_connect(
        commands: CommandServer, caplog: pytest.LogCaptureFixture) -> None:
    where = Path(tempfile.mkdtemp())
    try:
        where.chmod(0o755)
        listener = CommandSocket(where / "commands.sock", commands, [])
        assert listener.path.stat().st_mode & 0o777 == 0o600
        listener.path.chmod(0o666)  # as a mistake would leave it
        marker = where / "made-by-the-command"
        try:
            nobody = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-I", "-c",
                 RAW_CALLER, str(listener.path), "serve", "-s", f"local:{EROFS_MOUNT}", "--any-bytes", "--socket",
                 str(marker)], capture_output=True, text=True, timeout=60, cwd="/")
            as_root = subprocess.run(["/usr/bin/python3", "-I", "-c", RAW_CALLER, str(listener.path), "--version"],
                                     capture_output=True, text=True, timeout=60, cwd="/")
        finally:
            listener.close()
        assert (nobody.returncode, nobody.stdout) == (0, "b''\n"), nobody  # turned away: no pid, no status
        assert f"erofs-mount {__version__}\n" in as_root.stdout, as_root  # the same request from root runs
        assert not marker.exists()
        assert "a peer that is not root was turned away" in caplog.text
    finally:
        os.system(f"rm -rf {where}")  # noqa: S605
