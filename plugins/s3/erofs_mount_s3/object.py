"""The S3 object as a Source: signed HEAD and ranged GETs through httpx."""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Generator
from typing import Any

import httpx

from erofs_mount_core import (
    CacheSettings,
    RetryPolicy,
    Source,
    SourceChangedError,
    SourceError,
    final_network_error,
    read_capped,
)

from . import sigv4
from .credentials import CredentialSource, Keys

#: the HEAD made while opening is retried with the core's policy; reads are one attempt each,
#: retried by the core's Retrying filter
RETRY = RetryPolicy(quiet=True)
RETRY_STATUS = (429, 500, 502, 503, 504)
DEFAULT_CACHE = CacheSettings()


class _SigV4(httpx.Auth):
    def __init__(self, keys: Keys | None, region: str) -> None:
        self.keys, self.region = keys, region

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.keys is not None:
            signed = sigv4.sign(request.method, str(request.url), dict(request.headers),
                                access_key=self.keys.access_key, secret_key=self.keys.secret_key,
                                region=self.region, session_token=self.keys.session_token)
            request.headers.update({k: v for k, v in signed.items() if k not in request.headers})
        yield request


class S3Object(Source):
    def __init__(self, bucket: str, key: str, *, region: str, endpoint: str, addressing: str,
                 credentials: CredentialSource, version: str | None = None, ca: str | None = None,
                 etag: str | None = None, cache: CacheSettings = DEFAULT_CACHE) -> None:
        self.bucket, self.key, self.region, self.endpoint = bucket, key, region, endpoint
        self.addressing, self.credentials, self.ca, self.cache = addressing, credentials, ca, cache
        verify: Any = ssl.create_default_context(cafile=ca) if ca else True
        self.client = httpx.Client(auth=_SigV4(credentials.lookup(), region), verify=verify,
                                   timeout=httpx.Timeout(connect=10, read=60, write=60, pool=30))
        self.url = self._url(version)
        try:
            response = RETRY.call(lambda: self._send("HEAD", {}), f"s3: HEAD s3://{bucket}/{key}")
        except BaseException:
            self.client.close()
            raise
        if response.status_code == 404:
            self.client.close()
            what = f"version {version} of " if version else ""
            raise (SourceChangedError if etag else SourceError)(f"s3: {what}s3://{bucket}/{key} does not exist")
        if response.status_code != 200:
            self.client.close()
            raise _status(response, f"s3://{bucket}/{key}")
        self._size = int(response.headers["Content-Length"])
        self.etag = response.headers.get("ETag", "")
        self.version = version or response.headers.get("x-amz-version-id") or None
        if self.version and self.version != "null" and version is None:
            self.url = self._url(self.version)  # pin the version we saw
        if etag is not None and etag != self.etag:
            self.client.close()
            raise SourceChangedError(f"s3: s3://{bucket}/{key} changed since it was mounted (ETag {etag} -> "
                                     f"{self.etag}): refusing to serve other bytes")

    def _url(self, version: str | None) -> str:
        base = urllib.parse.urlsplit(self.endpoint)
        key = urllib.parse.quote(self.key, safe="/-_.~")
        if self.addressing == "virtual":
            url = f"{base.scheme}://{self.bucket}.{base.netloc}/{key}"
        else:
            url = f"{base.scheme}://{base.netloc}/{self.bucket}/{key}"
        return url + (f"?versionId={urllib.parse.quote(version, safe='')}" if version and version != "null" else "")

    def _send(self, method: str, headers: dict[str, str], *, stream: bool = False) -> httpx.Response:
        """One request; 429, 5xx and transport failures are transient SourceErrors."""
        try:
            response = self.client.send(self.client.build_request(method, self.url, headers=headers), stream=stream)
        except httpx.TransportError as exc:
            final = final_network_error(exc, httpx.URL(self.url).netloc.decode())
            if final is not None:
                raise SourceError(f"s3: s3://{self.bucket}/{self.key}: {final}") from None
            raise SourceError(f"s3: s3://{self.bucket}/{self.key}: {type(exc).__name__}: {exc}",
                              transient=True) from None
        if response.status_code in RETRY_STATUS:
            response.close()
            retry_after = response.headers.get("Retry-After", "")
            raise SourceError(f"s3: s3://{self.bucket}/{self.key}: HTTP {response.status_code}", transient=True,
                              retry_after=float(retry_after) if retry_after.isdigit() else None)
        return response

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or length <= 0 or offset + length > self._size:
            raise SourceError(f"s3: read of {length} bytes at {offset} is outside the object's {self._size} bytes")
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if self.etag:
            headers["If-Match"] = self.etag
        response = self._send("GET", headers, stream=True)
        try:
            if response.status_code == 412:
                raise SourceChangedError(f"s3: s3://{self.bucket}/{self.key} changed under the mount")
            if response.status_code == 200:  # every read would download the whole object: refuse
                raise SourceError(f"s3: {self.endpoint} ignores Range requests and sent all of "
                                  f"s3://{self.bucket}/{self.key}; it cannot serve reads")
            if response.status_code != 206:
                raise _status(response, f"s3://{self.bucket}/{self.key}")
            data = read_capped(response.iter_bytes(), length, f"s3: range {offset}+{length}", transient=True,
                               failures=(httpx.TransportError,))
        finally:
            response.close()
        if len(data) != length:
            raise SourceError(f"s3: got {len(data)} of {length} bytes at {offset}", transient=True)
        return data

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.key}" + (f"?versionId={self.version}" if self.version else "")

    def close(self) -> None:
        self.client.close()

    def state(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "region": self.region, "endpoint": self.endpoint,
                "addressing": self.addressing, "version": self.version or "", "etag": self.etag,
                "size": self._size, "ca": self.ca or "", "credentials": self.credentials.to_record(),
                **self.cache.to_state()}


def _status(response: httpx.Response, what: str) -> SourceError:
    code = response.status_code
    reason = {403: "access denied (403): check the credentials", 404: "not found (404)"}.get(code, f"HTTP {code}")
    return SourceError(f"s3: {what}: {reason}", transient=code >= 500)
