"""Plugins for tests/core/test_plugins.py, loaded through entry points."""

from __future__ import annotations

from erofs_mount_core import Source, hookimpl


class Mem(Source):
    def __init__(self, data: bytes, tag: str) -> None:
        self.data, self.tag = data, tag

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]


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
    def erofs_mount_serialize_source(self, source: Mem) -> dict[str, str]:
        return {"data": source.data.decode(), "tag": self.tag}

    @hookimpl
    def erofs_mount_deserialize_source(self, state: dict[str, str]) -> Source:
        return Mem(state["data"].encode(), self.tag)


good = Good()
other_mem = Good(tag="other")


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
