"""The registry's requests, sent to its hosts in order: mirrors and peers first, the registry last.

``HostsTransport`` sits under the HTTP client, so every request the plugin
makes (manifests, configs, HEADs, range reads, whole-layer downloads) is
routed the same way, and nothing above it knows mirrors exist. A request
for the registry's API goes to each host that may serve it (``pull`` for
blobs and manifests by digest, ``resolve`` for tags), in the order of
``hosts.toml``; the first answer that is not a failure is the answer.

- A mirror that cannot be reached, times out or answers 5xx or 429 is
  skipped for ``SKIP_FIRST`` seconds (doubling while it keeps failing, up to
  ``SKIP_MAX``), with one log line; one that refuses otherwise (404: a
  peer without that blob; 401) is passed over for that request only.
- The last host's answer, whatever it is, is returned: errors, retries and
  authentication go on as they would without mirrors.
- Credentials, as containerd binds them, to the host they belong to: the
  registry's ``Authorization`` and cookies go to the registry only. Another
  host gets the request's own headers (``Range``, ``Accept``...) and those
  its ``hosts.toml`` entry names (Spegel puts an ``Authorization`` there),
  and the cookies it sets are dropped. Every answer says which host gave it
  (``answered_by``): a challenge is judged, and an error named, by the host
  that sent it, never by the registry's URL the request was built on.
- Bytes from any host are checked above, as the registry's are (digests,
  span hashes): a mirror cannot change what a reader sees. A read whose
  bytes do not check out calls ``distrust_served``: the mirror that served
  them is skipped from then on, so the read's retry goes elsewhere.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import httpx

from erofs_mount_core import SourceError

from .hosts import Host, hosts_for

log = logging.getLogger("erofs_mount.oci")

SKIP_FIRST = 10.0
SKIP_MAX = 600.0
_TAG_MANIFEST = re.compile(r"/manifests/(?!sha256:)[^/]+$")
#: what a request carries to a host that is not the registry: its own headers, none of the client's state
_FORWARDED = {"accept", "accept-encoding", "range", "user-agent", "content-type", "content-length"}
#: the response extension naming the host that answered: (scheme, host[:port])
ANSWERED_BY = "erofs_mount_answered_by"


def answered_by(response: httpx.Response) -> tuple[str, str]:
    """(scheme, host[:port]) of the host that gave ``response``: a mirror's, if one answered."""
    return response.extensions.get(ANSWERED_BY) or (response.url.scheme, response.url.netloc.decode())


#: per thread, the mirror whose answer this thread used last (None: the last host's), for ``distrust_served``
_served = threading.local()


_distrusted = [0]  # how many times a mirror's bytes did not check out, in this process


def distrust_served(why: str, *, lied: bool = True) -> bool:
    """The bytes this thread read did not check out (a digest, a span hash, a stream that would not
    inflate): the mirror that served them, if a mirror did, is never asked again by this client.
    ``lied=False``: it broke off instead, and is skipped a while, as one that failed to answer is.
    True if a mirror served them: the same request may then be made again, and go elsewhere."""
    last = getattr(_served, "mirror", None)
    _served.mirror = None
    if last is None:
        return False
    transport, host = last
    transport.failed(host, why, lied=lied)
    _distrusted[0] += 1
    return True


def distrusted() -> int:
    """A count that grows each time a mirror is distrusted: whether one was, during some work."""
    return _distrusted[0]


class NoHost(httpx.HTTPError):
    """No host in hosts.toml may serve this request (a tag, and no host may resolve)."""


