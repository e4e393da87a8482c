"""A reverse proxy in front of the real registry that injects faults on request.

``proxy.inject("blob", "429", "reset")`` makes the next two blob GETs fail
that way (``proxy.inject("sha256:…", ...)``: GETs of that blob); other
requests pass through untouched. A second listener on
another host name plays the blob storage a registry redirects to, and
records the Authorization headers it sees.
"""

from __future__ import annotations

import http.server
import json
import socket
import struct
import sys
import threading
import time
from typing import Any

import httpx

FAULTS = ("429", "503", "reset", "slow", "401", "full200", "redirect", "short", "flood", "redirect401", "corrupt",
          "stall")
#: how long a "stall" answer holds its connection open after half its body, at most (until ``stop``)
STALL = 600
#: what a "flood" answer sends after the real body: far more than anyone asked for
FLOOD = 256 << 20


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[tuple[str, str]] = []  # (kind of request, fault)
        self.outage = False  # True: every request is answered 503, as by a registry that is down
        self.referrers_api = False  # True: GET /v2/NAME/referrers/DIGEST is answered, as distribution-spec 1.1 says
        self.latency = 0.0  # seconds added to every request, as by a registry far away
        self.rate = 0  # bytes per second of one link that every answer's body shares (0: no cap)
        self.sent_bytes = 0  # bodies sent, all answers
        self._link_free = 0.0
        self.stopped = threading.Event()
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened)
        self.ranges: list[str | None] = []  # the Range header of each blob GET
        self.authorization: list[str | None] = []  # the Authorization header of each request
        self.storage_auth: list[str | None] = []
        self.cookies: list[str | None] = []  # the Cookie header of each request
        self.set_cookie: str | None = None  # set: every answer carries this Set-Cookie
        self.flooded: list[int] = []  # bytes each "flood" answer got out before the client hung up
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=f"http://{upstream}", timeout=30)
        self.proxy = self._serve(self._proxy_handler())
        self.storage = self._serve(self._storage_handler())
        self.host = f"127.0.0.1:{self.proxy.server_address[1]}"
        self.storage_url = f"http://localhost:{self.storage.server_address[1]}"

    @staticmethod
    def _serve(handler: Any) -> http.server.ThreadingHTTPServer:
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def inject(self, kind: str, *faults: str) -> None:
        assert all(f in FAULTS for f in faults)
        with self._lock:
            self.faults += [(kind, f) for f in faults]

    def _take(self, kind: str) -> str | None:
        with self._lock:
            for i, (k, fault) in enumerate(self.faults):
                if k == kind:
                    del self.faults[i]
                    return fault
        return None

    def pending(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.faults)

    def stop(self) -> None:
        self.stopped.set()
        for s in (self.proxy, self.storage):
            s.shutdown()
            s.server_close()
        self._client.close()

    def throttle(self, n: int) -> None:
        """Hold an answer of ``n`` bytes as long as the shared link of ``rate`` bytes per second would."""
        with self._lock:
            self.sent_bytes += n
            if not self.rate:
                return
            now = time.monotonic()
            self._link_free = max(now, self._link_free) + n / self.rate
            wait = self._link_free - now
        time.sleep(wait)

    def referrers(self, path: str) -> bytes:
        """The Referrers API's answer for ``/v2/NAME/referrers/DIGEST``, from the referrers tag upstream (as a
        registry that has the API keeps it: docker-registry 2.8 has not)."""
        repository, _, digest = path.split("?")[0].removeprefix("/v2/").partition("/referrers/")
        upstream = self._client.get(f"/v2/{repository}/manifests/{digest.replace(':', '-')}",
                                    headers={"Accept": "application/vnd.oci.image.index.v1+json"})
        if upstream.status_code == 200:
            return upstream.content
        return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": []}).encode()

    def _forward(self, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
        keep = {k: v for k, v in headers.items() if k.lower() in ("authorization", "range", "accept")}
        return self._client.request(method, path, headers=keep)

    def _proxy_handler(self) -> Any:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:  # noqa: N802
                self._handle("HEAD")

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def _handle(self, method: str) -> None:
                if proxy.latency:
                    time.sleep(proxy.latency)
                kind = "blob" if "/blobs/" in self.path else "manifest" if "/manifests/" in self.path else "other"
                name = self.path.split("?")[0].rsplit("/", 1)[-1]  # a blob's digest: faults for it alone
                fault = (proxy._take(name) or proxy._take(kind)) if method == "GET" else None
                if proxy.outage:  # the registry is down: every request, HEAD included
                    fault = "503"
                proxy.log.append((method, self.path, fault or "pass"))
                proxy.authorization.append(self.headers.get("Authorization"))
                proxy.cookies.append(self.headers.get("Cookie"))
                if kind == "blob" and method == "GET":
                    proxy.ranges.append(self.headers.get("Range"))
                headers = dict(self.headers.items())
                if proxy.referrers_api and "/referrers/" in self.path:  # as a registry of distribution-spec 1.1
                    return self._referrers()
                if fault in ("429", "503"):
                    extra = {"Retry-After": "1"} if fault == "429" else {}
                    return self._reply(int(fault), b"", extra)
                if fault == "401":  # as a registry does when a token has expired
                    upstream = proxy._forward(method, self.path, {})
                    return self._reply(401, b"", {"WWW-Authenticate": upstream.headers.get("WWW-Authenticate", "")})
                if fault == "redirect":
                    return self._reply(307, b"", {"Location": f"{proxy.storage_url}{self.path}"})
                if fault == "redirect401":  # the storage host then asks for credentials of its own
                    return self._reply(307, b"", {"Location": f"{proxy.storage_url}/challenge{self.path}"})
                if fault == "full200":
                    headers.pop("Range", None)
                    headers.pop("range", None)
                if fault == "slow":
                    time.sleep(1.5)
                upstream = proxy._forward(method, self.path, headers)
                body = upstream.content
                if fault == "corrupt" and body:  # one bit flipped, as a broken middlebox might
                    body = bytes([body[0] ^ 1]) + body[1:]
                passed = {k: v for k, v in upstream.headers.items()
                          if k.lower() in ("content-type", "content-range", "docker-content-digest",
                                           "www-authenticate", "accept-ranges", "etag")}
                if fault == "flood":  # the real headers and body, then 256 MiB more, no Content-Length
                    self.send_response(upstream.status_code)
                    for k, v in passed.items():
                        self.send_header(k, v)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    sent, zeros = 0, bytes(1 << 20)
                    try:
                        self.wfile.write(body)
                        while sent < FLOOD:
                            self.wfile.write(zeros)
                            sent += len(zeros)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    proxy.flooded.append(sent)
                    self.close_connection = True
                    return
                if fault in ("reset", "short", "stall"):  # half the body, then: RST, FIN, or nothing at all
                    self.send_response(upstream.status_code)
                    for k, v in passed.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    if fault == "stall":  # a registry that stopped answering mid-body
                        proxy.stopped.wait(STALL)
                    if fault == "reset":  # RST, not FIN
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                self._reply(upstream.status_code, body if method == "GET" else b"", passed,
                            length=int(upstream.headers.get("Content-Length", len(body))))

            def _referrers(self) -> None:
                index = "application/vnd.oci.image.index.v1+json"
                self._reply(200, proxy.referrers(self.path), {"Content-Type": index})

            def _reply(self, code: int, body: bytes, headers: dict[str, str], length: int | None = None) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                if proxy.set_cookie:
                    self.send_header("Set-Cookie", proxy.set_cookie)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if body:
                    proxy.throttle(len(body))
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def _storage_handler(self) -> Any:
        proxy = self

        class Storage(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                proxy.storage_auth.append(self.headers.get("Authorization"))
                if self.path.startswith("/challenge/"):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="{proxy.storage_url}/token",service="x"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                # blob storage trusts the signed URL; here: fetch with the registry's admin rights
                upstream = proxy._client.get(self.path, headers={
                    "Authorization": "Bearer storage", **({"Range": self.headers["Range"]}
                                                          if "Range" in self.headers else {})})
                self.send_response(upstream.status_code)
                for k in ("Content-Range", "Content-Type"):
                    if k in upstream.headers:
                        self.send_header(k, upstream.headers[k])
                self.send_header("Content-Length", str(len(upstream.content)))
                self.end_headers()
                self.wfile.write(upstream.content)

            def log_message(self, *args: Any) -> None:
                pass

        return Storage


class _QuietServer(http.server.ThreadingHTTPServer):
    """Says nothing of a client that hung up on a kept-alive connection (a daemon ended by umount)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)
