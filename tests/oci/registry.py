"""A real registry (Debian's docker-registry 2.8) on loopback, a token server, and a pusher.

The registry binary comes from the unpacked .deb that scripts/setup leaves in
/var/cache/erofs-mount-test (its package would start a system service on
all interfaces); EROFS_MOUNT_REGISTRY_BIN points elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import secrets
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

REGISTRY_BIN = os.environ.get(
    "EROFS_MOUNT_REGISTRY_BIN", "/var/cache/erofs-mount-test/docker-registry/usr/bin/docker-registry")
EROFS_LAYER = "application/vnd.erofs.layer.v1+erofs"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TokenServer:
    """Issues Bearer tokens to clients with the right Basic credentials (or anyone, if open)."""

    def __init__(self, users: dict[str, str] | None = None, lifetime: int = 300) -> None:
        self.users, self.lifetime = users, lifetime
        self.issued: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if outer.users is not None:
                    auth = self.headers.get("Authorization", "")
                    user, _, password = base64.b64decode(auth[6:] or b"").decode().partition(":") \
                        if auth.startswith("Basic ") else ("", "", "")
                    if outer.users.get(user) != password or not user:
                        self.send_response(401)
                        self.end_headers()
                        return
                token = secrets.token_hex(16)
                outer.issued.append(self.path)
                body = json.dumps({"token": token, "expires_in": outer.lifetime}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - OAuth2 refresh-token grant (docker's identitytoken)
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [outer.refresh_token]:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.issued.append("refresh:" + ",".join(form.get("scope", [])))
                body = json.dumps({"access_token": secrets.token_hex(16), "expires_in": outer.lifetime}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.refresh_token = "refresh-" + secrets.token_hex(8)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Registry:
    """docker-registry on 127.0.0.1 with no auth, htpasswd Basic auth, or token auth."""

    def __init__(self, root: Path, *, auth: str = "none", users: dict[str, str] | None = None,
                 token_server: TokenServer | None = None, tls: tuple[Path, Path] | None = None,
                 mirror_of: Registry | None = None) -> None:
        """``mirror_of``: a pull-through cache of that registry (its ``proxy.remoteurl`` mode), which
        reaches it with its first user's credentials."""
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = users or {}
        root.mkdir(parents=True, exist_ok=True)
        config = [
            "version: 0.1",
            "log: {level: error}",
            f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}",
            "validation: {manifests: {urls: {allow: ['^https?://']}}}",  # foreign layers may be pushed
            f"http: {{addr: '{self.host}'}}" if tls is None else
            f"http: {{addr: '{self.host}', tls: {{certificate: {tls[0]}, key: {tls[1]}}}}}",
        ]
        if mirror_of is not None:
            remote = f"remoteurl: '{mirror_of.scheme}://{mirror_of.host}'"
            if mirror_of.users:
                user, password = next(iter(mirror_of.users.items()))
                remote += f", username: '{user}', password: '{password.replace(chr(39), chr(39) * 2)}'"
            config.append(f"proxy: {{{remote}}}")
        self.scheme = "http" if tls is None else "https"
        self.tls_cert = tls[0] if tls else None
        if auth == "htpasswd":
            htpasswd = root / "htpasswd"
            htpasswd.write_text("")
            for user, password in self.users.items():
                subprocess.run(["htpasswd", "-Bb", str(htpasswd), user, password], check=True, capture_output=True)
            config.append(f"auth: {{htpasswd: {{realm: test, path: {htpasswd}}}}}")
        elif auth == "token":
            assert token_server is not None
            config.append(f"auth: {{silly: {{realm: '{token_server.url}', service: test-registry}}}}")
        (root / "config.yml").write_text("\n".join(config) + "\n")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(root / "config.yml")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._admin = httpx.Client(base_url=f"{self.scheme}://{self.host}", timeout=30,
                                   auth=self._admin_auth(auth, token_server),
                                   verify=ssl.create_default_context(cafile=str(tls[0])) if tls else True)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._admin.get("/v2/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError("registry did not start: " + stderr) from None
                time.sleep(0.05)

    def _admin_auth(self, auth: str, token_server: TokenServer | None) -> Any:
        if auth == "htpasswd":
            user, password = next(iter(self.users.items()))
            return httpx.BasicAuth(user, password)
        if auth == "token":
            return _AnyBearer()
        return None

    def stop(self) -> None:
        self._admin.close()
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()

    # -- pushing ---------------------------------------------------------

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = self._admin.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        upload = httpx.URL(f"{self.scheme}://{self.host}").join(r.headers["Location"])
        url = upload.copy_merge_params({"digest": digest})
        r = self._admin.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        return digest

    def push_image(self, repo: str, tag: str, layers: list[tuple[bytes, str]], *,
                   diff_ids: list[str] | None = None, extra: list[dict[str, Any]] | None = None,
                   run: dict[str, Any] | None = None) -> str:
        """Push layers (data, media type) and a config (with ``diff_ids``, for tar layers, and ``run`` as its
        ``config``: Cmd, Env...); tag the manifest (its layers followed by the ``extra`` descriptors); return
        its digest."""
        doc: dict[str, Any] = {"architecture": "amd64", "os": "linux", **({"config": run} if run else {})}
        if diff_ids is not None:
            doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
        config = json.dumps(doc).encode()
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.push_blob(repo, config), "size": len(config)},
            "layers": [{"mediaType": mt, "digest": self.push_blob(repo, data), "size": len(data)}
                       for data, mt in layers] + (extra or []),
        }
        return self.put_manifest(repo, tag, manifest, OCI_MANIFEST)

    def put_manifest(self, repo: str, tag: str, doc: dict[str, Any], media_type: str) -> str:
        body = json.dumps(doc).encode()
        r = self._admin.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": media_type})
        assert r.status_code == 201, r.text
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def push_index(self, repo: str, tag: str, entries: list[tuple[str, dict[str, str]]]) -> str:
        manifests = []
        for digest, platform in entries:
            size = int(self._admin.head(f"/v2/{repo}/manifests/{digest}",
                                        headers={"Accept": OCI_MANIFEST}).headers["Content-Length"])
            manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": platform})
        return self.put_manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
                                 OCI_INDEX)

    def blob_file(self, digest: str) -> Path:
        """Where the registry keeps a blob on disk (to make it serve other bytes)."""
        hexdigest = digest.removeprefix("sha256:")
        return self.root / "data/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def delete_blob(self, repo: str, digest: str) -> None:
        r = self._admin.delete(f"/v2/{repo}/blobs/{digest}")
        assert r.status_code == 202, r.text


class _AnyBearer(httpx.Auth):
    """The silly auth backend accepts any Authorization header."""

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Authorization"] = "Bearer admin"
        yield request
