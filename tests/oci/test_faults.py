"""Faults between the oci source and a real registry: each read still returns the right bytes.

A mock can only imitate a registry; here the registry is real and a proxy
in front of it (tests/oci/faultproxy.py) breaks chosen requests.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_mount_oci import _http, open_reference

from erofs_mount_core import _filters
from erofs_mount_core._filters import DEFAULT_RETRY, Retrying, RetryPolicy
from erofs_mount_core._nbd import protocol as p
from erofs_mount_core._nbd.transmission import Disk
from tests.oci.conftest import USERS
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import EROFS_LAYER, Registry


@pytest.fixture
def proxy(token_registry: Registry) -> Iterator[FaultProxy]:
    p = FaultProxy(token_registry.host)
    yield p
    p.stop()


def test_reads_survive_every_fault(proxy: FaultProxy, token_registry: Registry,
                                   layer: tuple[bytes, dict[str, str]], tmp_docker_config: Path) -> None:
    data = layer[0]
    token_registry.push_image("faulty/app", "v1", [(data, EROFS_LAYER)])
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    tmp_docker_config.write_text(json.dumps({"auths": {proxy.host: {"auth": auth}}}))
    proxy.inject("manifest", "503", "429")
    source = Retrying(open_reference(f"{proxy.host}/faulty/app:v1", {"insecure": "", "readahead-kib": "0",
                                                                      "block-kib": "64", "cache-mib": "1"}),
                      RetryPolicy(base_delay=0.05))  # as the daemon serves it, with shorter pauses
    try:
        chunk = 64 << 10
        for n, fault in enumerate(("429", "503", "reset", "short", "slow", "401", "redirect", "full200")):
            proxy.inject("blob", fault)
            offset = (n * 3 * chunk) % (len(data) - chunk)
            assert source.pread(chunk, offset) == data[offset:offset + chunk], fault
            assert proxy.pending() == [], f"{fault} was not exercised"
        assert proxy.storage_auth == [None], "Authorization must not follow a redirect to another host"
        requests = len(proxy.log)
        for offset in range(0, len(data) - chunk, chunk):  # the whole blob is now local
            assert source.pread(chunk, offset) == data[offset:offset + chunk]
        assert len(proxy.log) == requests, "no download per read after a 200 to a range request"
    finally:
        source.close()
    outcomes = [what for _m, _p, what in proxy.log]
    for fault in ("503", "429", "reset", "short", "slow", "401", "redirect", "full200"):
        assert fault in outcomes


def test_a_registry_that_ignores_range_for_a_blob_larger_than_the_body_bound_is_kept_whole(
        registry: Registry) -> None:
    """A pull-through mirror streams a blob it does not have yet whole, whatever Range asked: a blob larger
    than the general bound of an answer (64 MiB) is still kept whole (bounded by its own size) and served."""
    data = os.urandom(_http.MAX_BODY + (3 << 20))
    registry.push_image("faulty/large", "v1", [(data, EROFS_LAYER)])
    proxy = FaultProxy(registry.host)
    try:
        source = open_reference(f"{proxy.host}/faulty/large:v1", {"insecure": "", "readahead-kib": "0"})
        try:
            proxy.inject("blob", "full200")
            at = len(data) - (1 << 20)
            assert source.pread(1 << 20, at) == data[at:]
            assert source.pread(4096, 0) == data[:4096]
        finally:
            source.close()
        assert [f for _m, _p, f in proxy.log if f != "pass"] == ["full200"]
    finally:
        proxy.stop()


def test_a_read_that_keeps_failing_is_bounded(proxy: FaultProxy, token_registry: Registry,
                                             layer: tuple[bytes, dict[str, str]], tmp_docker_config: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """One NBD read against a registry that answers 503 forever: the default policy's attempts, then EIO."""
    from tests.core.test_transmission import Client

    data = layer[0]
    token_registry.push_image("faulty/bound", "v1", [(data, EROFS_LAYER)])
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    tmp_docker_config.write_text(json.dumps({"auths": {proxy.host: {"auth": auth}}}))
    pauses: list[float] = []
    monkeypatch.setattr(_filters.time, "sleep", pauses.append)  # the default policy's pauses, not slept
    source = Retrying(open_reference(f"{proxy.host}/faulty/bound:v1", {"insecure": ""}))  # as the daemon does
    try:
        proxy.inject("blob", *["503"] * 100)
        before = len(proxy.log)
        client = Client(Disk(source))
        client.request(p.CMD_READ, 0, 4096, cookie=9)
        assert client.reply() == (p.EIO, 9, b"")
        client.request(p.CMD_DISC)
        assert client.finish() == "disconnect"
    finally:
        source.close()
    http_requests = [what for _m, path, what in proxy.log[before:] if "/blobs/" in path]
    with capsys.disabled():
        print(f"\nworst case per failed NBD read: {len(http_requests)} HTTP requests, "
              f"{len(pauses)} pauses, {sum(pauses):.2f} s of back-off (default policy: "
              f"{DEFAULT_RETRY.attempts} attempts)")
    assert len(http_requests) == DEFAULT_RETRY.attempts
    assert len(pauses) == DEFAULT_RETRY.attempts - 1
    assert sum(pauses) <= sum(DEFAULT_RETRY.max_delay if DEFAULT_RETRY.base_delay * 2 ** n > DEFAULT_RETRY.max_delay
                              else DEFAULT_RETRY.base_delay * 2 ** n for n in range(DEFAULT_RETRY.attempts - 1))


