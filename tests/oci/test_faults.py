"""Faults between the oci source and a real registry: each read still returns the right bytes.

A mock can only imitate a registry; here the registry is real and a proxy
in front of it (tests/oci/faultproxy.py) breaks chosen requests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_mount_oci import open_reference

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
    source = open_reference(f"{proxy.host}/faulty/app:v1",
                            {"insecure": "", "readahead-kib": "0", "block-kib": "64", "cache-mib": "1"})
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
