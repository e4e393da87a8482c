"""Reads through the mirrors and peers of containerd's hosts.toml, against real registries: an upstream
and a pull-through cache of it (docker-registry's proxy mode), each behind a logging proxy; and a
registry with auth beside a copy of its image that needs none, as a peer cache is."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import random
import tarfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from erofs_mount_oci import open_reference, reopen

from erofs_mount_core import SourceError
from erofs_mount_core._filters import Retrying
from tests.oci.conftest import USERS, read_all
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import EROFS_LAYER, Registry, free_port

TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("upstream"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("secured"), auth="htpasswd", users=USERS)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("peer"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, upstream: Registry) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("mirror"), mirror_of=upstream)
    yield r
    r.stop()


@pytest.fixture
def logged(upstream: Registry, mirror: Registry) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """Request logs in front of the upstream (our requests only: the mirror reaches it directly) and the mirror."""
    up, mi = FaultProxy(upstream.host), FaultProxy(mirror.host)
    yield up, mi
    up.stop()
    mi.stop()


@pytest.fixture
def env_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EROFS_MOUNT_OCI_USERNAME", "alice")
    monkeypatch.setenv("EROFS_MOUNT_OCI_PASSWORD", USERS["alice"])


def hosts_toml(root: Path, registry: str, text: str) -> Path:
    (root / registry).mkdir(parents=True)
    (root / registry / "hosts.toml").write_text(text)
    return root


def blobs(proxy: FaultProxy) -> list[str]:
    return [path for _m, path, _f in proxy.log if "/blobs/" in path]


def test_blobs_come_from_the_mirror_and_tags_from_the_registry_and_reattach_routes_the_same(
        layer: tuple[bytes, dict[str, str]], upstream: Registry, logged: tuple[FaultProxy, FaultProxy],
        tmp_path: Path) -> None:
    data, _sums = layer
    upstream.push_image("team/app", "1", [(data, EROFS_LAYER)])
    up, mi = logged
    hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                       f'[host."http://{mi.host}"]\n  capabilities = ["pull"]\n')
    source = open_reference(f"{up.host}/team/app:1", {"insecure": "", "hosts-dir": str(hosts)})
    try:
        assert read_all(source) == data
        state = source.state()
    finally:
        source.close()
    assert state["hosts_dir"] == str(hosts)
    assert blobs(up) == [], "every blob came from the mirror"
    assert [p for _m, p, _f in up.log] == ["/v2/team/app/manifests/1"], "the registry only resolved the tag"
    assert blobs(mi) and all(f"ns={urllib.parse.quote(up.host, safe='')}" in p for p in blobs(mi))

    # reattach routes the same way, by the record, and resolves no tag
    up.log.clear()
    again = reopen(state)
    try:
        assert again.pread(4096, 0) == data[:4096]
    finally:
        again.close()
    assert up.log == []


@pytest.mark.usefixtures("env_creds")
def test_the_registry_s_credentials_never_reach_a_mirror(layer: tuple[bytes, dict[str, str]], secured: Registry,
                                                         peer: Registry, tmp_path: Path) -> None:
    data, _sums = layer
    secured.push_image("team/app", "1", [(data, EROFS_LAYER)])
    peer.push_image("team/app", "1", [(data, EROFS_LAYER)])
    up, pe = FaultProxy(secured.host), FaultProxy(peer.host)
    try:
        hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                           f'[host."http://{pe.host}"]\n  capabilities = ["pull"]\n'
                           f'[host."http://{pe.host}".header]\n  x-peer = "yes"\n')
        source = open_reference(f"{up.host}/team/app:1", {"insecure": "", "credentials": "env",
                                                          "hosts-dir": str(hosts)})
        try:
            assert read_all(source) == data
        finally:
            source.close()
        assert blobs(pe) and blobs(up) == []
        assert not any(pe.authorization), "the registry's credentials reached the peer"
        assert any(a and a.startswith(("Basic", "Bearer")) for a in up.authorization)
    finally:
        up.stop()
        pe.stop()


def test_a_dead_mirror_is_skipped_with_one_line_and_reads_go_on(
        layer: tuple[bytes, dict[str, str]], upstream: Registry, logged: tuple[FaultProxy, FaultProxy],
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, _sums = layer
    upstream.push_image("team/dead", "1", [(data, EROFS_LAYER)])
    up, mi = logged
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                       f'[host."http://{dead}"]\n  capabilities = ["pull"]\n  dial_timeout = "200ms"\n\n'
                       f'[host."http://{mi.host}"]\n  capabilities = ["pull"]\n')
    with caplog.at_level(logging.WARNING, logger="erofs_mount.oci"):
        source = open_reference(f"{up.host}/team/dead:1", {"insecure": "", "hosts-dir": str(hosts)})
        try:
            assert read_all(source) == data
        finally:
            source.close()
    failed = [r.message for r in caplog.records if dead in r.message]
    assert len(failed) == 1 and "skipped for 10 s" in failed[0], failed
    assert blobs(up) == [] and blobs(mi)


def test_a_tag_with_no_host_that_may_resolve_it_is_one_clear_line(upstream: Registry, tmp_path: Path) -> None:
    hosts = hosts_toml(tmp_path / "certs.d", upstream.host, f'[host."http://{upstream.host}"]\n'
                       '  capabilities = ["pull"]\n')
    (tmp_path / "certs.d" / upstream.host / "hosts.toml").write_text(
        f'server = "http://{upstream.host}"\ncapabilities = ["pull"]\n')
    with pytest.raises(SourceError, match="no host for .* in hosts.toml may resolve a tag"):
        open_reference(f"{upstream.host}/team/app:1", {"insecure": "", "hosts-dir": str(hosts)})


def _tar_gz_layer(size: int) -> tuple[bytes, str]:
    """A gzip tar layer of a few files of random bytes, and its diff_id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        rng = random.Random(7)
        for n in range(4):
            data = rng.randbytes(size // 4)
            info = tarfile.TarInfo(f"data/file{n}")
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    stream = raw.getvalue()
    return gzip.compress(stream, mtime=0), "sha256:" + hashlib.sha256(stream).hexdigest()


def test_a_lying_peer_serves_no_wrong_byte_and_is_skipped_with_the_reason(
        upstream: Registry, peer: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    blob, diff_id = _tar_gz_layer(6 << 20)
    for registry in (upstream, peer):
        registry.push_image("team/tar", "1", [(blob, TAR_GZIP)], diff_ids=[diff_id])
    up, pe = FaultProxy(upstream.host), FaultProxy(peer.host)
    try:
        hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                           f'[host."http://{pe.host}"]\n  capabilities = ["pull"]\n')
        options = {"insecure": "", "hosts-dir": str(hosts), "readahead-kib": "0", "disk-cache-mib": "0"}
        source = open_reference(f"{up.host}/team/tar:1", options)
        expected = source.pread(source.size, 0)  # indexed from the peer's honest bytes, checked
        state = source.state()
        source.close()
        assert blobs(up) == []
        for lies_from in ("none", "reading", "opening"):  # each reattach is a new client: the peer is trusted anew
            if lies_from == "opening":
                pe.inject("blob", *["corrupt"] * 1000)  # every blob answer of the peer lies, from the start
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="erofs_mount.oci"):
                source = Retrying(reopen(state))
                try:
                    if lies_from == "reading":  # honest while the layer's stream opened (at its first read)
                        assert source.pread(4096, 0) == expected[:4096]
                        pe.inject("blob", *["corrupt"] * 1000)
                    for offset in range(0, source.size, 1 << 20):  # every read right: the retry went upstream
                        n = min(1 << 20, source.size - offset)
                        assert source.pread(n, offset) == expected[offset:offset + n]
                finally:
                    source.close()
            pe.faults.clear()
            said = [r.message for r in caplog.records if pe.host in r.message]
            if lies_from == "none":
                continue
            assert len(said) == 1, f"skipped after its first lie, not asked again: {said}"
            # a flipped bit mid-stream: a span that does not match, or a checkpoint that no longer decodes
            why = ["does not open at its checkpoints"]
            if lies_from == "reading":
                why.append("is not the bytes measured")
            assert any(w in said[0] for w in why) and "not asked again" in said[0], said
        assert blobs(up), "the reads went to the registry"
    finally:
        up.stop()
        pe.stop()


