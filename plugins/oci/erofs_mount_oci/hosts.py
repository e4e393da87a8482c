"""Where a registry's requests may go: containerd's hosts directory, the file fleets already configure.

Pull-through mirrors, Spegel's peer-to-peer registry and Dragonfly are all
configured through ``<dir>/<registry>/hosts.toml`` (containerd's
``docs/hosts.md``; the default directory is ``/etc/containerd/certs.d``).
``hosts_for`` reads it as containerd does and gives the hosts in the order
they are tried: each ``[host."URL"]`` table as written, then ``server``
(the registry itself when the file names none).

- The directory of ``registry.example:5000`` is the first of
  ``registry.example_5000_``, ``registry.example:5000``, ``_default``.
- A host's API root is its URL's path followed by ``/v2``, unless the path
  already ends so or ``override_path`` says the path is the root.
- ``capabilities``: ``pull`` (blobs, and manifests by digest) and
  ``resolve`` (tags: a trusted operation); all of them when not given.
- ``ca``, ``client`` (a file, files, or ``[cert, key]`` pairs): paths
  relative to the file's directory; ``skip_verify``; ``[host."URL".header]``
  (a string or strings per name); ``dial_timeout`` (Go's duration syntax).
- Without a ``hosts.toml``, Docker's certificate files in the directory
  apply to the registry: ``*.crt`` CAs, ``*.cert`` with their ``*.key``.

A request to a host other than the registry carries ``?ns=<registry>``,
as containerd's do. As root, the file must be root's and writable by no
one else: it decides where root's reads go and which headers they carry.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import attrs

from erofs_mount_core import UsageError

DEFAULT_DIR = "/etc/containerd/certs.d"
HOSTS_FILE = "hosts.toml"
MAX_HOSTS_FILE = 1 << 20
CAPABILITIES = ("pull", "resolve", "push")
MAX_DIAL_TIMEOUT = 86400.0
#: Go's time.ParseDuration units, in seconds
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


@attrs.frozen
class Host:
    """One place a registry's requests may go, with what it may be asked and how to reach it."""

    scheme: str
    host: str
    """``name[:port]``"""
    path: str
    """The API root: ``/v2``, or the URL's own path (``override_path``)."""
    pull: bool = True
    resolve: bool = True
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    """Client certificates: (certificate file, key file or "" when the key is in the certificate's file)."""
    skip_verify: bool | None = None
    header: tuple[tuple[str, tuple[str, ...]], ...] = ()
    dial_timeout: float | None = None
    """Seconds a connection may take (containerd's default: 30)."""

    @property
    def root(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    def query(self, registry: str) -> dict[str, str]:
        """``ns``, naming the registry, on every request to a host that is not it."""
        return {} if self.host == registry else {"ns": registry}


def hosts_for(registry: str, hosts_dir: str | os.PathLike[str] | None, *, insecure: bool = False) -> list[Host]:
    """The hosts to try for ``registry``, in order; the registry alone without a hosts directory.

    ``insecure``: the registry itself, when no file names its server, is spoken to in plain HTTP.
    """
    directory = _host_directory(Path(hosts_dir), registry) if hosts_dir is not None else None
    hosts: list[dict[str, Any]] = [{}]
    where = ""
    if directory is not None:
        file = directory / HOSTS_FILE
        where = str(file)
        text = _read(file)
        hosts = _parse(text, where) if text is not None else [_docker_certificates(directory)]
    last = hosts[-1]
    if "server" not in last:  # the registry itself, as the reference names it
        scheme, host = ("http" if insecure else "https"), registry
        if registry == "docker.io":
            scheme, host = "https", "registry-1.docker.io"
        last["server"] = f"{scheme}://{host}"
    base = directory or Path("/")
    return [_host(h, base, f"{where}: host {h['server']!r}" if where else registry) for h in hosts]


def _host_directory(root: Path, registry: str) -> Path | None:
    name, colon, port = registry.rpartition(":")
    candidates = ([f"{name}_{port}_"] if colon and name else []) + [registry, "_default"]
    for candidate in candidates:
        path = root / candidate
        if path.is_dir():
            return path
    return None


def trusted_files(root: Path, registry: str, suffix: str, what: str) -> list[Path]:
    """The files ending in ``suffix`` in ``registry``'s directory under ``root`` (named as in containerd's
    hosts directory: ``host_port_``, the registry, or ``_default``); as root, the directory and each file
    must be root's alone (``what`` says why)."""
    directory = _host_directory(root, registry)
    if directory is None:
        return []
    _root_only(directory, directory.stat(), what)
    found = sorted(p for p in directory.iterdir() if p.name.endswith(suffix) and p.is_file())
    for path in found:
        _root_only(path, path.lstat(), what)
    return found


def _root_only(path: Path, st: os.stat_result, what: str) -> None:
    """As root, ``path`` must be root's and writable by no one else: it decides what root trusts."""
    if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & 0o022):
        raise UsageError(f"oci: {path} must belong to root and be writable by no one else: {what}")