class HostsTransport(httpx.BaseTransport):
    def __init__(self, registry: str, api_root: str, hosts: list[Host],
                 transport_for: Callable[[Host], httpx.BaseTransport], default: httpx.BaseTransport) -> None:
        """``api_root``: the registry's own ``scheme://host/v2``, the URL the plugin builds requests on."""
        self.registry, self.api_root = registry, api_root
        self.registry_host = httpx.URL(api_root).netloc.decode()
        self.routes = [(host, transport_for(host)) for host in hosts]
        self.default = default  # anything else: a token server, where a registry redirects to
        self._skipped: dict[str, tuple[float, float]] = {}  # host root -> (until, how long it was)
        self._lied: set[str] = set()  # host roots that served bytes that did not check out
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if not url.startswith(self.api_root + "/"):
            return self.default.handle_request(request)
        rest = url[len(self.api_root):]
        resolving = _TAG_MANIFEST.search(rest.split("?", 1)[0]) is not None
        routes = [(h, t) for h, t in self.routes if (h.resolve if resolving else h.pull)]
        if request.method not in ("GET", "HEAD"):
            routes = self.routes[-1:]  # a push (index push) goes to the registry alone
        if not routes:
            raise NoHost(f"no host for {self.registry} in hosts.toml may "
                         f"{'resolve a tag' if resolving else 'serve blobs'}")
        for n, (host, transport) in enumerate(routes):
            last = n == len(routes) - 1
            if not last and self._skipping(host):
                continue
            routed = self._for(host, request, rest)
            try:
                response = transport.handle_request(routed)
            except httpx.TransportError as exc:
                if last:
                    raise
                self.failed(host, f"{type(exc).__name__}: {exc}")
                continue
            status = response.status_code
            if last or status < 400:
                if not last and host.root in self._skipped:
                    self._recovered(host)
                _served.mirror = None if last else (self, host)
                response.extensions[ANSWERED_BY] = (host.scheme, host.host)
                if host.host != self.registry_host and "set-cookie" in response.headers:
                    del response.headers["set-cookie"]  # not to be kept, and replayed, as the registry's
                return response
            response.close()
            if status == 429 or status >= 500:
                self.failed(host, f"HTTP {status}")
            # any other refusal (404: a peer without that blob) passes this request on, nothing more
        raise AssertionError("unreachable: the last host's answer is returned")

    def _for(self, host: Host, request: httpx.Request, rest: str) -> httpx.Request:
        own = {name.lower() for name, _values in host.header}
        if host.host == self.registry_host:
            headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in {"host", *own}]
        else:
            headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() in _FORWARDED - own]
        headers += [(name, value) for name, values in host.header for value in values]
        url = httpx.URL(host.root + rest)
        if host.query(self.registry):
            url = url.copy_merge_params(host.query(self.registry))
        extensions = dict(request.extensions)
        if host.dial_timeout is not None:
            timeout = dict(extensions.get("timeout", {}))
            timeout["connect"] = host.dial_timeout
            extensions["timeout"] = timeout
        body = request.read() if request.method not in ("GET", "HEAD") else None  # a push's (bytes, in memory)
        return httpx.Request(request.method, url, headers=headers, extensions=extensions, content=body)

    def _skipping(self, host: Host) -> bool:
        with self._lock:
            until, _ = self._skipped.get(host.root, (0.0, 0.0))
        return time.monotonic() < until

    def failed(self, host: Host, why: str, *, lied: bool = False) -> None:
        """``host`` failed to answer: skipped a while, longer each time. ``lied``: it served bytes that
        did not check out, and is never asked again by this client."""
        if lied:
            with self._lock:
                self._skipped[host.root] = (float("inf"), float("inf"))
                self._lied.add(host.root)
            log.warning("mirror %s served bytes that do not check out (%s): not asked again", host.root, why)
            return
        with self._lock:
            _, last = self._skipped.get(host.root, (0.0, 0.0))
            skip = min(SKIP_MAX, last * 2) if last else SKIP_FIRST
            self._skipped[host.root] = (time.monotonic() + skip, skip)
        log.warning("mirror %s failed (%s): skipped for %.0f s", host.root, why, skip)

    def _recovered(self, host: Host) -> None:
        with self._lock:
            if host.root in self._lied:
                return
            self._skipped.pop(host.root, None)
        log.info("mirror %s answers again", host.root)

    def close(self) -> None:
        for _host, transport in self.routes:
            transport.close()
        self.default.close()


@attrs.frozen
class Route:
    """A registry's hosts, as its client's transport needs them."""

    registry: str
    api_root: str
    hosts: tuple[Host, ...]
    ca_bundle: str | None

    def transport(self, make: Callable[[Any], httpx.BaseTransport], verify: Any) -> HostsTransport:
        """``make(verify)`` gives a plain transport; the registry's own keeps ``verify`` (the ca= option)."""
        registry_host = httpx.URL(self.api_root).netloc.decode()

        def for_host(host: Host) -> httpx.BaseTransport:
            if host.host == registry_host and not (host.ca or host.client or host.skip_verify is not None):
                return make(verify)
            return make(tls_for(host, self.ca_bundle if host.host == registry_host else None))

        return HostsTransport(self.registry, self.api_root, list(self.hosts), for_host, default=make(verify))


def route(registry: str, api_root: str, hosts_dir: str | None, *, insecure: bool,
          ca_bundle: str | None) -> Route | None:
    """The route for ``registry`` from ``hosts_dir``; None when it changes nothing (the registry alone)."""
    hosts = hosts_for(registry, hosts_dir or None, insecure=insecure)
    root = httpx.URL(api_root)
    if hosts == [Host(root.scheme, root.netloc.decode(), root.path.rstrip("/"))]:
        return None
    return Route(registry, api_root, tuple(hosts), ca_bundle)


_contexts: dict[tuple[str, str], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def default_context() -> ssl.SSLContext:
    """httpx's verifying context (certifi's CA bundle, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), made once per
    process: loading the bundle takes a fraction of a second (seconds on an emulated machine), and a
    daemon forked from the command that made it keeps it."""
    key = (os.environ.get("SSL_CERT_FILE", ""), os.environ.get("SSL_CERT_DIR", ""))
    with _contexts_lock:
        if key not in _contexts:
            _contexts[key] = httpx.create_ssl_context()
        return _contexts[key]


def tls_for(host: Host, ca_bundle: str | None) -> ssl.SSLContext | bool:
    """The TLS settings of one host: its own CAs and client certificates (the ``ca=`` option's bundle too,
    for the registry itself), or no verification where ``skip_verify`` says so."""
    if host.skip_verify:
        return False
    if not (host.ca or host.client or ca_bundle):
        return default_context()
    try:
        context = ssl.create_default_context()
        for path in (*host.ca, *([ca_bundle] if ca_bundle else [])):
            context.load_verify_locations(cafile=path)
        for cert, key in host.client:
            context.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"oci: host {host.root}: cannot use its TLS files: {exc}") from None
    return context
