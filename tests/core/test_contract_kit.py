"""The contract kit catches broken sources, and says which rule they broke."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from erofs_mount_core import Source, SourceError, hookimpl
from erofs_mount_core.plugins import PluginHost
from erofs_mount_core.testing import ContractError, SourceCase, check_source

DATA = bytes(range(256)) * 300
STORE: dict[str, bytes] = {}


class Mem(Source):
    def __init__(self, key: str, pad: bool = False) -> None:
        self.key, self.data, self.pad = key, STORE[key], pad

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        if offset + length > len(self.data) and not self.pad:
            raise SourceError("past the end")
        return self.data[offset:offset + length]


class Plugin:
    """A memory source; flags break one rule each."""

    def __init__(self, *, leak: bool = False, pad: bool = False, no_identity: bool = False,
                 crash: bool = False) -> None:
        self.leak, self.pad, self.no_identity, self.crash = leak, pad, no_identity, crash

    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {"mem": "memory"}

    @hookimpl
    def erofs_mount_open_source(self, location: str, options: Mapping[str, str]) -> Source:
        if location not in STORE:
            if self.crash:
                raise KeyError(location)
            raise SourceError(f"mem: no {location}")
        source = Mem(location, self.pad)
        source.password = options.get("password", "")  # type: ignore[attr-defined]
        return source

    @hookimpl
    def erofs_mount_serialize_source(self, source: Mem) -> dict[str, Any]:
        state = {"key": source.key, "digest": hash(source.data)}
        if self.leak:
            state["password"] = source.password  # type: ignore[attr-defined]
        return state

    @hookimpl
    def erofs_mount_deserialize_source(self, state: Mapping[str, Any]) -> Source:
        source = Mem(state["key"])
        if not self.no_identity and hash(source.data) != state["digest"]:
            from erofs_mount_core import SourceChangedError

            raise SourceChangedError("mem: changed")
        return source


def host_with(plugin: Plugin) -> PluginHost:
    host = PluginHost([])
    assert host.register(plugin, "mem").error is None
    return host


def case() -> SourceCase:
    STORE["a"] = DATA
    return SourceCase(scheme="mem", location="a", expected=DATA, options={"password": "hunter22"},
                      secrets=["hunter22"], change=lambda: STORE.__setitem__("a", DATA[::-1]),
                      missing_location="nope")


def test_a_good_source_passes() -> None:
    check_source(case(), host_with(Plugin()))


@pytest.mark.parametrize("broken, message", [
    (Plugin(leak=True), "no-secrets|the record contains a secret"),
    (Plugin(pad=True), "past the end"),
    (Plugin(no_identity=True), "identity: deserialize accepted a record whose bytes have changed"),
    (Plugin(crash=True), "errors: opening a missing location raised KeyError"),
])
def test_broken_sources_fail_with_the_rule_they_broke(broken: Plugin, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        check_source(case(), host_with(broken))