def test_a_peer_that_lies_at_mount_is_skipped_and_the_mount_is_made_from_the_registry(
        upstream: Registry, peer: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Its layer, whole, its config or a manifest named by digest are other bytes: caught by their digests,
    the peer is skipped, and the same mount is made from the registry, with no error."""
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    up, pe = FaultProxy(upstream.host), FaultProxy(peer.host)
    try:
        hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                           f'[host."http://{pe.host}"]\n  capabilities = ["pull"]\n')
        for n, lies_about in enumerate(("the layer", "the config", "the manifest")):
            blob, diff_id = _tar_gz_layer((2 + n) << 20)  # a layer of its own: no index of it is cached
            for registry in (upstream, peer):
                digest = registry.push_image(f"team/lies{n}", "1", [(blob, TAR_GZIP)], diff_ids=[diff_id])
            layer = "sha256:" + hashlib.sha256(blob).hexdigest()
            kind = {"the layer": layer, "the config": "blob", "the manifest": "manifest"}[lies_about]
            pe.inject(kind, *["corrupt"] * 1000)
            caplog.clear()
            name = f"team/lies{n}@{digest}" if lies_about == "the manifest" else f"team/lies{n}:1"
            with caplog.at_level(logging.WARNING, logger="erofs_mount.oci"):
                source = open_reference(f"{up.host}/{name}", {"insecure": "", "hosts-dir": str(hosts)})
            try:
                assert source.state()["manifest_digest"] == digest and source.size > blob.__len__()
            finally:
                source.close()
            pe.faults.clear()
            said = [r.message for r in caplog.records if pe.host in r.message]
            assert len(said) == 1 and "not asked again" in said[0], (lies_about, said)
            if lies_about == "the layer":
                assert "served bytes whose digest is" in said[0]
                assert any("indexing again from the next host" in r.message for r in caplog.records)
            elif lies_about == "the config":
                assert "bytes of another digest" in said[0]
            else:
                assert "sent a manifest with digest" in said[0]
            assert any(layer in p for p in blobs(up)), f"{lies_about}: the layer came from the registry"
    finally:
        up.stop()
        pe.stop()


def test_a_download_a_peer_breaks_off_goes_on_from_the_registry(
        upstream: Registry, peer: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    blob, diff_id = _tar_gz_layer(5 << 20)
    for registry in (upstream, peer):
        registry.push_image("team/cut", "1", [(blob, TAR_GZIP)], diff_ids=[diff_id])
    layer = "sha256:" + hashlib.sha256(blob).hexdigest()
    up, pe = FaultProxy(upstream.host), FaultProxy(peer.host)
    try:
        hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                           f'[host."http://{pe.host}"]\n  capabilities = ["pull"]\n')
        pe.inject(layer, "reset")  # half the layer, then a reset
        with caplog.at_level(logging.WARNING, logger="erofs_mount.oci"):
            open_reference(f"{up.host}/team/cut:1", {"insecure": "", "hosts-dir": str(hosts)}).close()
        said = [r.message for r in caplog.records if pe.host in r.message]
        assert len(said) == 1 and "skipped for 10 s" in said[0], said
        assert [f for _m, p, f in pe.log if layer in p] == ["reset"], "the peer was asked for the layer once"
        assert [m for m, p, _f in up.log if layer in p and m == "GET"], "the download went on from the registry"
    finally:
        up.stop()
        pe.stop()


def test_an_erofs_layer_under_verify_full_through_a_lying_peer_is_measured_and_read_from_the_registry(
        layer: tuple[bytes, dict[str, str]], upstream: Registry, peer: Registry, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    data, _sums = layer
    for registry in (upstream, peer):
        registry.push_image("team/full", "1", [(data, EROFS_LAYER)])
    up, pe = FaultProxy(upstream.host), FaultProxy(peer.host)
    try:
        hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                           f'[host."http://{pe.host}"]\n  capabilities = ["pull"]\n')
        options = {"insecure": "", "hosts-dir": str(hosts), "verify": "full", "disk-cache-mib": "0"}
        for lies_at in ("mount", "read"):  # the whole pass at mount, or a range read later
            if lies_at == "mount":
                pe.inject("sha256:" + hashlib.sha256(data).hexdigest(), *["corrupt"] * 1000)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="erofs_mount.oci"):
                source = Retrying(open_reference(f"{up.host}/team/full:1", options))
                try:
                    if lies_at == "read":
                        pe.inject("blob", *["corrupt"] * 1000)
                    assert read_all(source) == data
                finally:
                    source.close()
            pe.faults.clear()
            said = [r.message for r in caplog.records if pe.host in r.message]
            assert len(said) == 1 and "not asked again" in said[0], (lies_at, said)
    finally:
        up.stop()
        pe.stop()


class _ChallengingCache:
    """A pull-through cache that answers everything 401 with a token realm of its own, and records every
    Authorization header it gets, at the realm too."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen = self.authorization = []  # type: list[str | None]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                seen.append(self.headers.get("Authorization"))
                self.send_response(401)
                realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
                self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="cache"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_that_is_not_the_registry_never_gets_its_credentials_and_its_401_names_it(
        layer: tuple[bytes, dict[str, str]], secured: Registry, tmp_path: Path, env_creds: None) -> None:
    """containerd binds credentials to their host: a 401 from the cache (with a realm of its own) is the
    cache's, not the registry's, and nothing of the registry's password goes to it or to its realm."""
    data, _sums = layer
    secured.push_image("team/app", "2", [(data, EROFS_LAYER)])
    cache = _ChallengingCache()
    try:
        hosts = hosts_toml(tmp_path / "certs.d", secured.host, f'server = "http://{cache.host}"\n')
        with pytest.raises(SourceError) as refused:
            open_reference(f"{secured.host}/team/app:2", {"insecure": "", "credentials": "env",
                                                          "hosts-dir": str(hosts)})
        assert cache.authorization and not any(cache.authorization), cache.authorization
        assert cache.host in str(refused.value) and "401" in str(refused.value), refused.value
        assert secured.host not in str(refused.value).replace(f"{secured.host}/team", "")
    finally:
        cache.stop()


def test_the_registry_s_cookies_stay_with_the_registry_and_a_mirror_s_are_not_kept(
        layer: tuple[bytes, dict[str, str]], upstream: Registry, peer: Registry, tmp_path: Path) -> None:
    data, _sums = layer
    upstream.push_image("team/cookies", "1", [(data, EROFS_LAYER)])
    peer.push_image("team/cookies", "1", [(data, EROFS_LAYER)])
    up, pe = FaultProxy(upstream.host), FaultProxy(peer.host)
    up.set_cookie, pe.set_cookie = "session=registry-secret; Path=/", "peer=tracking; Path=/"
    try:
        hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                           f'[host."http://{pe.host}"]\n  capabilities = ["pull"]\n')
        source = open_reference(f"{up.host}/team/cookies:1", {"insecure": "", "hosts-dir": str(hosts),
                                                              "readahead-kib": "0"})
        try:
            assert read_all(source) == data
        finally:
            source.close()
        assert blobs(pe), "the peer served nothing"
        assert not any(pe.cookies), f"the peer got cookies: {pe.cookies}"
        assert not any("peer=" in (c or "") for c in up.cookies), "the peer's cookie was kept as the registry's"
    finally:
        up.stop()
        pe.stop()