def test_no_answer_is_read_past_what_was_asked(proxy: FaultProxy, token_registry: Registry,
                                                layer: tuple[bytes, dict[str, str]], tmp_docker_config: Path) -> None:
    """A range answer or a manifest that goes on and on is cut off, not read into memory."""
    from erofs_mount_core import SourceError
    from tests.oci.faultproxy import FLOOD

    data = layer[0]
    token_registry.push_image("faulty/flood", "v1", [(data, EROFS_LAYER)])
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    tmp_docker_config.write_text(json.dumps({"auths": {proxy.host: {"auth": auth}}}))
    proxy.inject("manifest", "flood", "flood")  # the token challenge (401), then the manifest itself
    with pytest.raises(SourceError, match="more than the .* bytes expected"):
        open_reference(f"{proxy.host}/faulty/flood:v1", {"insecure": ""})
    source = Retrying(open_reference(f"{proxy.host}/faulty/flood:v1", {"insecure": "", "readahead-kib": "0"}),
                      RetryPolicy(base_delay=0.01))
    try:
        proxy.inject("blob", "flood")
        assert source.pread(4096, 8192) == data[8192:12288]  # the flooded answer is refused, the retry serves
        assert proxy.pending() == []
    finally:
        source.close()
    assert len(proxy.flooded) == 3
    assert all(sent < FLOOD // 4 for sent in proxy.flooded), f"read far past the answer: {proxy.flooded}"


def test_credentials_go_only_to_the_registry(proxy: FaultProxy, token_registry: Registry,
                                             layer: tuple[bytes, dict[str, str]], tmp_docker_config: Path) -> None:
    """A host the registry redirects to, asking for credentials itself, gets none: not a token request, no Basic."""
    from erofs_mount_core import SourceError

    token_registry.push_image("faulty/leak", "v1", [(layer[0], EROFS_LAYER)])
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    tmp_docker_config.write_text(json.dumps({"auths": {proxy.host: {"auth": auth}}}))
    source = open_reference(f"{proxy.host}/faulty/leak:v1", {"insecure": "", "readahead-kib": "0"})
    try:
        proxy.inject("blob", "redirect401")
        with pytest.raises(SourceError, match="401"):
            source.pread(4096, 0)
    finally:
        source.close()
    assert proxy.storage_auth and all(a is None for a in proxy.storage_auth), proxy.storage_auth


def test_a_redirect_from_https_to_http_is_refused() -> None:
    """Checked on the transport itself: the real registry in these tests speaks plain http."""
    import httpx
    from erofs_mount_oci import _http

    def registry(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": "http://storage.example/blob?sig=1"})

    client = httpx.Client(transport=_http._CappedTransport(httpx.MockTransport(registry)), follow_redirects=True)
    from erofs_mount_core import SourceError

    with client, pytest.raises(SourceError, match="redirected from https to plain http .*: refused"):
        _http.attempt(client, "GET", "https://registry.example/v2/app/blobs/sha256:ab", what="blob")
