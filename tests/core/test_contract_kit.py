"""The contract kit catches broken sources, and says which rule they broke."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from erofs_mount_core import Source, SourceError, hookimpl
from erofs_mount_core.testing import CHECKS, ContractError, SourceCase, check_source

DATA = bytes(range(256)) * 300
STORE: dict[str, bytes] = {}


class Mem(Source):
    def __init__(self, key: str, pad: bool = False, fd: int | None = None, password: str = "",
                 leak: bool = False) -> None:
        self.key, self.data, self.pad, self.fd = key, STORE[key], pad, fd
        self.password, self.leak = password, leak

    def state(self) -> dict[str, Any]:
        state = {"key": self.key, "digest": hash(self.data)}
        if self.leak:
            state["password"] = self.password
        return state

    def fileno(self) -> int | None:
        return self.fd

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
                 crash: bool = False, fd: int | None = None) -> None:
        self.leak, self.pad, self.no_identity, self.crash, self.fd = leak, pad, no_identity, crash, fd

    @hookimpl
    def erofs_mount_schemes(self) -> dict[str, str]:
        return {"mem": "memory"}

    @hookimpl
    def erofs_mount_open_source(self, location: str, options: Mapping[str, str]) -> Source:
        if location not in STORE:
            if self.crash:
                raise KeyError(location)
            raise SourceError(f"mem: no {location}")
        return Mem(location, self.pad, self.fd, options.get("password", ""), self.leak)

    @hookimpl
    def erofs_mount_deserialize_source(self, state: Mapping[str, Any]) -> Source:
        source = Mem(state["key"])
        if not self.no_identity and hash(source.data) != state["digest"]:
            from erofs_mount_core import SourceChangedError

            raise SourceChangedError("mem: changed")
        return source


def case() -> SourceCase:
    STORE["a"] = DATA
    return SourceCase(scheme="mem", location="a", expected=DATA, options={"password": "hunter22"},
                      secrets=["hunter22"], change=lambda: STORE.__setitem__("a", DATA[::-1]),
                      missing_location="nope")


def test_a_good_source_passes() -> None:
    check_source(case(), plugin=Plugin())


def file_holding(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "bytes"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_a_source_with_a_faithful_file_descriptor_passes(tmp_path: Path) -> None:
    fd = file_holding(tmp_path, DATA)
    try:
        check_source(case(), plugin=Plugin(fd=fd))
    finally:
        os.close(fd)


def test_a_file_descriptor_with_other_bytes_breaks_the_fileno_rule(tmp_path: Path) -> None:
    fd = file_holding(tmp_path, DATA[:4096] + bytes(len(DATA) - 4096))
    try:
        with pytest.raises(ContractError, match="fileno: the descriptor's .* differ"):
            check_source(case(), plugin=Plugin(fd=fd))
    finally:
        os.close(fd)


@pytest.mark.parametrize("broken, message", [
    (Plugin(leak=True), "no-secrets|the record contains a secret"),
    (Plugin(pad=True), "past the end"),
    (Plugin(no_identity=True), "identity: deserialize accepted a record whose bytes have changed"),
    (Plugin(crash=True), "errors: opening a missing location raised KeyError"),
])
def test_broken_sources_fail_with_the_rule_they_broke(broken: Plugin, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        check_source(case(), plugin=broken)


@pytest.mark.parametrize("rule", CHECKS)
def test_each_rule_runs_on_its_own(rule: str) -> None:
    check_source(case(), plugin=Plugin(), checks=[rule])


def test_a_plugin_that_does_not_load_is_a_contract_error() -> None:
    class NoSchemes:
        @hookimpl
        def erofs_mount_schemes(self) -> dict[str, str]:
            return {}

    with pytest.raises(ContractError, match="register: the plugin does not load"):
        check_source(case(), plugin=NoSchemes())
