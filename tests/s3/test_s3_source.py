"""erofs-mount-s3, a plugin written only against the public API, against moto's S3 server."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
from erofs_mount_s3 import _parse
from erofs_mount_s3.credentials import CredentialSource
from erofs_mount_s3.object import S3Object
from erofs_mount_s3.sigv4 import sign

from erofs_mount_core import BlockCache, SourceChangedError, SourceError, UsageError
from erofs_mount_core._plugins import PluginHost
from erofs_mount_core.testing import SourceCase, check_source
from tests.s3.conftest import ACCESS_KEY, SECRET_KEY, S3Server


def test_sigv4_matches_the_aws_documented_example() -> None:
    headers = sign("GET", "https://examplebucket.s3.amazonaws.com/test.txt", {"Range": "bytes=0-9"},
                   access_key="AKIAIOSFODNN7EXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                   region="us-east-1", now=datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc))
    assert headers["Authorization"].endswith(
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


@pytest.mark.parametrize("url, token", [
    ("https://bucket.s3.eu-west-1.amazonaws.com/dir/a%20b%2Bc~d.erofs", None),
    ("http://127.0.0.1:9000/bucket/%C3%BCn%C3%AF/key.erofs?versionId=3%2FL4kqtJl40Nr8X8gdRQBpUMLUo", "tok/en=="),
])
def test_sigv4_agrees_with_botocore(url: str, token: str | None) -> None:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    now = datetime.datetime(2026, 11, 28, 12, 0, 0, tzinfo=datetime.timezone.utc)
    ours = sign("GET", url, {"Range": "bytes=0-4095"}, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                region="eu-west-1", session_token=token, now=now)
    import botocore.auth

    class Frozen(datetime.datetime):
        @classmethod
        def utcnow(cls) -> datetime.datetime:  # type: ignore[override]
            return now.replace(tzinfo=None)

        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> datetime.datetime:  # type: ignore[override]
            return now if tz else now.replace(tzinfo=None)

    request = AWSRequest(method="GET", url=url, headers={"Range": "bytes=0-4095"})
    request.headers["X-Amz-Content-SHA256"] = ours["x-amz-content-sha256"]
    auth = S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, token), "s3", "eu-west-1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(botocore.auth.datetime, "datetime", Frozen)
        auth.add_auth(request)
    theirs = request.headers["Authorization"]
    assert ours["Authorization"].split("Signature=")[1] == theirs.split("Signature=")[1]


def test_addressing_styles() -> None:
    aws = _parse("bucket/a/b.erofs", {"region": "eu-west-1"})
    assert (aws["endpoint"], aws["addressing"]) == ("https://s3.eu-west-1.amazonaws.com", "virtual")
    local = _parse("//bucket/a/b.erofs", {"endpoint": "http://127.0.0.1:9000/"})
    assert (local["endpoint"], local["addressing"]) == ("http://127.0.0.1:9000", "path")
    with pytest.raises(UsageError, match="BUCKET/KEY"):
        _parse("bucket-only", {})
    from erofs_mount_core._plugins import PluginHost

    with pytest.raises(UsageError, match=r"s3: unknown option\(s\) password \(known: addressing, "):
        PluginHost().open_source("s3", "b/k", {"password": "x"})  # the host owns the names the plugin declared


def put(s3: S3Server, bucket: str, key: str, data: bytes, versioned: bool = False) -> None:
    existing = [b["Name"] for b in s3.client.list_buckets().get("Buckets", [])]
    if bucket not in existing:
        s3.client.create_bucket(Bucket=bucket)
        if versioned:
            s3.client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.client.put_object(Bucket=bucket, Key=key, Body=data)


def test_contract_with_env_credentials(s3: S3Server, aws_env: dict[str, str]) -> None:
    data = os.urandom(3 << 20)
    put(s3, "images", "dir/app image.erofs", data)
    check_source(SourceCase(
        scheme="s3", location="images/dir/app image.erofs", expected=data,
        options={"endpoint": s3.endpoint}, secrets=[SECRET_KEY],
        change=lambda: put(s3, "images", "dir/app image.erofs", os.urandom(3 << 20)),
        missing_location="images/missing.erofs"))


def test_shared_credentials_file_and_record(s3: S3Server, aws_env: dict[str, str], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(f"[ci]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    data = os.urandom(1 << 20)
    put(s3, "profiles", "a.erofs", data)
    host = PluginHost()
    source = host.open_source("s3", "profiles/a.erofs", {"endpoint": s3.endpoint, "credentials": "profile:ci"})
    assert isinstance(source, BlockCache), "s3 reads go through the core's block cache"
    state = host.source_state("s3", source)
    source.close()
    assert (state["cache_mib"], state["block_kib"], state["readahead_kib"]) == (256, 256, 4096)
    assert state["credentials"] == {"kind": "profile", "path": str(creds), "profile": "ci"}
    assert SECRET_KEY not in repr(state) and state["etag"]
    again = host.deserialize_source("s3", state)
    assert again.pread(4096, 4096) == data[4096:8192]
    again.close()
    assert CredentialSource.parse(None).kind == "anonymous"  # no env, no default profile


def test_versioned_object_pins_its_version(s3: S3Server, aws_env: dict[str, str]) -> None:
    first, second = os.urandom(1 << 20), os.urandom(1 << 20)
    put(s3, "versioned", "app.erofs", first, versioned=True)
    host = PluginHost()
    source = host.open_source("s3", "versioned/app.erofs", {"endpoint": s3.endpoint})
    state = host.source_state("s3", source)
    source.close()
    assert state["version"]
    put(s3, "versioned", "app.erofs", second)          # a new version; the recorded one still exists
    again = host.deserialize_source("s3", state)
    try:
        assert again.pread(1 << 20, 0) == first
    finally:
        again.close()


def test_wrong_keys_are_a_clear_error(s3: S3Server, aws_env: dict[str, str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    put(s3, "images", "x.erofs", b"x" * 4096)
    source = S3Object("images", "x.erofs", region="us-east-1", endpoint=s3.endpoint, addressing="path",
                      credentials=CredentialSource("env"))
    source.close()
    with pytest.raises((SourceError, SourceChangedError)):
        S3Object("images", "nope.erofs", region="us-east-1", endpoint=s3.endpoint, addressing="path",
                 credentials=CredentialSource("env"))


class _Misbehaving:
    """An HTTP server in S3's place that ignores Range (``mode="whole"``) or answers 206 with endless bytes."""

    def __init__(self, mode: str, data: bytes) -> None:
        import http.server
        import threading

        self.gets = 0
        self.sent: list[int] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", '"e1"')
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                outer.gets += 1
                self.send_response(200 if mode == "whole" else 206)
                if mode == "whole":
                    self.send_header("Content-Length", str(len(data)))
                    body, extra = data, 0
                else:
                    self.send_header("Content-Range", f"bytes 0-4095/{len(data)}")
                    self.send_header("Connection", "close")
                    body, extra = data[:4096], 256 << 20
                self.end_headers()
                sent = 0
                try:
                    self.wfile.write(body)
                    while sent < extra:
                        self.wfile.write(bytes(1 << 20))
                        sent += 1 << 20
                except (BrokenPipeError, ConnectionResetError):
                    pass
                outer.sent.append(sent)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode, message", [("whole", "ignores Range requests"),
                                           ("endless", "the answer is more than the 4096 bytes expected")])
def test_a_server_that_sends_too_much_is_cut_off(mode: str, message: str) -> None:
    server = _Misbehaving(mode, os.urandom(1 << 20))
    try:
        source = S3Object("images", "x.erofs", region="us-east-1", endpoint=server.endpoint, addressing="path",
                          credentials=CredentialSource("anonymous"))
        try:
            with pytest.raises(SourceError, match=message):
                source.pread(4096, 0)
        finally:
            source.close()
        assert server.gets == 1
        assert all(sent < 64 << 20 for sent in server.sent), f"read far past the answer: {server.sent}"
    finally:
        server.stop()
