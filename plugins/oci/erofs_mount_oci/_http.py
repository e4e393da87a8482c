"""Everything that touches httpx: the client, single requests, range reads, registry auth.

Kept in one module so that a move to another HTTP library (httpx's
maintained fork, say) is one file. Imported only when a source is opened,
never by ``erofs-mount --help``.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Generator, Iterator
from typing import Any

import httpx

from erofs_mount_core import RetryPolicy, SourceError, final_network_error
from erofs_mount_core import read_capped as network_read_capped

from .routing import NoHost, answered_by, default_context

log = logging.getLogger("erofs_mount.oci")

USER_AGENT = "erofs-mount-oci/0.1"
TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=30.0)
RETRY_STATUS = {429, 500, 502, 503, 504}
#: refresh a Bearer token this long before it expires
TOKEN_MARGIN = 30.0
#: a token answer is a small JSON document; a larger one is not read
MAX_TOKEN_ANSWER = 1 << 20
#: open-time requests (manifests, blob HEAD) are retried with the core's policy;
#: range reads are not: the core's Retrying filter owns retries on the read path
RETRY = RetryPolicy(quiet=True)

HTTPError = httpx.HTTPError
Response = httpx.Response


#: the most any answer body may hold: a 2xx (read_capped sets tighter bounds, and a whole blob's
#: request its size: ``attempt(body_limit=)``), and anything else
MAX_BODY = 64 << 20
MAX_OTHER_BODY = 1 << 20
#: the request extension that carries a whole blob's size to the transport's bound
BODY_LIMIT = "erofs_mount_body_limit"


class _CappedBody(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, cap: int) -> None:
        self._stream, self._cap = stream, cap

    def __iter__(self) -> Iterator[bytes]:
        got = 0
        for chunk in self._stream:
            got += len(chunk)
            if got > self._cap:
                raise httpx.ReadError(f"an answer of more than {self._cap} bytes was cut off")
            yield chunk

    def close(self) -> None:
        self._stream.close()


class InsecureRedirect(httpx.HTTPError):
    """An https request redirected to plain http."""


class _CappedTransport(httpx.BaseTransport):
    """Bounds every body httpx reads, its own reads included (a 401 before auth, a redirect),
    and refuses a redirect from https to plain http."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        location = response.headers.get("Location", "")
        if request.url.scheme == "https" and 300 <= response.status_code < 400 \
                and location[:7].lower() == "http://":
            response.close()
            raise InsecureRedirect(f"redirected from https to plain http ({location.split('?')[0]}): refused")
        cap = max(MAX_BODY, request.extensions.get(BODY_LIMIT, 0)) if 200 <= response.status_code < 300 \
            else MAX_OTHER_BODY
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _CappedBody(response.stream, cap)
        return response

    def close(self) -> None:
        self._inner.close()


def warm_up() -> None:
    """What a client's first use costs, paid ahead: httpx imports its transport's libraries when the first
    client is made, and signatures need cryptography's key loading."""
    import cryptography.hazmat.primitives.serialization  # noqa: F401 - imported now, used by ``published``

    httpx.HTTPTransport(verify=default_context()).close()


def _http_transport(verify: Any) -> httpx.HTTPTransport:
    return httpx.HTTPTransport(verify=verify, limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))


def _transport(verify: Any) -> _CappedTransport:
    return _CappedTransport(_http_transport(verify))


def make_client(*, insecure: bool, ca_bundle: str | None, auth: httpx.Auth | None,
                route: Any = None) -> httpx.Client:
    """The client for one registry. ``route``: the ``routing.Route`` of its hosts.toml, when mirrors
    or settings of its own apply."""
    verify: Any = default_context()
    if ca_bundle:
        try:
            verify = ssl.create_default_context(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"oci: cannot use CA bundle {ca_bundle}: {exc}") from None
    if isinstance(auth, RegistryAuth):
        auth.verify = verify  # the token server is trusted as the registry is
    transport = _transport(verify) if route is None else _CappedTransport(route.transport(_http_transport, verify))
    return httpx.Client(auth=auth, transport=transport, timeout=TIMEOUT, follow_redirects=True,
                        headers={"User-Agent": USER_AGENT})


