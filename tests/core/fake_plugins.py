"""Plugins for tests/core/test_plugins.py, loaded through entry points."""

from __future__ import annotations

from erofs_mount_core import InnerSource, Source, UsageError, hookimpl


class Mem(Source):
    def __init__(self, data: bytes, tag: str) -> None:
        self.data, self.tag = data, tag

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]

    def state(self) -> dict[str, str]:
        return {"data": self.data.decode(), "tag": self.tag}


class Good:
    def __init__(self, scheme: str = "mem", tag: str = "good") -> None:
        self.scheme, self.tag = scheme, tag

    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {self.scheme: "bytes in memory"}

    @hookimpl
    def erofs_mount_open_source(self, scheme: str, location: str) -> Source:
        return Mem(location.encode(), self.tag)

    @hookimpl
    def erofs_mount_deserialize_source(self, state: dict[str, str]) -> Source:
        return Mem(state["data"].encode(), self.tag)


good = Good()
other_mem = Good(tag="other")


class OldMem(Mem):
    """A source written before Source.state(): its plugin serializes it."""

    def state(self) -> None:
        return None


class OldStyle:
    """A plugin written against the deprecated erofs_mount_serialize_source hook."""

    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {"old": "bytes in memory, serialized by the plugin"}

    @hookimpl
    def erofs_mount_open_source(self, location: str) -> Source:
        return OldMem(location.encode(), "old")

    @hookimpl
    def erofs_mount_serialize_source(self, source: OldMem) -> dict[str, str]:
        return {"data": source.data.decode()}

    @hookimpl
    def erofs_mount_deserialize_source(self, state: dict[str, str]) -> Source:
        return OldMem(state["data"].encode(), "old")


old_style = OldStyle()


class WrongArgument:
    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {"wrong": "x"}

    @hookimpl
    def erofs_mount_open_source(self, url: str) -> None:  # no such hook argument
        return None


wrong_argument = WrongArgument()


class Misspelled:
    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {"typo": "x"}

    @hookimpl
    def erofs_mount_open_sourse(self) -> None:
        return None


misspelled = Misspelled()


class ReturnsNotASource:
    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {"bad": "x"}

    @hookimpl
    def erofs_mount_open_source(self) -> object:
        return "not a source"


returns_not_a_source = ReturnsNotASource()


class ClaimsAMountFlag(Good):
    """Declares ``noexec`` and ``_netdev`` as source options: -o never hands those to a source."""

    @hookimpl
    def erofs_mount_source_options(self) -> list[str]:
        return ["size", "noexec", "_netdev"]


claims_a_mount_flag = ClaimsAMountFlag(scheme="flagged")


class DeclaresOptions(Good):
    @hookimpl
    def erofs_mount_source_options(self, scheme: str) -> list[str]:
        return ["tag", "size"] if scheme == "mem" else []


declares_options = DeclaresOptions()


class Upper(Source):
    """The bytes of another source, upper-cased: a source that reads another one (as tar: does)."""

    def __init__(self, inner: InnerSource, tag: str) -> None:
        self.inner, self.tag = inner, tag

    @property
    def size(self) -> int:
        return self.inner.source.size

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.inner.source.pread(length, offset)).upper()

    def state(self) -> dict[str, object]:
        return {"inner": self.inner.record(), "tag": self.tag}

    def close(self) -> None:
        self.inner.source.close()


class Wrapping:
    """``upper:SCHEME:LOCATION``: takes ``tag`` itself, leaves every other option to the inner source."""

    def __init__(self, schemes: tuple[str, ...] = ("upper",)) -> None:
        self.wraps = schemes

    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {"upper": "another source's bytes, upper-cased"}

    @hookimpl
    def erofs_mount_source_options(self) -> tuple[str, ...]:
        return ("tag",)

    @hookimpl
    def erofs_mount_wrapping_schemes(self) -> tuple[str, ...]:
        return self.wraps

    @hookimpl
    def erofs_mount_open_source(self, location: str, options: dict[str, str], inner: InnerSource | None) -> Source:
        if inner is None:
            raise UsageError(f"upper: {location!r} names no source")
        return Upper(inner, options.get("tag", ""))

    @hookimpl
    def erofs_mount_deserialize_source(self, state: dict[str, object], inner: InnerSource | None) -> Source:
        assert inner is not None
        return Upper(inner, str(state["tag"]))


wrapping = Wrapping()
wraps_what_it_lacks = Wrapping(("upper", "mem"))
