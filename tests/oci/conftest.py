"""Fixtures: EROFS layers and real registries on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.imagetree import make_tree, mkfs
from tests.oci.registry import Registry, TokenServer

USERS = {"alice": "s3cret pass:word"}


@pytest.fixture(scope="session")
def layer(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, str]]:
    """An EROFS image as a layer blob, and its files' sha256."""
    base = tmp_path_factory.mktemp("layer")
    sums = make_tree(base / "tree", files=30, max_size=1 << 20)
    return mkfs(base / "layer.erofs", base / "tree").read_bytes(), sums


@pytest.fixture(scope="session")
def other_layer(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    base = tmp_path_factory.mktemp("other")
    make_tree(base / "tree", files=5, seed=42, max_size=100000)
    return mkfs(base / "other.erofs", base / "tree").read_bytes()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("basic"), auth="htpasswd", users=USERS)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    t = TokenServer(users=USERS, lifetime=300)
    yield t
    t.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("token"), auth="token", users=USERS, token_server=token_server)
    yield r
    r.stop()


@pytest.fixture
def plain_creds(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("EROFS_MOUNT_OCI_USERNAME", "alice")
    monkeypatch.setenv("EROFS_MOUNT_OCI_PASSWORD", USERS["alice"])
    return {"credentials": "env"}


def read_all(source: object, chunk: int = 128 << 10) -> bytes:
    size = source.size  # type: ignore[attr-defined]
    return b"".join(source.pread(min(chunk, size - off), off)  # type: ignore[attr-defined]
                    for off in range(0, size, chunk))


@pytest.fixture
def tmp_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "docker"
    path.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(path))
    return path / "config.json"
