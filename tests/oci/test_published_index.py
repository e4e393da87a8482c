"""Indexes published to the registry: pushed by one host, found by another through the referrers, trusted by key.

The registry is Debian's docker-registry 2.8, which has no Referrers API:
discovery goes through the referrers tag schema there, and through the API
when the proxy in front answers it as a distribution-spec 1.1 registry does.
Keys are made by openssl, as a user would make them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from erofs_mount_core import SourceError, UsageError
from tests.oci.faultproxy import FaultProxy
from tests.oci.registry import Registry
from tests.oci.test_tar_images import image as image  # noqa: F401 - the fixtures: an image of four tar layers
from tests.oci.test_tar_images import layers as layers  # noqa: F401
from tests.oci.test_tar_images import whole_gets
from tests.test_serve import Server

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    for name in ("trusted", "other"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(base / f"{name}.pem")], check=True)
        subprocess.run(["openssl", "pkey", "-in", str(base / f"{name}.pem"), "-pubout", "-out",
                        str(base / f"{name}.pub")], check=True)
    return {"private": base / "trusted.pem", "public": base / "trusted.pub", "other": base / "other.pem"}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "publisher-cache"))
    return tmp_path


def push_cli(reference: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EROFS_MOUNT, "index", "push", f"oci:{reference}", "-o", "insecure", *args],
                          capture_output=True, text=True, timeout=300)


def layer_digests(registry: Registry, reference: str) -> list[str]:
    repo, _, tag = reference.removeprefix(registry.host + "/").partition(":")
    doc = httpx.get(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    return [d["digest"].removeprefix("sha256:") for d in doc["layers"]]


def registry_blobs(registry: Registry, reference: str, artifact: str) -> list[bytes]:
    """The blobs of the artifact ``artifact`` of ``reference``'s repository, as the registry holds them."""
    repo = reference.removeprefix(registry.host + "/").partition(":")[0]
    doc = httpx.get(f"http://{registry.host}/v2/{repo}/manifests/{artifact}",
                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    return [httpx.get(f"http://{registry.host}/v2/{repo}/blobs/{d['digest']}").content for d in doc["layers"]]


def fresh_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / name))


