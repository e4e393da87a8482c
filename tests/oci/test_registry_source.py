"""The oci source against a real registry (docker-registry 2.8 on 127.0.0.1)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import pytest
from erofs_mount_oci import open_reference, reopen
from erofs_mount_oci.platform import Platform
from erofs_mount_oci.reference import parse

from erofs_mount_core import SourceChangedError, SourceError, UsageError
from erofs_mount_core._plugins import PluginHost
from tests.oci.conftest import USERS, read_all
from tests.oci.registry import EROFS_LAYER, Registry, TokenServer

INSECURE = {"insecure": ""}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- references and platforms (no registry) ------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("alpine", ("docker.io", "library/alpine", "latest", None)),
    ("team/app:1.4", ("docker.io", "team/app", "1.4", None)),
    ("localhost:5000/app", ("localhost:5000", "app", "latest", None)),
    ("registry.example.com/a/b/c:v1", ("registry.example.com", "a/b/c", "v1", None)),
    ("127.0.0.1:5055/x@sha256:" + "a" * 64, ("127.0.0.1:5055", "x", None, "sha256:" + "a" * 64)),
    ("r.io/x:t@sha256:" + "b" * 64, ("r.io", "x", "t", "sha256:" + "b" * 64)),
])
def test_references(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("text", ["UPPER/case", "a b", "r.io/x@sha256:short", "r.io/x:", "r.io/x:bad tag", ""])
def test_bad_references(text: str) -> None:
    with pytest.raises(UsageError):
        parse(text)


def test_platform_matching_like_containerd() -> None:
    assert Platform.parse("linux/arm64").matches(Platform.of("linux", "arm64", "v8"))
    assert Platform.parse("linux/aarch64").matches(Platform.of("linux", "arm64"))
    assert Platform.parse("linux/arm").matches(Platform.of("linux", "arm", "v7"))
    assert not Platform.parse("linux/arm/v6").matches(Platform.of("linux", "arm", "v7"))
    assert Platform.of("linux", "x86_64") == Platform.parse("linux/amd64")
    with pytest.raises(UsageError):
        Platform.parse("linux")


# -- a real registry without auth ---------------------------------------------

def test_tag_digest_and_tag_at_digest_read_the_layer_byte_for_byte(registry: Registry,
                                                                   layer: tuple[bytes, dict[str, str]]) -> None:
    data = layer[0]
    manifest = registry.push_image("team/app", "v1", [(data, EROFS_LAYER)])
    for ref in (f"{registry.host}/team/app:v1", f"{registry.host}/team/app@{manifest}",
                f"{registry.host}/team/app:v1@{manifest}"):
        source = open_reference(ref, INSECURE)
        try:
            assert source.size == len(data)
            assert read_all(source) == data
            assert source.state()["manifest_digest"] == manifest  # type: ignore[attr-defined]
            assert source.state()["blob_digest"] == sha(data)  # type: ignore[attr-defined]
        finally:
            source.close()


def test_a_digest_the_registry_does_not_match_is_refused(registry: Registry,
                                                        layer: tuple[bytes, dict[str, str]]) -> None:
    registry.push_image("team/app", "v1", [(layer[0], EROFS_LAYER)])
    with pytest.raises(SourceError, match="not found"):
        open_reference(f"{registry.host}/team/app@sha256:{'0' * 64}", INSECURE)


def test_layer_by_index_digest_and_media_type(registry: Registry, layer: tuple[bytes, dict[str, str]],
                                              other_layer: bytes) -> None:
    tar = b"not erofs" * 1000
    registry.push_image("team/multi", "v1", [(tar, "application/octet-stream"),
                                             (other_layer, EROFS_LAYER), (layer[0], EROFS_LAYER)])
    ref = f"{registry.host}/team/multi:v1"

    def blob(**options: str) -> bytes:
        source = open_reference(ref, {**INSECURE, **options})
        try:
            return read_all(source)
        finally:
            source.close()

    assert blob() == other_layer                      # the first layer whose media type says erofs
    assert blob(layer="2") == layer[0]
    assert blob(layer="0") == tar                     # chosen by the user: served as it is
    assert blob(blob=sha(layer[0])) == layer[0]
    with pytest.raises(UsageError, match="out of range: .* has 3 layer"):
        blob(layer="3")
    with pytest.raises(UsageError, match="no layer sha256:"):
        blob(blob="sha256:" + "1" * 64)
    registry.push_image("team/tar", "v1", [(tar, "application/vnd.oci.image.layer.v1.tar")])
    with pytest.raises(SourceError, match="has no rootfs.diff_ids"):  # tar layers: the whole image, by its config
        open_reference(f"{registry.host}/team/tar:v1", INSECURE)
    with pytest.raises(UsageError, match="layer= or blob="):
        blob(layer="1", blob=sha(tar))


def test_an_index_picks_the_platform(registry: Registry, layer: tuple[bytes, dict[str, str]],
                                     other_layer: bytes) -> None:
    amd = registry.push_image("team/index", "amd64", [(layer[0], EROFS_LAYER)])
    arm = registry.push_image("team/index", "arm64", [(other_layer, EROFS_LAYER)])
    att = registry.push_image("team/index", "att", [(b"{}", "application/vnd.in-toto+json")])
    registry.push_index("team/index", "multi", [
        (att, {"os": "unknown", "architecture": "unknown"}),
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        (amd, {"os": "linux", "architecture": "amd64"}),
    ])
    ref = f"{registry.host}/team/index:multi"
    for platform, expected in (("linux/arm64", other_layer), ("linux/arm64/v8", other_layer),
                               ("linux/amd64", layer[0])):
        source = open_reference(ref, {**INSECURE, "platform": platform})
        try:
            assert read_all(source) == expected
            assert source.state()["manifest_digest"] == (arm if expected == other_layer else amd)
        finally:
            source.close()
    with pytest.raises(UsageError, match=r"no image for platform linux/s390x .*linux/amd64, linux/arm64/v8"):
        open_reference(ref, {**INSECURE, "platform": "linux/s390x"})


def test_one_http_request_per_nbd_read_at_most(registry: Registry, layer: tuple[bytes, dict[str, str]]) -> None:
    data = layer[0]
    registry.push_image("team/count", "v1", [(data, EROFS_LAYER)])
    source = open_reference(f"{registry.host}/team/count:v1", {**INSECURE, "readahead-kib": "0"})
    try:
        reads = 0
        for off in range(0, len(data), 128 << 10):      # the kernel's usual max_sectors
            before = source.counters().get("http_requests", 0)
            assert source.pread(min(128 << 10, len(data) - off), off) == data[off:off + (128 << 10)]
            assert source.counters().get("http_requests", 0) - before <= 1
            reads += 1
        assert source.counters().get("http_requests", 0) <= reads
        before = source.counters().get("http_requests", 0)
        assert read_all(source, 4096)[:4096] == data[:4096]  # warm: from the cache
        assert source.counters().get("http_requests", 0) == before
    finally:
        source.close()


# -- auth ------------------------------------------------------------------------

def test_basic_auth_with_credentials_from_the_environment(basic_registry: Registry,
                                                          layer: tuple[bytes, dict[str, str]],
                                                          plain_creds: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    basic_registry.push_image("private/app", "v1", [(layer[0], EROFS_LAYER)])
    ref = f"{basic_registry.host}/private/app:v1"
    source = open_reference(ref, {**INSECURE, **plain_creds})
    try:
        assert read_all(source) == layer[0]
        assert USERS["alice"] not in json.dumps(source.state())  # type: ignore[attr-defined]
        assert source.state()["credentials"] == {"kind": "env", "username_var": "EROFS_MOUNT_OCI_USERNAME",
                                                      "password_var": "EROFS_MOUNT_OCI_PASSWORD"}
    finally:
        source.close()
    with pytest.raises(SourceError, match="401"):
        open_reference(ref, {**INSECURE, "credentials": "anonymous"})
    monkeypatch.setenv("EROFS_MOUNT_OCI_PASSWORD", "wrong")
    with pytest.raises(SourceError, match="401"):
        open_reference(ref, {**INSECURE, **plain_creds})


def test_token_auth_with_docker_config_and_refresh(token_registry: Registry, token_server: TokenServer,
                                                   layer: tuple[bytes, dict[str, str]],
                                                   tmp_docker_config: Path) -> None:
    token_registry.push_image("private/app", "v1", [(layer[0], EROFS_LAYER)])
    auth = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    tmp_docker_config.write_text(json.dumps({"auths": {token_registry.host: {"auth": auth}}}))
    token_server.lifetime = 31  # refreshed TOKEN_MARGIN (30 s) before expiry: every second
    token_server.issued.clear()
    source = open_reference(f"{token_registry.host}/private/app:v1", INSECURE)
    try:
        assert source.state()["credentials"] == {"kind": "docker-config",  # type: ignore[attr-defined]
                                                      "path": str(tmp_docker_config)}
        assert "scope=repository%3Aprivate%2Fapp%3Apull" in token_server.issued[0]
        first = len(token_server.issued)
        time.sleep(1.5)
        assert read_all(source) == layer[0]
        assert len(token_server.issued) > first, "an expiring token is fetched again"
        state = source.state()
    finally:
        source.close()
        token_server.lifetime = 300
    assert auth not in json.dumps(state) and USERS["alice"] not in json.dumps(state)
    tmp_docker_config.write_text(json.dumps({"auths": {}}))
    with pytest.raises(SourceError, match="has no credentials for"):
        reopen(state)


# -- reattach pins the bytes -----------------------------------------------------

def test_reattach_reads_the_recorded_blob_even_after_the_tag_moved(registry: Registry,
                                                                   layer: tuple[bytes, dict[str, str]],
                                                                   other_layer: bytes) -> None:
    host = PluginHost()
    registry.push_image("team/moving", "stable", [(layer[0], EROFS_LAYER)])
    source = host.open_source("oci", f"{registry.host}/team/moving:stable", INSECURE)
    state = host.source_state("oci", source)
    source.close()
    registry.push_image("team/moving", "stable", [(other_layer, EROFS_LAYER)])   # the tag moves
    again = host.deserialize_source("oci", state)
    try:
        assert read_all(again) == layer[0]
    finally:
        again.close()
    registry.delete_blob("team/moving", state["blob_digest"])
    with pytest.raises(SourceChangedError, match="is gone from the registry"):
        host.deserialize_source("oci", state)


def test_unknown_options_and_insecure_docker_hub_are_refused() -> None:
    with pytest.raises(UsageError, match="unknown option"):
        open_reference("127.0.0.1:1/x:y", {"password": "hunter2"})
    with pytest.raises(UsageError, match="refused for Docker Hub"):
        open_reference("library/alpine", INSECURE)


def test_docker_media_types_and_manifests_without_media_type(registry: Registry,
                                                             layer: tuple[bytes, dict[str, str]]) -> None:
    docker_manifest = "application/vnd.docker.distribution.manifest.v2+json"
    docker_list = "application/vnd.docker.distribution.manifest.list.v2+json"
    data = layer[0]
    config = json.dumps({"architecture": "arm64", "os": "linux"}).encode()
    doc = {"schemaVersion": 2, "mediaType": docker_manifest,
           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                      "digest": registry.push_blob("team/docker", config), "size": len(config)},
           "layers": [{"mediaType": EROFS_LAYER, "digest": registry.push_blob("team/docker", data),
                       "size": len(data)}]}
    arm = registry.put_manifest("team/docker", "arm", doc, docker_manifest)
    size = len(json.dumps(doc).encode())
    registry.put_manifest("team/docker", "list", {
        "schemaVersion": 2, "mediaType": docker_list,
        "manifests": [{"mediaType": docker_manifest, "digest": arm, "size": size,
                       "platform": {"os": "linux", "architecture": "arm64"}}]}, docker_list)
    source = open_reference(f"{registry.host}/team/docker:list", {**INSECURE, "platform": "linux/arm64/v8"})
    try:
        assert read_all(source) == data
    finally:
        source.close()
    bare = {k: v for k, v in doc.items() if k != "mediaType"}   # OCI allows leaving it out
    bare["config"] = {**doc["config"], "mediaType": "application/vnd.oci.image.config.v1+json"}
    registry.put_manifest("team/docker", "bare", bare, "application/vnd.oci.image.manifest.v1+json")
    source = open_reference(f"{registry.host}/team/docker:bare", INSECURE)
    try:
        assert read_all(source) == data
    finally:
        source.close()
