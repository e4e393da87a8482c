"""``-o verify=full``: a blob checked whole before any byte of it is served, then span by span.

Mounting streams the blob once, checks its digest, and keeps the sha256 of
every span (one cache block, 256 KiB by default). Each later range read is
checked against those hashes before it is served, so a registry or proxy
that sends other bytes causes an I/O error, never other bytes. The hashes
are kept in a root-only cache directory, under the blob's digest; the record
pins their own sha256, so reattach reuses them only if they are the ones
measured at mount, and streams the blob again otherwise.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import attrs

from erofs_mount_core import SourceChangedError, SourceError

from . import _http

CACHE_DIR_ENV = "EROFS_MOUNT_CACHE_DIR"
DEFAULT_CACHE_DIR = "/var/cache/erofs-mount"
HASH = 32  # bytes of one sha256


@attrs.frozen
class Spans:
    span_size: int
    hashes: bytes
    """The sha256 of each span, in order, concatenated."""

    def root(self) -> str:
        """What the record pins: the sha256 of all the span hashes."""
        return hashlib.sha256(self.hashes).hexdigest()

    def check(self, offset: int, data: bytes, what: str) -> None:
        """``data`` starts at a span boundary and holds whole spans (the blob's last may be short)."""
        for start in range(0, len(data), self.span_size):
            n = (offset + start) // self.span_size
            if hashlib.sha256(data[start:start + self.span_size]).digest() != self.hashes[n * HASH:(n + 1) * HASH]:
                raise SourceError(f"{what}: span {n} does not match the blob verified at mount: "
                                  "the registry served other bytes", transient=True)


def measure(client: Any, url: str, digest: str, size: int, span_size: int) -> Spans:
    """Stream the whole blob once: its digest checked, its span hashes taken."""
    what = f"blob {digest[:19]}… (verify=full)"

    def one_pass() -> Spans:
        response = _http.attempt(client, "GET", url, what=what, headers={"Accept-Encoding": "identity"},
                                 stream=True)
        whole, span, hashes, got = hashlib.sha256(), hashlib.sha256(), bytearray(), 0
        try:
            if response.status_code != 200:
                raise _http.status_error(response, what)
            for chunk in response.iter_bytes(1 << 20):
                view = memoryview(chunk)
                if got + len(view) > size:
                    raise SourceError(f"{what}: the registry sent more than the blob's {size} bytes")
                whole.update(view)
                while view:
                    take = span_size - got % span_size
                    span.update(view[:take])
                    got += len(view[:take])
                    view = view[take:]
                    if got % span_size == 0:
                        hashes += span.digest()
                        span = hashlib.sha256()
        except _http.HTTPError as exc:
            raise SourceError(f"{what}: {type(exc).__name__}: {exc}", transient=True) from None
        finally:
            response.close()
        if got != size:
            raise SourceError(f"{what}: got {got} of {size} bytes", transient=True)
        if got % span_size:
            hashes += span.digest()
        if f"sha256:{whole.hexdigest()}" != digest:
            raise SourceChangedError(f"{what}: the registry served bytes with digest sha256:{whole.hexdigest()}")
        return Spans(span_size, bytes(hashes))

    if not digest.startswith("sha256:"):
        raise SourceError(f"oci: verify=full checks sha256 blobs only, not {digest.split(':')[0]}")
    return _http.RETRY.call(one_pass, what)


def _directory() -> Path:
    """The cache directory: created root-only, refused if someone else owns it or it is a symlink."""
    path = Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR) / "oci-spans"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise SourceError(f"oci: cache directory {path} is not a directory of ours: refusing it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def _file(digest: str, span_size: int) -> Path:
    return _directory() / f"{digest.replace(':', '-')}.{span_size}"


def store(digest: str, spans: Spans) -> None:
    path = _file(digest, spans.span_size)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(spans.hashes)
    os.replace(tmp, path)


def load(digest: str, span_size: int, root: str) -> Spans | None:
    """The spans measured at mount, if the cache still holds exactly them."""
    try:
        fd = os.open(_file(digest, span_size), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        spans = Spans(span_size, f.read(64 << 20))
    return spans if spans.root() == root else None
