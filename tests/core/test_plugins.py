"""The plugin host: isolation of broken plugins, scheme routing, clashes.

tests/test_packaging.py does the same through real installed distributions.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from erofs_mount_core._errors import PluginError, UnknownSchemeError, UsageError
from erofs_mount_core._plugins import ENTRY_POINT_GROUP, LOAD_ENV, PluginHost

M = "tests.core.fake_plugins"


def eps(**names: str) -> list[EntryPoint]:
    return [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in names.items()]


def test_a_good_plugin_serves_its_scheme() -> None:
    host = PluginHost(eps(mem=f"{M}:good"))
    assert host.schemes() == ["mem"]
    source = host.open_source("mem", "abc", {})
    assert source.pread(2, 1) == b"bc"
    state = host.source_state("mem", source)
    assert state == {"data": "abc", "tag": "good"}
    assert host.deserialize_source("mem", state).pread(3, 0) == b"abc"


def test_the_deprecated_serialize_hook_still_works_and_warns() -> None:
    with pytest.warns(DeprecationWarning, match="Source.state"):
        host = PluginHost(eps(old=f"{M}:old_style"))
    assert [(i.name, i.status) for i in host.plugins] == [("old", "ok")]
    source = host.open_source("old", "xyz", {})
    state = host.source_state("old", source)
    assert state == {"data": "xyz"}
    assert host.deserialize_source("old", state).pread(3, 0) == b"xyz"


def test_a_source_without_state_is_a_plugin_error() -> None:
    from erofs_mount_core import hookimpl
    from tests.core.fake_plugins import Good, OldMem

    class Forgetful(Good):
        @hookimpl
        def erofs_mount_open_source(self, location: str) -> OldMem:  # state() returns None, no serialize hook
            return OldMem(location.encode(), "forgetful")

    host = PluginHost([])
    host.register(Forgetful("forgetful"), "forgetful")
    with pytest.raises(PluginError, match=r"no recovery state.*implement Source.state\(\)"):
        host.source_state("forgetful", host.open_source("forgetful", "x", {}))


def test_broken_plugins_are_reported_and_the_others_keep_working() -> None:
    host = PluginHost(eps(mem=f"{M}:good", gone="no_such_module_xyz", wrong=f"{M}:wrong_argument",
                          typo=f"{M}:misspelled"))
    status = {i.name: (i.status, i.error) for i in host.plugins}
    assert status["mem"] == ("ok", None)
    assert status["gone"][0] == "failed" and "No module named 'no_such_module_xyz'" in status["gone"][1]
    assert status["wrong"][0] == "failed" and "url" in status["wrong"][1]
    assert status["typo"][0] == "failed" and "erofs_mount_open_sourse" in status["typo"][1]
    assert host.schemes() == ["mem"]
    assert host.open_source("mem", "x", {}).size == 1


def test_two_plugins_claiming_one_scheme_make_it_unusable() -> None:
    host = PluginHost(eps(a=f"{M}:good", b=f"{M}:other_mem"))
    assert host.conflicts() == {"mem": ["a", "b"]}
    with pytest.raises(PluginError, match="provided by several plugins"):
        host.open_source("mem", "x", {})


def test_calls_reach_only_the_owner() -> None:
    from tests.core.fake_plugins import Good

    host = PluginHost([])
    host.register(Good("one", tag="1"), "p1")
    host.register(Good("two", tag="2"), "p2")
    assert host.open_source("one", "x", {}).tag == "1"  # type: ignore[attr-defined]
    assert host.open_source("two", "x", {}).tag == "2"  # type: ignore[attr-defined]


def test_unknown_scheme_names_the_installed_ones() -> None:
    host = PluginHost(eps(mem=f"{M}:good"))
    with pytest.raises(UnknownSchemeError, match=r"'s3'.*installed: mem"):
        host.open_source("s3", "bucket/key", {})


def test_a_plugin_returning_a_non_source_is_a_plugin_error() -> None:
    host = PluginHost(eps(bad=f"{M}:returns_not_a_source"))
    with pytest.raises(PluginError, match="not a Source"):
        host.open_source("bad", "x", {})


def test_load_plugins_variable_restricts_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOAD_ENV, "")
    assert PluginHost(eps(mem=f"{M}:good")).plugins == []
    monkeypatch.setenv(LOAD_ENV, "mem")
    assert [i.name for i in PluginHost(eps(mem=f"{M}:good", gone="nope")).plugins] == ["mem"]


def test_the_host_refuses_an_option_the_plugin_did_not_declare_before_calling_it() -> None:
    host = PluginHost(eps(ok=f"{M}:declares_options"))
    with pytest.raises(UsageError, match=r"^mem: unknown option\(s\) colour, x \(known: size, tag\)$"):
        host.open_source("mem", "a", {"tag": "1", "colour": "blue", "x": ""})
    assert host.open_source("mem", "a", {"tag": "1"}) is not None


def test_a_plugin_that_declares_nothing_is_left_to_check_its_options() -> None:
    host = PluginHost(eps(mem=f"{M}:good"))  # no erofs_mount_source_options hook: the plugin decides
    assert host.open_source("mem", "a", {"anything": "1"}) is not None


def test_a_wrapping_scheme_gets_the_source_its_location_names_and_the_record_nests_it() -> None:
    host = PluginHost(eps(upper=f"{M}:wrapping", ok=f"{M}:declares_options"))
    source = host.open_source("upper", "mem:abc", {"tag": "t", "size": "3"})  # size is the inner source's
    assert source.pread(3, 0) == b"ABC"
    state = host.source_state("upper", source)
    assert state["inner"]["scheme"] == "mem" and state["tag"] == "t"
    again = host.deserialize_source("upper", state)
    assert again.pread(2, 1) == b"BC"
    assert [i.wrapping for i in host.plugins if i.name == "upper"] == [["upper"]]
    # each option goes to the one that declares it, and a name neither declares is the inner source's error
    with pytest.raises(UsageError, match=r"^mem: unknown option\(s\) colour "):
        host.open_source("upper", "mem:abc", {"tag": "t", "colour": "red"})
    with pytest.raises(UsageError, match="upper: 'nothing' names no source"):
        host.open_source("upper", "nothing", {})  # no installed scheme: the location reaches the plugin as it is


def test_nesting_is_bounded_and_a_bad_inner_record_is_one_error() -> None:
    host = PluginHost(eps(upper=f"{M}:wrapping", mem=f"{M}:good"))
    assert host.open_source("upper", "upper:upper:mem:abc", {}).pread(3, 0) == b"ABC"
    with pytest.raises(UsageError, match="nests sources more than 4 deep"):
        host.open_source("upper", "upper:" * 4 + "mem:abc", {})
    from erofs_mount_core import SourceError

    for bad in ({"inner": "mem"}, {"inner": {"scheme": "mem"}}, {"inner": {"scheme": 1, "state": {}}}):
        with pytest.raises(SourceError, match="^upper: the record's inner source is incomplete$"):
            host.deserialize_source("upper", {**bad, "tag": ""})


def test_a_plugin_that_wraps_a_scheme_it_does_not_provide_fails_to_load() -> None:
    host = PluginHost(eps(bad=f"{M}:wraps_what_it_lacks"))
    (info,) = host.plugins
    assert info.status == "failed" and "names schemes it does not provide: mem" in (info.error or "")


def test_warm_up_calls_each_plugin_s_hook_and_a_failing_one_stops_no_other() -> None:
    """``erofs_mount_warm_up``, which a process that forks commands calls once (``CommandServer``)."""
    from erofs_mount_core import hookimpl

    from .fake_plugins import Good

    warmed: list[str] = []

    class Warm(Good):
        @hookimpl
        def erofs_mount_warm_up(self) -> None:
            warmed.append(self.scheme)
            if self.scheme == "cold":
                raise RuntimeError("no bundle")

    host = PluginHost(eps())
    for scheme in ("cold", "warm"):
        host.register(Warm(scheme), scheme)
    host.register(Good("plain"), "plain")  # implements no warm-up: skipped
    host.warm_up()
    assert warmed == ["cold", "warm"]