def _read(file: Path) -> str | None:
    """The file's text; None if there is none. As root, only a file that root alone can write."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"oci: cannot read {file}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"oci: {file} is not a regular file")
        _root_only(file, st, "it decides where root's reads go")
        data = f.read(MAX_HOSTS_FILE + 1)
    if len(data) > MAX_HOSTS_FILE:
        raise UsageError(f"oci: {file} is larger than {MAX_HOSTS_FILE} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"oci: {file} is not UTF-8") from None


def _parse(text: str, where: str) -> list[dict[str, Any]]:
    """The host tables in the file's order, then the top level (``server`` and its settings)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"oci: {where} is not valid TOML: {exc}") from None
    tables = doc.pop("host", {})
    if not isinstance(tables, dict):
        raise UsageError(f"oci: {where}: host must be a table of [host.\"URL\"] tables")
    hosts = []
    for url, table in tables.items():  # tomllib keeps the file's order
        if not isinstance(table, dict):
            raise UsageError(f"oci: {where}: host {url!r} is not a table")
        hosts.append({**table, "server": url})
    server = doc.pop("server", None)
    if server is not None:
        if not isinstance(server, str):
            raise UsageError(f"oci: {where}: server must be a string")
        if server:
            doc["server"] = server
    hosts.append(doc)
    return hosts


def _docker_certificates(directory: Path) -> dict[str, Any]:
    """Docker's layout: ``*.crt`` are CAs, ``NAME.cert`` goes with ``NAME.key``. As root, the directory and
    each of those files must be root's alone, as ``hosts.toml`` must: a CA decides whom root trusts."""
    _root_only(directory, directory.stat(), "its certificates decide whom root's downloads trust")
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    config: dict[str, Any] = {}
    cas = [n for n in names if n.endswith(".crt")]
    pairs = [[n, n[:-5] + ".key"] for n in names if n.endswith(".cert") and n[:-5] + ".key" in names]
    for name in cas + [n for pair in pairs for n in pair]:
        _root_only(directory / name, (directory / name).stat(), "a CA decides whom root's downloads trust")
    if cas:
        config["ca"] = cas
    if pairs:
        config["client"] = pairs
    return config


def _host(config: dict[str, Any], base: Path, what: str) -> Host:
    server = config["server"]
    if "://" not in server:
        server = "https://" + server
    try:
        url = urllib.parse.urlsplit(server)
        url.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
        raise UsageError(f"oci: {what}: not an http(s) URL of a host")
    override = _boolean(config.get("override_path", False), "override_path", what)
    path = os.path.normpath(url.path) if url.path else ""
    path = "" if path == "/" else path
    if not override and not path.endswith("/v2"):
        path += "/v2"
    capabilities = config.get("capabilities", list(CAPABILITIES))
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise UsageError(f"oci: {what}: capabilities must be a list of strings")
    wanted = {c.lower() for c in capabilities}
    if wanted - set(CAPABILITIES):
        raise UsageError(f"oci: {what}: unknown capability {sorted(wanted - set(CAPABILITIES))[0]!r} "
                         f"(known: {', '.join(CAPABILITIES)})")
    skip_verify = config.get("skip_verify")
    return Host(
        scheme=url.scheme, host=url.netloc, path=path, pull="pull" in wanted, resolve="resolve" in wanted,
        ca=tuple(_path(p, base) for p in _strings(config.get("ca", []), "ca", what)),
        client=_client_pairs(config.get("client", []), base, what),
        skip_verify=None if skip_verify is None else _boolean(skip_verify, "skip_verify", what),
        header=_header(config.get("header", {}), what),
        dial_timeout=_duration(config["dial_timeout"], what) if config.get("dial_timeout") else None,
    )


def _boolean(value: Any, name: str, what: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"oci: {what}: {name} must be true or false")
    return value


def _strings(value: Any, name: str, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"oci: {what}: {name} must be a string or a list of strings")


def _path(path: str, base: Path) -> str:
    return path if os.path.isabs(path) else str(base / path)


def _client_pairs(value: Any, base: Path, what: str) -> tuple[tuple[str, str], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise UsageError(f"oci: {what}: client must be a file, a list of files or of [cert, key] pairs")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_path(item, base), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_path(item[0], base), _path(item[1], base) if item[1] else ""))
        else:
            raise UsageError(f"oci: {what}: client has {item!r}, neither a file nor a [cert, key] pair")
    return tuple(pairs)


def _header(value: Any, what: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise UsageError(f"oci: {what}: header must be a table")
    header = []
    for name, values in value.items():
        strings = _strings(values, f"header {name!r}", what)
        if any(c in s for s in [name, *strings] for c in "\r\n\0"):
            raise UsageError(f"oci: {what}: header {name!r} has a line break")
        header.append((name, tuple(strings)))
    return tuple(header)


def _duration(value: Any, what: str) -> float:
    """Go's ``time.ParseDuration``: "200ms", "1m30s", "1.5h"."""
    if not isinstance(value, str) or not value or _DURATION.sub("", value) not in ("",):
        raise UsageError(f"oci: {what}: dial_timeout {value!r} is not a duration like '200ms' or '1s'")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(value))
    if not 0 < seconds <= MAX_DIAL_TIMEOUT:
        raise UsageError(f"oci: {what}: dial_timeout {value!r} is not between 0 and {MAX_DIAL_TIMEOUT:.0f}s")
    return seconds
