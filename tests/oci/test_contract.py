"""The oci plugin keeps the source contract (erofs_mount_core.testing)."""

from __future__ import annotations

import pytest

from erofs_mount_core.testing import SourceCase, check_source
from tests.oci.conftest import USERS
from tests.oci.registry import EROFS_LAYER, Registry


def test_oci_source_contract(basic_registry: Registry, layer: tuple[bytes, dict[str, str]],
                             plain_creds: dict[str, str]) -> None:
    data = layer[0]
    basic_registry.push_image("contract/app", "v1", [(data, EROFS_LAYER)])
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    check_source(SourceCase(
        scheme="oci", location=f"{basic_registry.host}/contract/app:v1", expected=data,
        options={"insecure": "", **plain_creds}, secrets=[USERS["alice"]],
        change=lambda: basic_registry.delete_blob("contract/app", digest),
        missing_location=f"{basic_registry.host}/contract/nothing:v1",
    ))


@pytest.mark.parametrize("bad", ["UPPER", "x:bad tag"])
def test_bad_references_are_clear_errors(bad: str, registry: Registry) -> None:
    check_source(SourceCase(scheme="oci", location="unused", expected=b"", options={"insecure": ""},
                            missing_location=f"{registry.host}/{bad}"), checks=["errors"])
