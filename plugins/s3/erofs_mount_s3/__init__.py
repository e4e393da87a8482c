"""erofs-mount source ``s3:BUCKET/KEY``: an EROFS image in S3 or an S3-compatible store.

    erofs-mount mount --source s3:my-bucket/images/app.erofs /mnt/app
    erofs-mount mount --source s3:images/app.erofs -o endpoint=http://127.0.0.1:9000 /mnt/app

Options (``-o key=value``):

    region=NAME          the bucket's region (default $AWS_REGION, $AWS_DEFAULT_REGION or us-east-1)
    endpoint=URL         an S3-compatible server (default https://s3.REGION.amazonaws.com)
    addressing=STYLE     path (endpoint/bucket/key) or virtual (bucket.endpoint/key);
                         default virtual on AWS, path elsewhere
    version=ID           a specific object version (versioned buckets)
    credentials=SOURCE   env | profile[:NAME] | anonymous | auto (default; see below)
    ca=PATH              CA bundle for the endpoint's TLS certificate
    cache-mib=N          in-memory block cache bound (default 256)
    block-kib=N          cache block size (default 256)
    readahead-kib=N      the most fetched ahead when reads run in order, ramping up from one block
                         (default 4096, 0 = off)

Credentials come from $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY
($AWS_SESSION_TOKEN) or the shared credentials file, and are never
recorded. Requests are signed with AWS Signature Version 4. Reads go
through erofs-mount's block cache: each read the cache misses is one ranged
GET. The record keeps the object's ETag and version id; reads
carry If-Match, and reattach refuses an object that changed.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

from erofs_mount_core import CacheSettings, Source, SourceChangedError, SourceError, UsageError, hookimpl

from .credentials import CredentialSource

__all__: list[str] = []  # a plugin only: nothing for other code to import

SCHEME = "s3"
OPTIONS = ("region", "endpoint", "addressing", "version", "credentials", "ca", *CacheSettings.OPTIONS)


def _parse(location: str, options: Mapping[str, str]) -> dict[str, Any]:
    """The location and options (only those ``OPTIONS`` names: the host refuses others) as S3Object's arguments."""
    bucket, _, key = location.removeprefix("//").partition("/")
    if not bucket or not key:
        raise UsageError(f"s3: {location!r} is not BUCKET/KEY")
    region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
        or "us-east-1"
    endpoint = options.get("endpoint") or f"https://s3.{region}.amazonaws.com"
    if urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
        raise UsageError(f"s3: endpoint {endpoint!r} is not an http:// or https:// URL")
    addressing = options.get("addressing") or ("virtual" if "amazonaws.com" in endpoint else "path")
    if addressing not in ("path", "virtual"):
        raise UsageError("s3: addressing must be path or virtual")
    return {"bucket": bucket, "key": key, "region": region, "endpoint": endpoint.rstrip("/"),
            "addressing": addressing, "version": options.get("version") or None,
            "credentials": CredentialSource.parse(options.get("credentials")), "ca": options.get("ca") or None,
            "cache": CacheSettings.parse(options, SCHEME)}


@hookimpl
def erofs_mount_schemes() -> dict[str, str]:
    return {SCHEME: "EROFS image in S3 or an S3-compatible store: s3:BUCKET/KEY"}


@hookimpl
def erofs_mount_source_options() -> tuple[str, ...]:
    return OPTIONS


@hookimpl
def erofs_mount_open_source(location: str, options: Mapping[str, str]) -> Source:
    from .object import S3Object  # httpx loads only when a source is opened

    s3object = S3Object(**_parse(location, options))
    return s3object.cache.wrap(s3object)


@hookimpl
def erofs_mount_deserialize_source(state: Mapping[str, Any]) -> Source:
    from .object import S3Object

    try:
        source = S3Object(
            str(state["bucket"]), str(state["key"]), region=str(state["region"]), endpoint=str(state["endpoint"]),
            addressing=str(state["addressing"]), credentials=CredentialSource.from_record(dict(state["credentials"])),
            version=str(state["version"]) or None, ca=str(state.get("ca") or "") or None, etag=str(state["etag"]),
            cache=CacheSettings.from_state(state))
    except KeyError as exc:
        raise SourceError(f"s3: record state lacks {exc}") from exc
    if source.size != int(state["size"]):
        source.close()
        raise SourceChangedError(f"s3: s3://{state['bucket']}/{state['key']} changed size since it was mounted")
    return source.cache.wrap(source)
