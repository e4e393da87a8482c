"""-o verify=full: the blob is checked whole before any byte is served, then every read span by span.

A proxy in front of the real registry flips a bit in chosen answers: under
verify=full no such byte reaches a reader; under the default (lazy) one does,
which is why the trust model (docs/security.md) says so.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_mount_oci import open_reference, reopen

from erofs_mount_core import SourceChangedError, SourceError
from erofs_mount_core._filters import Retrying, RetryPolicy
from tests.oci.conftest import USERS
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import EROFS_LAYER, Registry


@pytest.fixture
def proxy(token_registry: Registry, tmp_docker_config: Path, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    p = FaultProxy(token_registry.host)
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    tmp_docker_config.write_text(json.dumps({"auths": {p.host: {"auth": auth}}}))
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    yield p
    p.stop()


OPTIONS = {"insecure": "", "readahead-kib": "0", "block-kib": "64", "cache-mib": "1"}


def whole_blob_gets(proxy: FaultProxy) -> int:
    return proxy.ranges.count(None)


def test_verify_full_serves_no_corrupted_byte(proxy: FaultProxy, token_registry: Registry,
                                              layer: tuple[bytes, dict[str, str]]) -> None:
    data = layer[0]
    token_registry.push_image("verify/app", "v1", [(data, EROFS_LAYER)])
    ref = f"{proxy.host}/verify/app:v1"

    lazy = open_reference(ref, OPTIONS)
    try:
        proxy.inject("blob", "corrupt")
        assert lazy.pread(4096, 0) != data[:4096], "lazy: the corrupted answer reaches the reader"
    finally:
        lazy.close()

    full = open_reference(ref, {**OPTIONS, "verify": "full"})
    try:
        assert whole_blob_gets(proxy) == 1, "one streamed pass at mount"
        proxy.inject("blob", "corrupt")
        with pytest.raises(SourceError, match="is not the bytes measured when it was first read"):
            full.pread(4096, 0)
        proxy.inject("blob", "corrupt")
        served = Retrying(full, RetryPolicy(base_delay=0.01))  # as the daemon serves it
        assert served.pread(4096, 70000) == data[70000:74096]
        assert full.pread(len(data) - 5, 3) == data[3:len(data) - 2]
    finally:
        full.close()


def test_a_corrupted_pass_at_mount_refuses_the_blob(proxy: FaultProxy, token_registry: Registry,
                                                    layer: tuple[bytes, dict[str, str]]) -> None:
    token_registry.push_image("verify/bad", "v1", [(layer[0], EROFS_LAYER)])
    proxy.inject("blob", "corrupt")
    with pytest.raises(SourceChangedError, match="served bytes with digest"):
        open_reference(f"{proxy.host}/verify/bad:v1", {**OPTIONS, "verify": "full"})


def test_reattach_reuses_the_span_hashes_only_if_they_are_the_mounted_ones(
        proxy: FaultProxy, token_registry: Registry, layer: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    data = layer[0]
    token_registry.push_image("verify/again", "v1", [(data, EROFS_LAYER)])
    source = open_reference(f"{proxy.host}/verify/again:v1", {**OPTIONS, "verify": "full"})
    state = source.state()
    source.close()
    assert state["verify"] == "full" and state["span_size"] == 64 << 10
    assert whole_blob_gets(proxy) == 1

    again = reopen(state)  # the cached hashes: no second pass
    again.close()
    assert whole_blob_gets(proxy) == 1

    (cached,) = (tmp_path / "cache" / "oci-spans").iterdir()
    cached.write_bytes(bytes(len(cached.read_bytes())))  # tampered with: not the pinned hashes
    again = reopen(state)
    try:
        assert whole_blob_gets(proxy) == 2, "measured again"
        assert again.pread(4096, 65536) == data[65536:69632]
    finally:
        again.close()
    cached.unlink()
    reopen(state).close()
    assert whole_blob_gets(proxy) == 3


def test_verify_takes_lazy_or_full(token_registry: Registry) -> None:
    from erofs_mount_core import UsageError

    with pytest.raises(UsageError, match="verify='sometimes': use lazy or full"):
        open_reference(f"{token_registry.host}/verify/app:v1", {"insecure": "", "verify": "sometimes"})
