"""``snapshotter pull`` on what a registry sends: each part checked before containerd hears of it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.oci.registry import Registry

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.stop()


def pull(reference: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EROFS_MOUNT, "snapshotter", "pull", reference, "-o", "insecure", *args,
                           "--containerd-address", "/nonexistent/containerd.sock"],
                          capture_output=True, text=True, timeout=120)


def test_a_config_that_is_not_an_image_s_is_one_line_before_containerd_is_asked(
        registry: Registry) -> None:
    registry.push_image("bad/config", "t", [(b"not a layer", GZIP)])  # a config without rootfs.diff_ids
    result = pull(f"{registry.host}/bad/config:t")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "has no rootfs.diff_ids" in result.stderr and "containerd" not in result.stderr, result.stderr
    with_hub = subprocess.run([EROFS_MOUNT, "snapshotter", "pull", "docker.io/library/debian:12", "-o", "insecure"],
                              capture_output=True, text=True, timeout=120)
    assert "insecure (plain HTTP) is refused for Docker Hub" in with_hub.stderr, with_hub.stderr


def test_containerd_that_does_not_answer_is_one_line(registry: Registry) -> None:
    import gzip

    registry.push_image("good/app", "t", [(gzip.compress(b"\0" * 1024), GZIP)], diff_ids=["sha256:" + "1" * 64])
    result = pull(f"{registry.host}/good/app:t")
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        "Error: snapshotter pull: containerd does not answer at /nonexistent/containerd.sock"], result.stderr
