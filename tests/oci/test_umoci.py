"""Images flattened by umoci, the reference: an image of crafted layers, pushed by skopeo, equals ``umoci unpack``.

The layers hold what real writers emit and a merge can get wrong: a
directory replaced by a file with whiteouts beneath it (umoci writes this
when a directory became a file), times before 1970, deep paths.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.imagetree import assert_same_tree
from tests.oci.registry import Registry
from tests.oci.test_tar_images import Mounts, materialize
from tests.oci.test_tar_images import mounts as mounts  # noqa: F401 - the fixture

D, F, S = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
BEFORE_1970 = -315619200  # 1960-01-01
DEEP = "/".join(["d"] * 300)


def _layer(entries: list[tuple[str, bytes, bytes | str, float]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, mtime in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mtime = kind, mtime
            info.mode = 0o755 if kind == D else 0o644
            if kind == S:
                info.linkname = str(data)
            else:
                info.size = len(data)  # type: ignore[arg-type]
            tar.addfile(info, io.BytesIO(data if isinstance(data, bytes) else b""))
    return out.getvalue()


def layers() -> list[bytes]:
    one = _layer([("usr", D, b"", 1), ("usr/share", D, b"", 1), ("usr/share/man", D, b"", 1),
                  ("usr/share/man/cs", D, b"", 1), ("usr/share/man/cs/a.1", F, b"cs\n", 1),
                  ("usr/share/man/de", D, b"", 1), ("usr/share/man/de/b.1", F, b"de\n", 1),
                  ("etc", D, b"", 1), ("etc/old", F, b"from 1960\n", BEFORE_1970),
                  ("etc/older", F, b"half a second before 1970\n", -0.5),
                  *[(DEEP[:i], D, b"", 1) for i in range(1, len(DEEP) + 1, 2)], (DEEP + "/leaf", F, b"deep\n", 1)])
    two = _layer([("usr", D, b"", 2), ("usr/share", D, b"", 2),
                  ("usr/share/man", F, b"a directory, now a file\n", 2),
                  ("usr/share/man/.wh.cs", F, b"", 2), ("usr/share/man/.wh.de", F, b"", 2),  # as umoci writes it
                  ("etc", D, b"", BEFORE_1970), ("etc/link", S, "old", BEFORE_1970)])
    return [one, two]


def oci_layout(root: Path, streams: list[bytes]) -> Path:
    """An OCI image layout (image-spec's image-layout.md) of ``streams`` as gzip layers, tagged ``t``."""
    (root / "blobs" / "sha256").mkdir(parents=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(s).hexdigest()}" for s in streams]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **blob(json.dumps(config).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            **blob(gzip.compress(s, mtime=0))} for s in streams]}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": manifest["mediaType"], **blob(json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": "t"}}]}))
    return root


def test_the_merged_image_equals_umoci_s_unpack(registry: Registry, tmp_path: Path, mounts: Mounts) -> None:
    layout = oci_layout(tmp_path / "layout", layers())
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(tmp_path / "bundle")], check=True,
                   capture_output=True)
    reference = f"{registry.host}/umoci/app:t"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:t", f"docker://{reference}"],
                   check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount("-t", "erofs", "-o", "ro,loop", str(materialize(reference, tmp_path / "image.erofs")), str(mnt))
    expected = tmp_path / "bundle" / "rootfs"
    assert assert_same_tree(expected, mnt) >= 10
    assert (mnt / "usr/share/man").read_bytes() == b"a directory, now a file\n"
    assert os.stat(mnt / "usr/share").st_nlink == os.stat(expected / "usr/share").st_nlink == 2
    assert os.lstat(mnt / "etc/old").st_mtime == BEFORE_1970
    assert os.lstat(mnt / "etc/older").st_mtime_ns == -500_000_000
    assert os.lstat(mnt / "etc").st_mtime == BEFORE_1970


@pytest.mark.parametrize("index", [0, 1])
def test_each_layer_alone_keeps_its_entries_and_times(registry: Registry, tmp_path: Path, mounts: Mounts,
                                                      index: int) -> None:
    layout = oci_layout(tmp_path / "layout", layers())
    reference = f"{registry.host}/umoci/layers:t"
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:t", f"docker://{reference}"],
                   check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    image = materialize(reference, tmp_path / "layer.erofs", f"layer={index}")
    mounts.mount("-t", "erofs", "-o", "ro,loop", str(image), str(mnt))
    if index == 0:
        assert os.lstat(mnt / "etc/old").st_mtime == BEFORE_1970
        assert (mnt / DEEP / "leaf").read_bytes() == b"deep\n"
    else:  # the file, and no directory of whiteouts where it stands
        assert (mnt / "usr/share/man").read_bytes() == b"a directory, now a file\n"
        assert sorted(os.listdir(mnt / "usr/share")) == ["man"]
        assert os.lstat(mnt / "etc").st_mtime == BEFORE_1970