def _retry_after(response: httpx.Response) -> float | None:
    """The server's Retry-After in seconds (the retry policy bounds it); None if it has none or it is not
    one of the two forms HTTP allows."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(min(int(value), 86400))
    try:
        when = email.utils.parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError, OverflowError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


def attempt(client: httpx.Client, method: str, url: str, *, what: str,
            headers: dict[str, str] | None = None, stream: bool = False, body_limit: int = 0,
            content: bytes | None = None) -> httpx.Response:
    """One request; the caller closes a streamed response.

    429, 5xx, resets and timeouts raise SourceError(transient=True), with the
    server's Retry-After as ``retry_after``; any other answer is returned.
    ``body_limit``: a whole blob's size, when its body may be larger than ``MAX_BODY``.
    """
    try:
        request = client.build_request(method, url, headers=headers, content=content,
                                       extensions={BODY_LIMIT: body_limit} if body_limit else None)
        response = client.send(request, stream=stream)
    except (InsecureRedirect, NoHost) as exc:
        raise SourceError(f"{what}: {exc}") from None
    except (httpx.TransportError, httpx.DecodingError) as exc:
        final = _beyond_retries(exc, httpx.URL(url).netloc.decode())
        if final:
            raise SourceError(f"{what}: {final}") from None
        raise SourceError(f"{what}: {type(exc).__name__}: {exc}", transient=True) from None
    if response.status_code in RETRY_STATUS:
        response.close()
        raise SourceError(f"{what}: HTTP {response.status_code}", transient=True,
                          retry_after=_retry_after(response))
    return response


#: what an SSL library says when the other end does not speak TLS at all (a plain-HTTP server)
_NOT_TLS = ("WRONG_VERSION_NUMBER", "record layer failure", "packet length too long", "http request")


def _beyond_retries(exc: Exception, host: str) -> str | None:
    """Why retrying ``exc`` cannot help, with what to do, or None if a retry may."""
    final = final_network_error(exc, host)
    if final is not None:
        return final
    if any(sign in str(exc) for sign in _NOT_TLS):
        return (f"{host} does not answer in TLS: a plain-HTTP registry? (-o insecure reads it over plain "
                "HTTP: only on loopback or a network you trust)")
    return None


def fetch(client: httpx.Client, method: str, url: str, *, what: str, headers: dict[str, str] | None = None,
          cap: int = 0, content: bytes | None = None) -> tuple[httpx.Response, bytes]:
    """A request made while opening, retried by ``RETRY``: the (closed) response and, for a 200,
    its body, read up to ``cap`` bytes: a larger one is refused, never read whole. ``content``: the body
    a push sends."""
    def once() -> tuple[httpx.Response, bytes]:
        response = attempt(client, method, url, what=what, headers=headers, stream=True, content=content)
        try:
            body = read_capped(response, cap, what) if response.status_code == 200 and cap else b""
        finally:
            response.close()
        return response, body

    return RETRY.call(once, what)


def read_capped(response: httpx.Response, cap: int, what: str, *, transient: bool = False) -> bytes:
    """The body, if it is at most ``cap`` bytes; SourceError as soon as it is more."""
    return network_read_capped(response.iter_bytes(), cap, what, declared=response.headers.get("Content-Length", ""),
                               transient=transient, failures=(httpx.TransportError, httpx.DecodingError))


# -- range reads ---------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FullBody(Exception):
    """The server ignored Range and started sending the whole blob."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__("range ignored")
        self.response = response


def read_range(client: httpx.Client, url: str, offset: int, length: int, *, what: str, whole: int) -> bytes:
    """Exactly ``length`` bytes at ``offset`` of a blob of ``whole`` bytes, from one GET: one attempt,
    the caller's filter retries.

    Raises FullBody (with the open response) if the server answers 200.
    """
    headers = {"Range": f"bytes={offset}-{offset + length - 1}", "Accept-Encoding": "identity"}
    response = attempt(client, "GET", url, what=what, headers=headers, stream=True, body_limit=whole)
    if response.status_code == 200:
        raise FullBody(response)
    try:
        if response.status_code != 206:
            raise status_error(response, what)
        m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != offset:
            raise SourceError(f"{what}: the registry answered range {offset} with "
                              f"{response.headers.get('Content-Range')!r}")
        data = read_capped(response, length, what, transient=True)
    finally:
        response.close()
    if len(data) != length:
        raise SourceError(f"{what}: short body ({len(data)} of {length} bytes)", transient=True)
    return data


def status_error(response: httpx.Response, what: str) -> SourceError:
    """The error an answer means, naming the host that gave it (a mirror's too); only a 5xx is worth a retry."""
    code, host = response.status_code, answered_by(response)[1]
    if code == 401:
        return SourceError(f"{what}: {host} refused the credentials (401 Unauthorized): check them "
                           "(-o credentials=)")
    if code == 403:
        return SourceError(f"{what}: {host} denied access (403 Forbidden)")
    if code == 404:
        return SourceError(f"{what}: not found at {host} (404)")
    return SourceError(f"{what}: {host} answered HTTP {code}", transient=code >= 500)


# -- registry auth ---------------------------------------------------------------

