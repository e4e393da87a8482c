"""Errors a retry cannot fix fail at once, naming the host and what to do; the transient ones are retried."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from erofs_mount_oci import open_reference

from erofs_mount_core import SourceError
from tests.oci.registry import Registry

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))


def opened_at_once(reference: str, options: dict[str, str], caplog: pytest.LogCaptureFixture) -> str:
    """The one error opening ``reference`` gives, made with no retry."""
    with caplog.at_level(logging.DEBUG, logger="erofs_mount.retry"), pytest.raises(SourceError) as failed:
        open_reference(reference, options)
    assert "attempt 2 of" not in caplog.text, "retried: " + caplog.text
    return str(failed.value)


def test_a_name_that_does_not_resolve_fails_at_once_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    error = opened_at_once("registry.nonexistent.invalid/team/app:1", {"credentials": "anonymous"}, caplog)
    assert "registry.nonexistent.invalid cannot be resolved" in error and "check its name" in error


def test_tls_spoken_to_a_plain_http_registry_fails_at_once_with_the_hint(
        registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    error = opened_at_once(f"{registry.host}/team/app:1", {"credentials": "anonymous"}, caplog)
    assert f"{registry.host} does not answer in TLS" in error and "-o insecure" in error
    assert "SSL" not in error, "no raw SSL library text"


def test_not_found_names_the_host(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    error = opened_at_once(f"{registry.host}/team/missing:9.9", {"insecure": "", "credentials": "anonymous"},
                           caplog)
    assert error.endswith(f"not found at {registry.host} (404)"), error


def test_the_command_says_it_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([EROFS_MOUNT, "serve", "--source", "oci:registry.nonexistent.invalid/team/app:1",
                             "-o", "credentials=anonymous", "--run", "true"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert "registry.nonexistent.invalid cannot be resolved" in line and "Traceback" not in result.stderr


@pytest.mark.parametrize(("value", "seconds"), [
    ("soon", None), ("", None), ("Mon, 99 Foo 2024 25:61:61 GMT", None), ("-5", None), ("1.5", None),
    ("7", 7.0), ("99999999999999999999", 86400.0), ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
])
def test_a_retry_after_of_any_form_is_a_bounded_delay_or_none(value: str, seconds: float | None) -> None:
    import httpx
    from erofs_mount_oci._http import _retry_after

    assert _retry_after(httpx.Response(503, headers={"Retry-After": value})) == seconds


@pytest.mark.parametrize("source", ["oci:127.0.0.1:1/team/app:1", "s3:bucket/app.erofs"])
def test_a_host_that_refuses_or_does_not_resolve_is_one_line(source: str) -> None:
    """Connection refused is retried quietly within the bound, then said once; a name that does not resolve
    is said at once."""
    options = ["-o", "insecure"] if source.startswith("oci:") else ["-o", "endpoint=http://s3.nonexistent.invalid"]
    result = subprocess.run([EROFS_MOUNT, "serve", "--source", source, *options, "--run", "true"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 4 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    if source.startswith("s3:"):
        assert "s3.nonexistent.invalid cannot be resolved" in result.stderr, result.stderr
    else:
        assert "after 6 attempts" in result.stderr, result.stderr
