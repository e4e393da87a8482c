"""AWS credentials from the usual places; records keep the place, never the keys.

    env                 $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY (and $AWS_SESSION_TOKEN)
    profile[:NAME]      the shared credentials file ($AWS_SHARED_CREDENTIALS_FILE or
                        ~/.aws/credentials), profile NAME (default $AWS_PROFILE or "default")
    anonymous           unsigned requests (public objects)
    auto (default)      env if $AWS_ACCESS_KEY_ID is set, else the profile if the file has it,
                        else anonymous
"""

from __future__ import annotations

import configparser
import os
from pathlib import Path
from typing import Any

import attrs

from erofs_mount_core import SourceError, UsageError


@attrs.frozen
class Keys:
    access_key: str
    secret_key: str = attrs.field(repr=False)
    session_token: str | None = attrs.field(default=None, repr=False)


def shared_file() -> Path:
    return Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")


@attrs.frozen
class CredentialSource:
    kind: str  # env | profile | anonymous
    path: str = ""
    profile: str = ""

    @classmethod
    def parse(cls, option: str | None) -> CredentialSource:
        kind, _, arg = (option or "auto").partition(":")
        profile = arg or os.environ.get("AWS_PROFILE") or "default"
        if kind == "env" and not arg:
            return cls("env")
        if kind == "anonymous" and not arg:
            return cls("anonymous")
        if kind == "profile":
            return cls("profile", str(shared_file()), profile)
        if kind == "auto" and not arg:
            if os.environ.get("AWS_ACCESS_KEY_ID"):
                return cls("env")
            if _read_profile(shared_file(), profile) is not None:
                return cls("profile", str(shared_file()), profile)
            return cls("anonymous")
        raise UsageError(f"s3: credentials={option!r}: use env, profile[:NAME], anonymous or auto")

    def lookup(self) -> Keys | None:
        if self.kind == "anonymous":
            return None
        if self.kind == "env":
            access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if not access or not secret:
                raise SourceError("s3: credentials come from $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY, "
                                  "which are not both set")
            return Keys(access, secret, os.environ.get("AWS_SESSION_TOKEN") or None)
        keys = _read_profile(Path(self.path), self.profile)
        if keys is None:
            raise SourceError(f"s3: {self.path} has no profile {self.profile!r} with keys")
        return keys

    #: what the record keeps of each kind: where to ask again, never what was found there
    RECORDED = {"profile": ("path", "profile")}

    def to_record(self) -> dict[str, str]:
        return {"kind": self.kind, **{name: getattr(self, name) for name in self.RECORDED.get(self.kind, ())}}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> CredentialSource:
        return cls(str(data.get("kind", "anonymous")), str(data.get("path", "")), str(data.get("profile", "")))


def _read_profile(path: Path, profile: str) -> Keys | None:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        if not parser.read(path):
            return None
    except configparser.Error as exc:
        raise SourceError(f"s3: cannot read {path}: {exc}") from exc
    if not parser.has_section(profile):
        return None
    section = parser[profile]
    if not section.get("aws_access_key_id") or not section.get("aws_secret_access_key"):
        return None
    return Keys(section["aws_access_key_id"], section["aws_secret_access_key"],
                section.get("aws_session_token") or None)