def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service=x`` -> ``("bearer", {"realm": ..., "service": "x"})``.

    One pass over the header (a registry's text), whatever it holds: no
    backtracking, so a long malformed header costs linear time.
    """
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        j = i
        while j < n and (rest[j].isalnum() or rest[j] == "_"):
            j += 1
        key = rest[i:j]
        if key and j < n and rest[j] == "=":
            j += 1
            if j < n and rest[j] == '"':
                j += 1
                value: list[str] = []
                while j < n and rest[j] != '"':
                    if rest[j] == "\\" and j + 1 < n:
                        j += 1
                    value.append(rest[j])
                    j += 1
                params[key.lower()] = "".join(value)
                j += 1
            else:
                start = j
                while j < n and rest[j] not in " \t,":
                    j += 1
                params[key.lower()] = rest[start:j]
        else:  # not a parameter: on to the next comma
            while j < n and rest[j] != ",":
                j += 1
        i = max(j, i + 1)
    return scheme.lower(), params


class RegistryAuth(httpx.Auth):
    """Docker/OCI registry auth: Basic, or Bearer tokens from the WWW-Authenticate challenge.

    Tokens are cached per scope and fetched again before they expire and on a
    401. Only the token response is read into memory (blob bodies stream).
    """

    def __init__(self, registry: str, *, insecure: bool, username: str | None = None, password: str | None = None,
                 identity_token: str | None = None) -> None:
        self.origin = ("http" if insecure else "https", registry)
        self.insecure = insecure
        self.username, self.password, self.identity_token = username, password, identity_token
        self.verify: Any = True
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, expiry)
        self._challenge: tuple[str, dict[str, str]] | None = None

    # httpx calls sync_auth_flow; we never need the response body except the token's
    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._authorize(request)
        response = yield request
        if response.status_code != 401 or "WWW-Authenticate" not in response.headers:
            return
        if answered_by(response) != self.origin:  # a redirect target, or a mirror, asking: it gets nothing
            log.warning("ignoring an auth challenge from %s://%s, which is not the registry",
                        *answered_by(response))
            return
        scheme, params = parse_challenge(response.headers["WWW-Authenticate"])
        if scheme == "bearer" and "realm" in params:
            if not (params["realm"].startswith("https://") or self.insecure and params["realm"].startswith("http://")):
                raise SourceError(f"the registry's token realm {params['realm']!r} is not https: "
                                  "refusing to send credentials there (-o insecure allows plain http)")
            with self._lock:
                self._challenge = (scheme, params)
                self._tokens.pop(self._scope(params), None)
                token = self._fetch_token(params)
            request.headers["Authorization"] = f"Bearer {token}"
        elif scheme == "basic" and self.username is not None:
            with self._lock:
                self._challenge = (scheme, params)
            request.headers["Authorization"] = self._basic()
        else:
            return
        yield request  # httpx reads and closes the 401 before sending this

    def _authorize(self, request: httpx.Request) -> None:
        with self._lock:
            if self._challenge is None:
                return
            scheme, params = self._challenge
            if scheme == "basic":
                request.headers["Authorization"] = self._basic()
                return
            token = self._tokens.get(self._scope(params))
            if token is None or token[1] - TOKEN_MARGIN < time.monotonic():
                token_value = self._fetch_token(params)  # expired or about to: refresh now
            else:
                token_value = token[0]
        request.headers["Authorization"] = f"Bearer {token_value}"

    @staticmethod
    def _scope(params: dict[str, str]) -> str:
        return params.get("scope", "")

    def _basic(self) -> str:
        raw = f"{self.username or ''}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _fetch_token(self, params: dict[str, str]) -> str:
        realm = params["realm"]
        query = {k: v for k, v in (("service", params.get("service")), ("scope", params.get("scope"))) if v}
        headers = {"User-Agent": USER_AGENT}
        with httpx.Client(transport=_transport(self.verify), timeout=TIMEOUT, follow_redirects=True) as client:
            if self.identity_token:
                body = {**query, "grant_type": "refresh_token", "refresh_token": self.identity_token,
                        "client_id": "erofs-mount"}
                request = client.build_request("POST", realm, data=body, headers=headers)
            else:
                if self.username is not None:
                    headers["Authorization"] = self._basic()
                url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
                request = client.build_request("GET", url, headers=headers)
            try:
                response = client.send(request, stream=True)
            except httpx.TransportError as exc:
                raise SourceError(f"token server {realm}: {type(exc).__name__}: {exc}", transient=True) from None
            try:
                answer = read_capped(response, MAX_TOKEN_ANSWER, f"token server {realm}") \
                    if response.status_code == 200 else b""
            finally:
                response.close()
        if response.status_code != 200:
            raise SourceError(f"token server {realm} answered {response.status_code}: "
                              + ("wrong credentials" if response.status_code in (401, 403) else "no token"),
                              transient=response.status_code >= 500)
        try:
            body = json.loads(answer)
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise SourceError(f"token server {realm} sent no token: {exc}") from exc
        if not token:
            raise SourceError(f"token server {realm} sent no token")
        self._tokens[self._scope(params)] = (token, time.monotonic() + lifetime)
        return str(token)