def test_a_peer_that_lied_is_not_asked_again_however_long_the_index_pass_takes(
        upstream: Registry, peer: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lie found at the end of a download used to skip the peer for SKIP_FIRST seconds only: a layer
    indexed for longer than that was asked of the same peer again, and the registry never. A skip that
    has run out at once stands for that long pass."""
    from erofs_mount_oci import download, routing

    monkeypatch.setattr(routing, "SKIP_FIRST", 0.0)
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    up, pe = FaultProxy(upstream.host), FaultProxy(peer.host)
    try:
        hosts = hosts_toml(tmp_path / "certs.d", up.host, f'server = "http://{up.host}"\n\n'
                           f'[host."http://{pe.host}"]\n  capabilities = ["pull"]\n')
        blob, diff_id = _tar_gz_layer(3 << 20)
        for registry in (upstream, peer):
            registry.push_image("team/long", "1", [(blob, TAR_GZIP)], diff_ids=[diff_id])
        layer = "sha256:" + hashlib.sha256(blob).hexdigest()
        pe.inject(layer, *["corrupt"] * 1000)
        source = open_reference(f"{up.host}/team/long:1", {"insecure": "", "hosts-dir": str(hosts)})
        source.close()
        assert sum(layer in p for p in blobs(pe)) == 1, "the lying peer was asked again"
        assert any(layer in p for p in blobs(up))
        # and a download known to be other bytes is read no further by its index pass
        pe.inject(layer, "corrupt")
        client = httpx.Client(timeout=30)
        lied = download.Download(client, f"http://{pe.host}/v2/team/long/blobs/{layer}", layer, len(blob), "lied")
        try:
            with pytest.raises(SourceError, match="digest"):
                lied.sha256()
            with pytest.raises(SourceError, match="digest"):
                lied.pread(512, 0)  # the bytes are there, and known bad
        finally:
            lied.close()
            client.close()
    finally:
        up.stop()
        pe.stop()
