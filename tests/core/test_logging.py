"""The daemon's log: our lines only (libraries from WARNING), no query strings, bounded in size."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from erofs_mount_core import _logging


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("erofs_mount").level)
    path = tmp_path / "nbd-x.log"
    with open(path, "a") as stream:
        _logging.configure(stream, "%(name)s %(levelname)s %(message)s", limit=4096)
        yield path
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("erofs_mount").setLevel(saved[2])


def test_a_library_s_per_request_lines_stay_out(log_file: Path) -> None:
    logging.getLogger("httpx").info('HTTP Request: GET https://registry/v2/app/blobs/sha256:ab "HTTP/1.1 206"')
    logging.getLogger("httpx").warning("connection pool is full")
    logging.getLogger("erofs_mount.daemon").info("serving nbd0")
    logging.getLogger("erofs_mount.oci").debug("a debug line")
    text = log_file.read_text()
    assert "HTTP Request" not in text and "a debug line" not in text
    assert "connection pool is full" in text and "serving nbd0" in text


def test_query_strings_are_cut_from_every_line(log_file: Path) -> None:
    signed = ("https://bucket.s3.example/blob?X-Amz-Signature=deadbeef&X-Amz-Security-Token=SESSION"
              "&X-Amz-Credential=AKID")
    logging.getLogger("erofs_mount.oci").warning("redirected to %s; retrying", signed)
    try:
        raise ValueError(f"failed at {signed}")
    except ValueError:
        logging.getLogger("erofs_mount.daemon").exception("daemon failed")
    text = log_file.read_text()
    assert "https://bucket.s3.example/blob?…" in text
    for secret in ("deadbeef", "SESSION", "AKID"):
        assert secret not in text


def test_the_log_stays_bounded(log_file: Path) -> None:
    for n in range(2000):
        logging.getLogger("erofs_mount.retry").warning("read %d failed; retrying", n)
    assert log_file.stat().st_size < 4096 + 200
    text = log_file.read_text()
    assert "(log truncated: it passed 4096 bytes)" in text and "read 1999 failed" in text
