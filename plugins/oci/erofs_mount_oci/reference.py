"""Image references: ``[registry[:port]/]repository[:tag][@digest]``, Docker's way.

A first path component with a dot or a colon, or ``localhost``, is a
registry; otherwise the registry is Docker Hub (``docker.io``, API host
``registry-1.docker.io``) and a one-component repository gets ``library/``.
No tag and no digest means ``latest``.
"""

from __future__ import annotations

import re

import attrs

from erofs_mount_core import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")


@attrs.frozen
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


#: longer than any real reference (a registry host, a 255-character name, a tag and a digest)
MAX_REFERENCE = 1024


def parse(text: str) -> Reference:
    if len(text) > MAX_REFERENCE:
        raise UsageError(f"oci: the reference is {len(text)} characters long, more than {MAX_REFERENCE}")
    original = text
    digest = None
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        if "@" in text:
            raise UsageError(f"oci: {original!r} has more than one '@' (NAME[:TAG][@sha256:DIGEST])")
        if not digest:
            raise UsageError(f"oci: {original!r} ends in '@' with no digest after it (@sha256:<64 hex>)")
        if not DIGEST.fullmatch(digest):
            raise UsageError(f"oci: {original!r}: {digest!r} is not a sha256:<64 hex> digest")
    registry = DOCKER_HUB
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, text = first, rest
        if not re.fullmatch(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?", registry):
            raise UsageError(f"oci: {original!r}: {registry!r} is not a registry host[:port]")
    tag = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise UsageError(f"oci: {original!r}: {tag!r} is not a valid tag")
    if not _REPOSITORY.fullmatch(text):
        raise UsageError(f"oci: {original!r}: {text!r} is not a valid repository name (lowercase, no spaces)")
    if registry == DOCKER_HUB and "/" not in text:
        text = f"library/{text}"
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, text, tag, digest)
