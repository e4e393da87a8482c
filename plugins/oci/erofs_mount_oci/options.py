"""The ``oci:`` source's options (``-o``), and the registry client they make: what mounting and ``index push`` share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from erofs_mount_core import CacheSettings, UsageError

from . import reference as references

SCHEME = "oci"


@attrs.frozen
class Options:
    layer: int | None = None
    blob: str | None = None
    platform: str | None = None
    insecure: bool = False
    ca: str | None = None
    credentials: str | None = None
    hosts_dir: str | None = None
    verify: str = "lazy"
    verify_rate_mib: int = 20
    disk_cache_mib: int = 2048
    fill: bool = False
    index: str = "auto"
    index_key: str | None = None
    index_keys_dir: str | None = None
    publish_index: str | None = None
    diff_id: str = "report"
    cache: CacheSettings = CacheSettings()

    @classmethod
    def names(cls) -> set[str]:
        return {f.name.replace("_", "-") for f in attrs.fields(cls) if f.name != "cache"} | set(CacheSettings.OPTIONS)

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> Options:
        """From ``-o``: only the names ``names()`` declares reach it (the host refuses others)."""
        values: dict[str, Any] = {"cache": CacheSettings.parse(options, SCHEME)}
        for key, value in options.items():
            name = key.replace("-", "_")
            if key in CacheSettings.OPTIONS:
                continue
            if name in ("insecure", "fill"):
                values[name] = value.lower() not in ("0", "no", "false")
            elif name in ("layer", "disk_cache_mib", "verify_rate_mib"):
                if not value.isdigit() or (name == "verify_rate_mib" and int(value) == 0):
                    what = {"layer": "a layer's index: 0 for the first", "disk_cache_mib": "a whole number of MiB",
                            "verify_rate_mib": "a whole number of MiB/s, above 0"}[name]
                    raise UsageError(f"oci: {key}={value!r}: give {what}")
                values[name] = int(value)
            else:
                values[name] = value
        if values.get("index", "auto") not in ("auto", "off", "required"):
            raise UsageError(f"oci: index={values['index']!r}: use auto, off or required")
        if values.get("diff_id", "report") not in ("report", "strict"):
            raise UsageError(f"oci: diff-id={values['diff_id']!r}: use report or strict")
        if values.get("verify", "lazy") not in ("lazy", "full", "background"):
            raise UsageError(f"oci: verify={values['verify']!r}: use lazy or full (EROFS layers), or background "
                             "(tar layers)")
        if values.get("fill") and values.get("disk_cache_mib") == 0:
            raise UsageError("oci: fill keeps the layers in the span store: it needs disk-cache-mib above 0")
        if "layer" in values and "blob" in values:
            raise UsageError("oci: give layer= or blob=, not both")
        if "blob" in values:
            if not values["blob"].startswith("sha"):
                values["blob"] = "sha256:" + values["blob"]
            if not references.DIGEST.fullmatch(values["blob"]):
                raise UsageError(f"oci: blob={options['blob']!r} is not a sha256 digest")
        return cls(**values)


def client_for(ref: Any, *, insecure: bool, ca: str | None, credentials: Any, hosts_dir: str) -> Any:
    """The registry's client; its requests go through the hosts of ``hosts_dir`` ("": the registry alone)."""
    from . import _http
    from .routing import route

    registry = ref.api_host
    creds = credentials.lookup(registry)
    auth = _http.RegistryAuth(registry, insecure=insecure, username=creds.username, password=creds.password,
                              identity_token=creds.identity_token)
    api_root = f"{'http' if insecure else 'https'}://{registry}/v2"
    hosts = route(ref.registry, api_root, hosts_dir, insecure=insecure, ca_bundle=ca)
    return _http.make_client(insecure=insecure, ca_bundle=ca, auth=auth, route=hosts)


def hosts_dir_of(option: str | None) -> str:
    """The hosts directory a mount uses ("" for none), as the record keeps it."""
    from .hosts import DEFAULT_DIR

    return _directory_option(option, DEFAULT_DIR, "hosts-dir")


KEYS_DIR = "/etc/erofs-mount/index-keys"


def index_keys_dir_of(option: str | None) -> str:
    """The directory of trusted index keys a mount uses ("" for none), as the record keeps it: each
    registry's ``*.pub`` in a directory named as in containerd's hosts directory."""
    return _directory_option(option, KEYS_DIR, "index-keys-dir")


def _directory_option(option: str | None, default: str, name: str) -> str:
    """A directory option's value as a record keeps it: ``default`` when it exists and none is given, "" for
    ``none``, else the directory given, which must be one."""
    import os

    if option is None:
        return default if os.path.isdir(default) else ""
    if option.lower() == "none":
        return ""
    if not os.path.isdir(option):
        raise UsageError(f"oci: {name}={option!r} is not a directory")
    return os.path.abspath(option)
