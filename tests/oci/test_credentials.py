"""Where credentials come from: docker config (auths, identitytoken, helpers), env, TLS trust.

The credential helper is a small script speaking docker's helper protocol
(``docker-credential-NAME get``, server on stdin, JSON on stdout), as the
real ones (pass, secretservice, ecr-login) do.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from erofs_mount_oci import open_reference
from erofs_mount_oci.credentials import CredentialSource

from erofs_mount_core import SourceError
from tests.oci.conftest import USERS, read_all
from tests.oci.registry import EROFS_LAYER, Registry, TokenServer

HELPER = """#!/bin/sh
read server
echo "$server" >> "{log}"
case "$server" in
  {host}) printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}' "$server" ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_registry: Registry) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    script = bindir / "docker-credential-testhelper"
    script.write_text(HELPER.format(log=log, host=token_registry.host, user="alice", secret=USERS["alice"]))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{subprocess.os.environ['PATH']}")
    return log


@pytest.mark.parametrize("config_key", ["credHelpers", "credsStore"])
def test_credential_helpers(config_key: str, helper: Path, token_registry: Registry,
                            layer: tuple[bytes, dict[str, str]], tmp_docker_config: Path) -> None:
    token_registry.push_image("helped/app", "v1", [(layer[0], EROFS_LAYER)])
    config = ({"credHelpers": {token_registry.host: "testhelper"}} if config_key == "credHelpers"
              else {"credsStore": "testhelper"})
    tmp_docker_config.write_text(json.dumps(config))
    source = open_reference(f"{token_registry.host}/helped/app:v1", {"insecure": ""})
    try:
        assert read_all(source) == layer[0]
        assert USERS["alice"] not in json.dumps(source.state())  # type: ignore[attr-defined]
    finally:
        source.close()
    assert helper.read_text().split() == [token_registry.host]


def test_identity_token_is_exchanged_with_a_refresh_grant(token_registry: Registry, token_server: TokenServer,
                                                          layer: tuple[bytes, dict[str, str]],
                                                          tmp_docker_config: Path) -> None:
    token_registry.push_image("oauth/app", "v1", [(layer[0], EROFS_LAYER)])
    tmp_docker_config.write_text(json.dumps(
        {"auths": {token_registry.host: {"auth": "", "identitytoken": token_server.refresh_token}}}))
    token_server.issued.clear()
    source = open_reference(f"{token_registry.host}/oauth/app:v1", {"insecure": ""})
    try:
        assert read_all(source) == layer[0]
    finally:
        source.close()
    assert token_server.issued and token_server.issued[0].startswith("refresh:repository:oauth/app:pull")


def test_env_credentials_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EROFS_MOUNT_OCI_PASSWORD", raising=False)
    with pytest.raises(SourceError, match="not both set"):
        CredentialSource.parse("env", "r.io").lookup("r.io")
    monkeypatch.setenv("MY_U", "u")
    monkeypatch.setenv("MY_P", "p")
    creds = CredentialSource.parse("env:MY_U:MY_P", "r.io").lookup("r.io")
    assert (creds.username, creds.password) == ("u", "p")


def test_auto_is_anonymous_without_a_docker_entry(tmp_docker_config: Path) -> None:
    assert CredentialSource.parse(None, "r.io").kind == "anonymous"
    tmp_docker_config.write_text(json.dumps({"auths": {"r.io": {"auth": base64.b64encode(b"a:b").decode()}}}))
    assert CredentialSource.parse(None, "r.io").to_record() == {"kind": "docker-config",
                                                                "path": str(tmp_docker_config)}


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)
    r = Registry(d / "registry", tls=(d / "cert.pem", d / "key.pem"))
    yield r
    r.stop()


def test_tls_with_a_custom_ca_bundle(tls_registry: Registry, layer: tuple[bytes, dict[str, str]]) -> None:
    tls_registry.push_image("secure/app", "v1", [(layer[0], EROFS_LAYER)])
    ca = str(Path(tls_registry.tls_cert))  # type: ignore[attr-defined]
    source = open_reference(f"{tls_registry.host}/secure/app:v1", {"ca": ca})
    try:
        assert read_all(source) == layer[0]
    finally:
        source.close()
    with pytest.raises(SourceError, match="TLS certificate is not trusted"):
        open_reference(f"{tls_registry.host}/secure/app:v1", {})


@pytest.mark.parametrize("name", ["../../tmp/evil", "/usr/bin/id", "x y", "-rf", ""])
def test_a_helper_name_that_is_a_path_is_refused(name: str, helper: Path, token_registry: Registry,
                                                 tmp_docker_config: Path) -> None:
    tmp_docker_config.write_text(json.dumps({"credHelpers": {token_registry.host: name}}))
    with pytest.raises(SourceError, match="is not a plain name|no credentials"):
        open_reference(f"{token_registry.host}/helped/app:v1", {"insecure": "",
                                                                "credentials": f"docker-config:{tmp_docker_config}"})
    assert not helper.exists(), "no helper ran"


@pytest.mark.parametrize("make_unsafe", ["owned by a user", "writable by others"])
def test_root_takes_no_helper_from_a_config_a_user_can_change(make_unsafe: str, helper: Path, token_registry: Registry,
                                                              tmp_docker_config: Path) -> None:
    tmp_docker_config.write_text(json.dumps({"credHelpers": {token_registry.host: "testhelper"}}))
    if make_unsafe == "owned by a user":
        subprocess.os.chown(tmp_docker_config, 65534, 65534)
    else:
        tmp_docker_config.chmod(0o666)
    with pytest.raises(SourceError, match="only root can change"):
        open_reference(f"{token_registry.host}/helped/app:v1", {"insecure": "",
                                                                "credentials": f"docker-config:{tmp_docker_config}"})
    assert not helper.exists(), "no helper ran"
