"""Where registry credentials come from; records keep the place, never the secret.

    anonymous               no credentials
    env                     $EROFS_MOUNT_OCI_USERNAME and $EROFS_MOUNT_OCI_PASSWORD
                            (names can be changed: credentials=env:USER_VAR:PASS_VAR)
    docker-config[:PATH]    docker's config.json: auths (auth, identitytoken),
                            credHelpers and credsStore (docker-credential-* programs)
    auto (the default)      docker-config if it has an entry for the registry,
                            else anonymous

Reattach asks the same place again, so credentials can be rotated between
mount and reattach.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import attrs

from erofs_mount_core import SourceError, UsageError

USERNAME_ENV = "EROFS_MOUNT_OCI_USERNAME"
PASSWORD_ENV = "EROFS_MOUNT_OCI_PASSWORD"
#: docker-credential-NAME: a plain name, never a path
HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: a docker config is a small JSON document
MAX_CONFIG = 4 << 20
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@attrs.frozen
class Credentials:
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    identity_token: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class CredentialSource:
    kind: str  # anonymous | env | docker-config
    path: str = ""
    username_var: str = USERNAME_ENV
    password_var: str = PASSWORD_ENV

    @classmethod
    def parse(cls, option: str | None, registry: str) -> CredentialSource:
        option = option or "auto"
        kind, _, arg = option.partition(":")
        if kind == "anonymous" and not arg:
            return cls("anonymous")
        if kind == "env":
            names = arg.split(":") if arg else [USERNAME_ENV, PASSWORD_ENV]
            if len(names) != 2 or not all(names):
                raise UsageError("oci: credentials=env:USER_VAR:PASS_VAR needs two variable names")
            return cls("env", username_var=names[0], password_var=names[1])
        if kind in ("docker-config", "auto"):
            path = arg or str(docker_config_path())
            if kind == "auto" and not _mentions(Path(path), registry):
                return cls("anonymous")
            return cls("docker-config", path=path)
        raise UsageError(f"oci: credentials={option!r}: use anonymous, env[:USER:PASS], docker-config[:PATH] or auto")

    def lookup(self, registry: str) -> Credentials:
        if self.kind == "anonymous":
            return Credentials()
        if self.kind == "env":
            user, password = os.environ.get(self.username_var), os.environ.get(self.password_var)
            if user is None or password is None:
                raise SourceError(f"oci: credentials come from ${self.username_var} and ${self.password_var}, "
                                  "which are not both set")
            return Credentials(user, password)
        entry = _docker_entry(Path(self.path), registry)
        if entry is None:
            raise SourceError(f"oci: {self.path} has no credentials for {registry}")
        return entry

    #: what the record keeps of each kind: where to ask again, never what was found there
    RECORDED = {"env": ("username_var", "password_var"), "docker-config": ("path",)}

    def to_record(self) -> dict[str, str]:
        return {"kind": self.kind, **{name: getattr(self, name) for name in self.RECORDED.get(self.kind, ())}}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> CredentialSource:
        return cls(**{k: str(v) for k, v in data.items() if k in attrs.fields_dict(cls)})


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


def _keys(registry: str) -> tuple[str, ...]:
    if registry in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        return DOCKER_HUB_KEYS
    return (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/")


def _read_config(path: Path) -> dict[str, Any]:
    """docker's config, if root may trust it: a file it names decides which program root runs."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & 0o022):
            raise SourceError(f"oci: docker config {path} is owned by uid {st.st_uid} or writable by others: "
                              "root takes credentials (and the helper programs they name) only from a file "
                              "only root can change; use -o credentials=env or a root-owned config")
        config = json.loads(f.read(MAX_CONFIG))
    if not isinstance(config, dict):
        raise ValueError("not a JSON object")
    return config


def _mentions(path: Path, registry: str) -> bool:
    """Whether docker's config has a way to credentials for ``registry`` (no helper is run)."""
    try:
        config = _read_config(path)
    except (OSError, ValueError, SourceError):
        return False
    keys = _keys(registry)
    return bool(config.get("credsStore")) or any(
        k in config.get("credHelpers", {}) or k in config.get("auths", {}) for k in keys)


def _docker_entry(path: Path, registry: str) -> Credentials | None:
    try:
        config = _read_config(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SourceError(f"oci: cannot read docker config {path}: {exc}") from exc
    keys = _keys(registry)
    helper = next((config.get("credHelpers", {}).get(k) for k in keys if k in config.get("credHelpers", {})), None)
    if helper:
        return _helper(helper, keys[0])
    for key in keys:
        entry = config.get("auths", {}).get(key)
        if entry:
            if entry.get("identitytoken"):
                return Credentials(identity_token=entry["identitytoken"])
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                return Credentials(user, password)
            if entry.get("username"):
                return Credentials(entry["username"], entry.get("password", ""))
    if config.get("credsStore"):
        return _helper(config["credsStore"], keys[0], missing_ok=True)
    return None


def _helper(name: str, server: str, missing_ok: bool = False) -> Credentials | None:
    if not isinstance(name, str) or not HELPER_NAME.fullmatch(name):
        raise SourceError(f"oci: credential helper name {name!r} is not a plain name (letters, digits, . _ -)")
    program = f"docker-credential-{name}"
    try:
        proc = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SourceError(f"oci: credential helper {program} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"oci: credential helper {program} did not answer") from None
    if proc.returncode != 0:
        if missing_ok and "not found" in (proc.stdout + proc.stderr).lower():
            return None
        raise SourceError(f"oci: credential helper {program} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        raise SourceError(f"oci: credential helper {program} gave no JSON") from None
    if answer.get("Username") == "<token>":
        return Credentials(identity_token=answer.get("Secret"))
    return Credentials(answer.get("Username"), answer.get("Secret"))
