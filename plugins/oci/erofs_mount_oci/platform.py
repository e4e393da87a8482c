"""Platforms as containerd matches them: normalized os/arch/variant."""

from __future__ import annotations

import platform as _platform
from typing import Any

import attrs

from erofs_mount_core import UsageError

_ARCH = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm",
         "i386": "386", "i686": "386"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@attrs.frozen
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"oci: platform {text!r} is not OS/ARCH[/VARIANT] (for example linux/arm64/v8)")
        return cls.of(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def of(cls, os: str, architecture: str, variant: str = "") -> Platform:
        arch = _ARCH.get(architecture.lower(), architecture.lower())
        variant = (variant or "").lower()
        if arch == "arm64" and variant in ("", "8"):
            variant = "v8"
        elif arch == "arm" and variant in ("", "7"):
            variant = "v7"
        elif arch == "amd64" and variant == "v1":
            variant = ""
        return cls(os.lower(), arch, variant)

    @classmethod
    def host(cls) -> Platform:
        return cls.of("linux", _platform.machine())

    @classmethod
    def from_descriptor(cls, descriptor: dict[str, Any]) -> Platform | None:
        p = descriptor.get("platform")
        if not isinstance(p, dict) or "os" not in p or "architecture" not in p:
            return None
        return cls.of(str(p["os"]), str(p["architecture"]), str(p.get("variant", "")))

    def matches(self, other: Platform) -> bool:
        return (self.os, self.architecture, self.variant or _DEFAULT_VARIANT.get(self.architecture, "")) == (
            other.os, other.architecture, other.variant or _DEFAULT_VARIANT.get(other.architecture, ""))

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)
