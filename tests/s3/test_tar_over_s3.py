"""tar:s3:BUCKET/KEY: an archive that is another source's bytes, indexed once, its record nesting the inner one."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from erofs_mount_core import SourceChangedError, UsageError
from erofs_mount_core._plugins import PluginHost
from erofs_mount_core.testing import SourceCase, check_source
from tests.s3.conftest import SECRET_KEY, S3Server
from tests.s3.test_s3_source import put
from tests.tar.test_tar_source import compress, make_tree, materialize, tarfile_archive

EROFS_MOUNT = str(Path(sys.executable).with_name("erofs-mount"))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EROFS_MOUNT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PAX archive of the tar tests' tree, plain, gzip and zstd in frames."""
    base = tmp_path_factory.mktemp("tar-over-s3")
    make_tree(base / "tree")
    return {how: compress(tarfile_archive(base / "tree", base / f"a-{how}.tar", tarfile.PAX_FORMAT), how)
            for how in ("plain", "gzip", "zstd-frames")}


@pytest.mark.parametrize("how", ["plain", "gzip", "zstd-frames"])
def test_tar_over_s3_serves_the_image_of_the_same_archive_as_a_file(how: str, archives: dict[str, Path],
                                                                   s3: S3Server, aws_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    put(s3, "archives", f"rootfs-{how}.tar", archives[how].read_bytes())
    expected = materialize(archives[how], tmp_path / "local.erofs").read_bytes()
    out = tmp_path / "s3.erofs"
    result = subprocess.run([EROFS_MOUNT, "serve", "-q", "--source", f"tar:s3:archives/rootfs-{how}.tar",
                             "-o", f"endpoint={s3.endpoint},cache-mib=32", "--run", f'nbdcopy "$uri" {out}'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == expected


def test_tar_over_s3_keeps_the_contract(archives: dict[str, Path], s3: S3Server, aws_env: dict[str, str],
                                        tmp_path: Path) -> None:
    put(s3, "archives", "contract.tar.gz", archives["gzip"].read_bytes())
    expected = materialize(archives["gzip"], tmp_path / "expected.erofs").read_bytes()
    check_source(SourceCase(
        scheme="tar", location="s3:archives/contract.tar.gz", expected=expected,
        options={"endpoint": s3.endpoint}, secrets=[SECRET_KEY],
        change=lambda: put(s3, "archives", "contract.tar.gz", archives["plain"].read_bytes()),
        missing_location="s3:archives/missing.tar.gz"))


def test_the_record_nests_the_inner_source_and_a_second_mount_reads_no_archive(
        archives: dict[str, Path], s3: S3Server, aws_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    put(s3, "archives", "nested.tar.zst", archives["zstd-frames"].read_bytes())
    host = PluginHost()
    options = {"endpoint": s3.endpoint, "cache-mib": "32"}
    source = host.open_source("tar", "s3:archives/nested.tar.zst", options)
    head = source.pread(4096, 0)
    state = host.source_state("tar", source)
    source.close()
    assert state["inner"]["scheme"] == "s3" and state["inner"]["state"]["key"] == "nested.tar.zst"
    assert state["cache_mib"] == 32 and state["inner"]["state"]["cache_mib"] == 256  # tar's option, not s3's
    assert SECRET_KEY not in repr(state)

    from erofs_mount_tar import index

    monkeypatch.setattr(index, "build", lambda *a, **k: pytest.fail("the archive was indexed again"))
    again = host.open_source("tar", "s3:archives/nested.tar.zst", options)  # known by the inner record
    assert again.pread(4096, 0) == head
    again.close()
    reattached = host.deserialize_source("tar", state)
    assert reattached.pread(4096, 0) == head
    reattached.close()

    put(s3, "archives", "nested.tar.zst", archives["plain"].read_bytes())  # other bytes under the same key
    with pytest.raises(SourceChangedError, match="archives/nested.tar.zst"):
        host.deserialize_source("tar", state)


def test_options_go_to_whoever_declares_them(s3: S3Server, aws_env: dict[str, str]) -> None:
    with pytest.raises(UsageError, match=r"^s3: unknown option\(s\) colour \(known: addressing, "):
        PluginHost().open_source("tar", "s3:archives/x.tar", {"endpoint": s3.endpoint, "colour": "red"})
    with pytest.raises(UsageError, match=r"^tar: unknown option\(s\) endpoint "):
        PluginHost().open_source("tar", "/srv/x.tar", {"endpoint": s3.endpoint})  # a bare path is a file


def test_a_local_archive_named_as_a_source_is_the_same_image(archives: dict[str, Path], tmp_path: Path) -> None:
    expected = materialize(archives["gzip"], tmp_path / "bare.erofs").read_bytes()
    host = PluginHost()
    source = host.open_source("tar", f"local:{archives['gzip']}", {})
    try:
        assert bytes(source.pread(len(expected), 0)) == expected
        assert host.source_state("tar", source)["inner"]["scheme"] == "local"
    finally:
        source.close()
    assert os.path.exists(archives["gzip"])
