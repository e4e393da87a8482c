"""``erofs-mount serve``: a source exported to ordinary NBD clients.

The same transmission loop that feeds the kernel, behind the fixed newstyle
handshake, on a unix socket or TCP. One thread per client; a client that
breaks the protocol is logged and dropped, the others keep being served.
SIGINT and SIGTERM close the listener, end every connection and exit 0.

With a command (``--run``, nbdkit's captive mode) the server lives as long
as the command: it runs with ``$uri`` (and ``$unixsocket`` or ``$port``)
naming the export, and its exit status becomes serve's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

from ._erofs.check import check_erofs
from ._errors import UsageError
from ._filters import Retrying
from ._nbd import handshake
from ._nbd import protocol as p
from ._nbd.transmission import Disk, transmit
from ._plugins import PluginHost
from ._source import Source, split_spec

log = logging.getLogger("erofs_mount.serve")


class _Stop(BaseException):
    """SIGINT or SIGTERM: a BaseException, so that no ``except Exception`` (logging's) eats it."""


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {listen!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind(socket_path: str | None, listen: str | None) -> tuple[socket.socket, str, tuple[int, int] | None]:
    """The listener, where it listens, and (st_dev, st_ino) of the socket file it made, if it made one:
    that file, and only that one, is removed at the end."""
    if bool(socket_path) == bool(listen):
        raise UsageError("give exactly one of --socket PATH and --listen HOST:PORT (--run alone picks a socket)")
    if socket_path:
        path = Path(socket_path)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise UsageError(f"{socket_path} exists and is not a socket")
            if _listening(socket_path):
                raise UsageError(f"cannot listen on {socket_path}: address in use (another server listens there)")
            path.unlink()  # a stale socket from an earlier run: nobody listens on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(socket_path)
            bound = os.stat(socket_path)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {socket_path}: {exc.strerror or exc}") from None
        made: tuple[int, int] | None = (bound.st_dev, bound.st_ino)
        where = f"unix:{socket_path}"
    else:
        host, port = parse_listen(listen or "")
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as exc:
            raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        where, made = f"tcp:{host}:{sock.getsockname()[1]}", None
    sock.listen(64)
    return sock, where, made


def _remove_own(socket_path: str, made: tuple[int, int] | None) -> None:
    """Remove ``socket_path`` if it is still the file this server made, not one another server made since."""
    with contextlib.suppress(OSError):
        st = os.lstat(socket_path)
        if made == (st.st_dev, st.st_ino):
            os.unlink(socket_path)


def _listening(socket_path: str) -> bool:
    """Whether a server listens on the unix socket at ``socket_path`` (a stale one refuses the connection)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(socket_path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # (a full backlog, a timeout: someone is there)
    finally:
        probe.close()
    return True


@attrs.frozen
class ClientLimits:
    """What one client may hold: a slot of ``max_clients``, and ``handshake_timeout`` seconds to negotiate."""

    max_clients: int = 64
    handshake_timeout: float = 30.0


def run(spec: str, options: Mapping[str, str], *, socket_path: str | None = None,
        listen: str | None = None, command: str | None = None, limits: ClientLimits = ClientLimits(),
        any_bytes: bool = False) -> int:
    """Serve ``spec`` until SIGINT or SIGTERM, or until ``command`` exits; the exit status.

    ``any_bytes``: serve whatever the source holds; otherwise only an EROFS image, as mount."""
    from ._mounts import RESERVED

    mount_only = sorted(set(options) & RESERVED)
    if mount_only:
        raise UsageError(f"-o {mount_only[0]}: an option of mount (a mount flag or a device setting); serve "
                         "mounts nothing and takes only the source's options")
    private_dir, private_lock = None, -1
    serving = False
    # from the start: a signal while the source opens or the socket binds also ends cleanly
    with _StopSignals() as signals:
        try:
            host = PluginHost()
            scheme, location = split_spec(spec)
            if command and not (socket_path or listen):
                private_dir, private_lock = _private_directory()
                socket_path = os.path.join(private_dir, "nbd.sock")
            source = Retrying(host.open_source(scheme, location, options))
            try:
                if not any_bytes:
                    check_erofs(source, spec)
                source.start_background()
                serving = True
                return _serve(spec, source, socket_path, listen, command, signals, limits)
            finally:
                source.close()
        except _Stop:
            if not serving:  # (while the source opened: an interrupted command)
                log.info("interrupted")
                return 130
            log.info("stopping")
            return 0
        finally:
            if private_dir:
                shutil.rmtree(private_dir, ignore_errors=True)
                os.close(private_lock)


_PRIVATE_PREFIX = "erofs-mount-serve-"


def _private_directory() -> tuple[str, int]:
    """A directory of this server's own for its socket, and the descriptor of the lock that says it lives;
    the directories of servers that were killed (nothing holds their lock) are removed first."""
    base = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            if name.startswith(_PRIVATE_PREFIX):
                _remove_if_abandoned(os.path.join(base, name))
    directory = tempfile.mkdtemp(prefix=_PRIVATE_PREFIX)
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return directory, fd


def _remove_if_abandoned(directory: str) -> None:
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return  # another user's, or not one of ours
    try:
        fd = os.open(os.path.join(directory, "lock"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if time.time() - st.st_mtime < 60:
            return  # a server that has just made it and not yet locked it
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # its server lives
    finally:
        if fd is not None:
            os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)


class _StopSignals:
    """SIGINT and SIGTERM raise _Stop in the main thread; ``wait`` sleeps until one comes.

    The handler also writes to a wakeup socket, so a signal that lands just
    before ``wait`` blocks still wakes it (``signal.pause`` would miss it).
    """

    def __enter__(self) -> _StopSignals:
        self._wake, self._wake_w = socket.socketpair()
        self._wake.setblocking(False)
        self._wake_w.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.stopping, self._deferring = False, False
        self._previous = {s: signal.signal(s, self._raise) for s in _STOP_SIGNALS}
        return self

    def _raise(self, signum: int, frame: object) -> None:
        self.stopping = True
        if not self._deferring:
            raise _Stop

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A stop signal only noted while this runs (the next ``wait`` raises it): what starts a process must
        not be cut between its fork and the return of its handle."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def wait(self, fd: int | None = None) -> None:
        """Until a stop signal (raises _Stop) or until ``fd`` is readable."""
        watched = [self._wake] if fd is None else [self._wake, fd]
        while True:
            readable, _, _ = select.select(watched, [], [])
            with contextlib.suppress(BlockingIOError):
                self._wake.recv(256)
            if self.stopping:  # the handler ran, and its _Stop was caught somewhere: raise it again
                raise _Stop
            if fd is not None and fd in readable:
                return

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._wake.close()
        self._wake_w.close()


def _serve(spec: str, source: Source, socket_path: str | None, listen: str | None, command: str | None,
           signals: _StopSignals, limits: ClientLimits) -> int:
    disk = Disk(source, zero_copy=True)
    # SIGINT and SIGTERM wait (blocked) until the listener and its acceptor exist and the
    # cleanup below is armed; the threads keep them blocked, so they reach the main thread
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        listener, where, made = bind(socket_path, listen)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        raise
    flags = p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY | p.FLAG_CAN_MULTI_CONN
    clients: dict[int, socket.socket] = {}
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    closing = threading.Event()

    def client(conn: socket.socket, n: int, peer: str) -> None:
        try:
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(limits.handshake_timeout)
            if handshake.negotiate(conn, size=disk.size, flags=flags, description=source.describe()):
                conn.settimeout(None)
                reason = transmit(conn, disk, peer=peer)
                log.info("%s: %s", peer, reason)
        except handshake.HandshakeError as exc:
            log.warning("%s: dropped: %s", peer, exc)
        except TimeoutError:
            log.warning("%s: dropped: no handshake within %g s", peer, limits.handshake_timeout)
        except OSError as exc:
            log.info("%s: connection lost: %s", peer, exc.strerror or exc)
        finally:
            with lock:
                clients.pop(n, None)
            conn.close()

    def accept() -> None:
        n = 0
        while not closing.is_set():
            try:
                conn, addr = listener.accept()
            except OSError as exc:
                if closing.is_set():  # the listener was shut down: serving is over
                    return
                log.warning("accepting a client failed (%s); trying again", exc.strerror or exc)
                time.sleep(0.1)  # EMFILE and the like: give closing clients a moment
                continue
            n += 1
            peer = f"client {n}" + (f" {addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "")
            with lock:
                if len(clients) >= limits.max_clients:
                    log.warning("%s: refused: %d clients already (--max-clients)", peer, len(clients))
                    conn.close()
                    continue
                clients[n] = conn
                threads[:] = [x for x in threads if x.is_alive()]
                t = threading.Thread(target=client, args=(conn, n, peer), name=f"nbd-client-{n}", daemon=True)
                threads.append(t)
            try:
                t.start()
            except RuntimeError as exc:  # no thread to be had: this client only is turned away
                log.warning("%s: refused: %s", peer, exc)
                with lock:
                    clients.pop(n, None)
                conn.close()

    acceptor = threading.Thread(target=accept, name="nbd-accept", daemon=True)
    acceptor.start()
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        log.info("serving %s (%d bytes) on %s", spec, disk.size, where)
        if command:
            return _run_captive(command, where, signals)
        signals.wait()
        raise AssertionError("unreachable: wait() ends only by raising _Stop")
    finally:
        closing.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the acceptor's accept()
        acceptor.join(5)
        if socket_path:
            _remove_own(socket_path, made)
        listener.close()
        with lock:
            for conn in clients.values():
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            running = list(threads)
        for t in running:
            t.join(5)


def _run_captive(command: str, where: str, signals: _StopSignals) -> int:
    """Run ``command`` through the shell with the export in its environment; its exit status."""
    kind, _, address = where.partition(":")
    env = dict(os.environ)
    if kind == "unix":
        env["unixsocket"] = address
        env["uri"] = "nbd+unix:///?socket=" + urllib.parse.quote(address, safe="/")
    else:
        host, _, port = address.rpartition(":")
        env["port"] = port
        env["uri"] = f"nbd://{f'[{host}]' if ':' in host else host}:{port}"
    with signals.deferred():  # a stop as it starts: the wait below raises it, and the command is ended
        proc = subprocess.Popen(command, shell=True, env=env)
        exited = os.pidfd_open(proc.pid)
    try:
        signals.wait(exited)
        code = proc.wait()
    except _Stop:
        proc.terminate()
        proc.wait()
        raise
    finally:
        os.close(exited)
    if code < 0:
        log.warning("--run command killed by signal %d", -code)
        return 128 - code
    return code