def test_a_signed_index_pushed_by_one_host_mounts_on_another_without_downloading_a_layer(
        registry: Registry, image: str, keys: dict[str, Path], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from erofs_mount_oci import open_reference

    pushed = push_cli(image, "--sign", str(keys["private"]))
    assert pushed.returncode == 0, pushed.stderr
    artifact = pushed.stdout.strip()
    assert artifact.startswith("sha256:") and "signed" in pushed.stderr
    expected_source = open_reference(image, {"insecure": ""})
    expected = expected_source.pread(expected_source.size, 0)
    expected_source.close()

    for api in (False, True):  # the referrers tag schema (docker-registry 2.8), then the Referrers API
        fresh_host(monkeypatch, cache, f"host-{api}")
        proxy = FaultProxy(registry.host)
        proxy.referrers_api = api
        try:
            source = open_reference(image.replace(registry.host, proxy.host),
                                    {"insecure": "", "index-key": str(keys["public"])})
            try:
                state = source.state()
                assert source.pread(source.size, 0) == expected
            finally:
                source.close()
            layers = layer_digests(registry, image)
            assert not set(whole_gets(proxy)) & set(layers), "a layer was downloaded"
            tag = [path for method, path, _ in proxy.log if "/manifests/sha256-" in path]
            assert bool(tag) != api, "the tag schema is read when, and only when, the API is not there"
            assert state["published_index"] == artifact
            blobs = {hashlib.sha256(body).hexdigest() for body in registry_blobs(registry, image, artifact)}
            kept = {hashlib.sha256(path.read_bytes()).hexdigest()
                    for path in (cache / f"host-{api}").glob("tar-index/*") if not path.name.startswith("known-")}
            assert kept and kept <= blobs, "the cache keeps each index as the signed artifact holds it"
        finally:
            proxy.stop()

    from erofs_mount_oci import reopen  # a reattach on a host whose cache lost the indexes: the pinned artifact

    fresh_host(monkeypatch, cache, "host-reattach")
    again = reopen({**state, "registry": registry.host})  # (the proxy is gone)
    try:
        assert again.pread(again.size, 0) == expected
    finally:
        again.close()


def test_index_off_required_and_keys(registry: Registry, image: str, keys: dict[str, Path], cache: Path,
                                     monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from erofs_mount_oci import open_reference

    unsigned = push_cli(image)  # no --sign: other hosts do not use it
    assert unsigned.returncode == 0, unsigned.stderr
    layers = layer_digests(registry, image)

    fresh_host(monkeypatch, cache, "off")
    proxy = FaultProxy(registry.host)
    try:
        via = image.replace(registry.host, proxy.host)
        open_reference(via, {"insecure": "", "index": "off", "index-key": str(keys["public"])}).close()
        assert not [p for _, p, _ in proxy.log if "referrers" in p or "sha256-" in p], "index=off looked"
        assert set(layers) <= set(whole_gets(proxy)), "index=off indexes the layers here"
    finally:
        proxy.stop()

    fresh_host(monkeypatch, cache, "required-without-key")
    with pytest.raises(SourceError, match="no published index signed by a key given with index-key .*no index-key"):
        open_reference(image, {"insecure": "", "index": "required"})
    with pytest.raises(UsageError, match="index='sometimes': use auto, off or required"):
        open_reference(image, {"insecure": "", "index": "sometimes"})
    with pytest.raises(UsageError, match="not a PEM public key"):
        open_reference(image, {"insecure": "", "index-key": str(keys["private"].with_name("missing.pub"))})

    fresh_host(monkeypatch, cache, "other-key")  # signed, but by a key this host was not given
    other = push_cli(image, "--sign", str(keys["other"]))
    assert other.returncode == 0, other.stderr
    with caplog.at_level("WARNING", logger="erofs_mount.oci"):
        source = open_reference(image, {"insecure": "", "index-key": str(keys["public"])})
    assert "published_index" not in source.state() or source.state()["published_index"] != other.stdout.strip()
    source.close()


def test_a_forged_index_changes_no_byte_a_reader_gets(registry: Registry, image: str, keys: dict[str, Path],
                                                     cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Signed by the trusted key (as by a publisher whose indexer was fooled): span hashes that are not the
    layer's fail the first read of them; a tree changed and signed by a key not trusted is never used."""
    from erofs_mount_oci import open_reference
    from erofs_mount_oci.layers import indexed
    from erofs_mount_oci.published import load_signing_key, push
    from erofs_mount_oci.registry import Registry as Api

    source = open_reference(image, {"insecure": ""})
    expected = source.pread(source.size, 0)
    source.close()
    from erofs_mount_oci.credentials import CredentialSource
    from erofs_mount_oci.options import client_for
    from erofs_mount_oci.platform import Platform
    from erofs_mount_oci.reference import parse

    ref = parse(image)
    client = client_for(ref, insecure=True, ca=None, credentials=CredentialSource("anonymous"), hosts_dir="")
    try:
        api = Api(client, ref, insecure=True)
        manifest, digest, chosen = api.image_manifest(Platform.host())
        layers = api.tar_layers(manifest, digest, chosen)
        diff_ids = api.diff_ids(manifest)
        found = indexed(api, layers, diff_ids).indexes
        size = int(httpx.head(f"http://{registry.host}/v2/{ref.repository}/manifests/{digest}",
                              headers={"Accept": manifest["mediaType"]}).headers["Content-Length"])
        subject = {"mediaType": manifest["mediaType"], "digest": digest, "size": size}
        flipped = bytearray(found[0].spans.hashes)
        flipped[0] ^= 1
        forged_data = [attrs.evolve(found[0], spans=attrs.evolve(found[0].spans, hashes=bytes(flipped))), *found[1:]]
        tree = json.loads(found[0].tree)
        for row in tree:
            if row[0] & 0o170000 == 0o100000:
                row[0] |= 0o4000  # a setuid bit on every file
        forged_tree = [attrs.evolve(found[0], tree=json.dumps(tree).encode(), fresh=[]), *found[1:]]
        forged, _ = push(api, subject, layers, diff_ids, forged_data, load_signing_key(str(keys["private"])))
        push(api, subject, layers, diff_ids, forged_tree, load_signing_key(str(keys["other"])))
    finally:
        client.close()

    fresh_host(monkeypatch, cache, "forged")
    source = open_reference(image, {"insecure": "", "index-key": str(keys["public"])})
    try:
        assert source.state()["published_index"] == forged, "the newest signed by the trusted key is the one used"
        errors = []
        for offset in range(0, source.size, 1 << 20):
            n = min(1 << 20, source.size - offset)
            try:
                assert source.pread(n, offset) == expected[offset:offset + n], "a wrong byte reached a reader"
            except SourceError as exc:
                errors.append(str(exc))
        assert any("is not the bytes measured when it was first read" in e for e in errors), errors
    finally:
        source.close()


def test_publish_index_at_mount_lets_the_next_host_skip_the_download(
        registry: Registry, layers: list[tuple[bytes, str]], keys: dict[str, Path], cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from erofs_mount_oci import open_reference

    from tests.oci.test_tar_images import diff_id

    registry.push_image("images/at-mount", "v1", layers, diff_ids=[diff_id(b) for b, _ in layers])
    reference = f"{registry.host}/images/at-mount:v1"
    fresh_host(monkeypatch, cache, "first")
    first = open_reference(reference, {"insecure": "", "publish-index": str(keys["private"])})
    expected = first.pread(first.size, 0)
    assert "publish_index" not in str(first.state()), "a one-time action: not for the record"
    first.close()
    fresh_host(monkeypatch, cache, "second")
    proxy = FaultProxy(registry.host)
    try:
        source = open_reference(reference.replace(registry.host, proxy.host),
                                {"insecure": "", "index-key": str(keys["public"])})
        try:
            assert source.state().get("published_index") and source.pread(source.size, 0) == expected
        finally:
            source.close()
        assert not set(whole_gets(proxy)) & set(layer_digests(registry, reference)), "a layer was downloaded"
    finally:
        proxy.stop()
    with pytest.raises(UsageError, match="publish-index is for the whole image"):
        open_reference(reference, {"insecure": "", "layer": "0", "publish-index": ""})


def test_a_layer_mount_uses_the_published_index_whose_signature_covers_the_whole_image(
        registry: Registry, image: str, keys: dict[str, Path], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-o layer=N (a containerd snapshotter's mount): the signature covers every layer of the artifact, so the
    host checks it over the whole image, then takes its layer's index; a reattach whose cache lost it fetches
    the manifest by its digest to check the pinned artifact again. The layer's own image (its EROFS
    metadata) comes in the signed index: the host neither parses the tree nor makes the metadata."""
    from erofs_mount_oci import open_reference, reopen
    from erofs_mount_tar import packed_tree

    from erofs_mount_core import ImageLayout

    pushed = push_cli(image, "--sign", str(keys["private"]))
    assert pushed.returncode == 0, pushed.stderr
    expected_source = open_reference(image, {"insecure": "", "layer": "1"})
    expected = expected_source.pread(expected_source.size, 0)
    expected_source.close()
    layers = layer_digests(registry, image)
    fresh_host(monkeypatch, cache, "layer-host")
    monkeypatch.setattr(ImageLayout, "of", classmethod(lambda cls, tree: pytest.fail("the metadata made here")))
    monkeypatch.setattr(packed_tree, "load", lambda *args: pytest.fail("the tree parsed here"))
    proxy = FaultProxy(registry.host)
    try:
        source = open_reference(image.replace(registry.host, proxy.host),
                                {"insecure": "", "layer": "1", "index-key": str(keys["public"])})
        try:
            state = source.state()
            assert source.pread(source.size, 0) == expected
        finally:
            source.close()
        assert not set(whole_gets(proxy)) & set(layers), "a layer was downloaded"
        assert state["kind"] == "tar-layer" and state["published_index"] == pushed.stdout.strip()
    finally:
        proxy.stop()
    fresh_host(monkeypatch, cache, "layer-reattach")
    again = reopen({**state, "registry": registry.host})  # (the proxy is gone)
    try:
        assert again.pread(again.size, 0) == expected
    finally:
        again.close()


def test_trusted_keys_per_registry_in_a_directory(registry: Registry, image: str, keys: dict[str, Path],
                                                  cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-o index-keys-dir (by default /etc/erofs-mount/index-keys): each registry's keys in a directory named as
    in containerd's hosts directory, so a fleet's hosts trust a publisher without -o index-key on every mount;
    as root, a key anyone else can write is refused, since it decides whose tree root serves."""
    import os
    import shutil

    from erofs_mount_oci import open_reference, reopen

    pushed = push_cli(image, "--sign", str(keys["private"]))
    assert pushed.returncode == 0, pushed.stderr
    trusted = cache / "index-keys"
    for name in (registry.host, "_default"):
        (trusted / name).mkdir(parents=True)
    shutil.copy(keys["public"], trusted / registry.host / "publisher.pub")
    layers = layer_digests(registry, image)
    fresh_host(monkeypatch, cache, "keys-dir")
    proxy = FaultProxy(registry.host)
    try:
        via = image.replace(registry.host, proxy.host)
        (trusted / proxy.host).symlink_to(trusted / registry.host)  # (the proxy stands for the registry)
        source = open_reference(via, {"insecure": "", "index-keys-dir": str(trusted)})
        state = source.state()
        source.close()
        assert not set(whole_gets(proxy)) & set(layers), "a layer was downloaded"
        assert state["published_index"] == pushed.stdout.strip() and state["index_keys_dir"] == str(trusted)
    finally:
        proxy.stop()
    fresh_host(monkeypatch, cache, "keys-dir-reattach")
    shutil.copy(keys["public"], trusted / "_default" / "any.pub")
    shutil.rmtree(trusted / registry.host)  # a registry without a directory of its own: _default's keys
    again = reopen({**state, "registry": registry.host})  # the pinned artifact, checked by the _default key
    again.close()

    os.chmod(trusted / "_default" / "any.pub", 0o666)
    fresh_host(monkeypatch, cache, "keys-dir-writable")
    result = subprocess.run([EROFS_MOUNT, "serve", "--source", f"oci:{image}", "-o",
                             f"insecure,index-keys-dir={trusted}", "--run", "true"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "any.pub must belong to root and be writable by no one else" in result.stderr


def wait_for(predicate: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)


def test_an_unsigned_index_is_used_under_verify_background_and_proven_beside_serving(
        registry: Registry, image: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify=background: an index no trusted key signed mounts at once (no layer downloaded before the mount
    returns); the serving side streams each layer once, indexes it and compares; proven, it is this host's own
    (kept in the cache), and the reads were right all along."""
    from erofs_mount_oci import open_reference
    from erofs_mount_tar import load_index

    expected_source = open_reference(image, {"insecure": ""})
    expected = expected_source.pread(expected_source.size, 0)
    expected_source.close()
    pushed = push_cli(image)  # no --sign
    assert pushed.returncode == 0, pushed.stderr
    layers = layer_digests(registry, image)
    fresh_host(monkeypatch, cache, "background")
    proxy = FaultProxy(registry.host)
    try:
        source = open_reference(image.replace(registry.host, proxy.host),
                                {"insecure": "", "verify": "background", "verify-rate-mib": "1000"})
        try:
            state = source.state()
            assert state["published_index"] == pushed.stdout.strip() and state["verify"] == "background"
            assert not set(whole_gets(proxy)) & set(layers), "a layer was downloaded before the mount returned"
            assert not any(load_index(digest) for digest in layers), "an unproven index was kept as this host's"
            source.start_background()
            assert source.pread(source.size, 0) == expected
            wait_for(lambda: source.counters().get("background_proven_layers") == len(layers), "the pass")
            assert source.refusal() is None and source.pread(source.size, 0) == expected
        finally:
            source.close()
        assert sorted(whole_gets(proxy)).count(layers[0]) == 1, "each layer streamed once"
        assert all(load_index(digest) for digest in layers), "a proven index is kept as this host's own"
    finally:
        proxy.stop()


def test_an_index_forged_in_its_tree_alone_is_refused_by_the_background_pass(
        registry: Registry, layers: list[tuple[bytes, str]], keys: dict[str, Path], cache: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its span hashes are the layer's, so no read fails on them; its tree gives every file a setuid bit. Not
    signed by a trusted key, it is used under verify=background only, and the pass finds it: every read fails
    from then on, one line names the layer and the artifact, stats count it, a reattach that pins it is
    refused and no later mount uses it. An NBD client of ``erofs-mount serve`` sees the same."""
    from erofs_mount_oci import open_reference, reopen

    from tests.oci.test_tar_images import diff_id

    registry.push_image("images/forged", "v1", layers, diff_ids=[diff_id(b) for b, _ in layers])
    reference = f"{registry.host}/images/forged:v1"
    forged, first_layer = push_forged_tree(reference)

    fresh_host(monkeypatch, cache, "forged-tree")
    with pytest.raises(SourceError, match="no published index signed by a key"):  # not without the pass
        open_reference(reference, {"insecure": "", "index": "required", "index-key": str(keys["public"])})
    source = open_reference(reference, {"insecure": "", "verify": "background", "verify-rate-mib": "1000"})
    try:
        state = source.state()
        assert state["published_index"] == forged
        source.pread(source.size, 0)  # its span hashes are the layer's: only the pass finds it out
        source.start_background()
        wait_for(lambda: source.refusal() is not None, "the refusal")
        line = source.refusal()
        assert first_layer in line and forged in line and "the tree" in line, line
        with pytest.raises(SourceError, match="refused: a background pass found what the image was made from false"):
            source.pread(4096, 0)
        assert source.counters()["background_refused_layers"] == 1
    finally:
        source.close()
    with pytest.raises(SourceError, match="found false by a background pass"):
        reopen({**state, "registry": registry.host})
    again = open_reference(reference, {"insecure": "", "verify": "background"})
    try:
        assert again.state().get("published_index") != forged, "a refused artifact was used again"
    finally:
        again.close()

    fresh_host(monkeypatch, cache, "forged-tree-serve")  # a host that never refused it: the daemon finds it out
    sock = cache / "nbd.sock"
    server = Server(f"oci:{reference}", sock, "-o", "insecure,verify=background,verify-rate-mib=1000")
    try:
        wait_for(lambda: (cache / "forged-tree-serve" / "oci-refused" / forged.replace(":", "-")).exists(),
                 "the daemon's refusal")
        late = subprocess.run(["nbdcopy", server.uri, str(cache / "late.img")], capture_output=True, text=True)
        assert late.returncode != 0 and "Input/output error" in late.stderr, late.stderr
    finally:
        said = server.stop()
    assert sum(1 for line in said.splitlines() if "differ from the layer's own" in line) == 1, said


def test_an_unsigned_index_s_layer_image_never_reaches_the_kernel(
        registry: Registry, image: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A published index carries each layer's own image (EROFS metadata, which the kernel parses). Under
    verify=background an index no trusted key signed is used at once, so its metadata would reach the kernel
    before any proof: it is dropped, and the layer's metadata made here from the (checked) tree. Here that
    metadata is forged (every file setuid) beside a true tree: the layer mounts as it truly is."""
    from erofs_mount_oci import open_reference

    expected_source = open_reference(image, {"insecure": "", "layer": "0"})
    expected = expected_source.pread(expected_source.size, 0)
    expected_source.close()
    forged, _ = push_forged_tree(image, layout_only=True)
    fresh_host(monkeypatch, cache, "forged-layout")
    source = open_reference(image, {"insecure": "", "layer": "0", "verify": "background"})
    try:
        assert source.state()["published_index"] == forged
        assert source.pread(source.size, 0) == expected
    finally:
        source.close()


def push_forged_tree(reference: str, *, layout_only: bool = False) -> tuple[str, str]:
    """An unsigned artifact for the image ``reference`` whose first layer's index is the true one but for its
    tree, which gives every file a setuid bit (its span hashes are the layer's: no read fails on them);
    ``layout_only``: the tree true, the layer's own image (its metadata) made from the forged one; (its
    digest, that layer's digest)."""
    from erofs_mount_oci.credentials import CredentialSource
    from erofs_mount_oci.layers import indexed
    from erofs_mount_oci.options import client_for
    from erofs_mount_oci.platform import Platform
    from erofs_mount_oci.published import push
    from erofs_mount_oci.reference import parse
    from erofs_mount_oci.registry import Registry as Api

    ref = parse(reference)
    client = client_for(ref, insecure=True, ca=None, credentials=CredentialSource("anonymous"), hosts_dir="")
    try:
        api = Api(client, ref, insecure=True)
        manifest, digest, chosen = api.image_manifest(Platform.host())
        layers, diff_ids = api.tar_layers(manifest, digest, chosen), api.diff_ids(manifest)
        found = indexed(api, layers, diff_ids).indexes
        tree = json.loads(found[0].tree)
        for row in tree:
            if row[0] & 0o170000 == 0o100000:
                row[0] |= 0o4000
        forged_tree = [attrs.evolve(found[0], tree=json.dumps(tree).encode(), fresh=[]), *found[1:]]
        if layout_only:
            forged_tree[0] = attrs.evolve(found[0], layout=forged_tree[0].image_layout())
        subject = {"mediaType": manifest["mediaType"], "digest": digest, "size": api.manifest_size(digest)}
        forged, _ = push(api, subject, layers, diff_ids, forged_tree, None)
    finally:
        client.close()
    return forged, layers[0].digest
