"""The test VM itself: a real nbd driver, independent of erofs-mount's own code.

nbdkit serves an image, nbd-client attaches it, the kernel mounts it: if
this fails, the harness is broken, not erofs-mount.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.imagetree import file_sha256
from tests.vm.conftest import cli

pytestmark = pytest.mark.kernel


def test_modprobe_nbd_gives_devices(nbd_driver: None) -> None:
    assert Path("/dev/nbd0").is_block_device()
    assert os.uname().release != "", "running under the guest kernel"


@pytest.mark.kernel(newer=True)
def test_nbd_generic_netlink_family_resolves(nbd_driver: None) -> None:
    from pyroute2.netlink import genlmsg
    from pyroute2.netlink.generic import GenericNetlinkSocket

    sock = GenericNetlinkSocket()
    try:
        sock.bind("nbd", genlmsg)
        assert sock.prid > 0
    finally:
        sock.close()


def test_nbdkit_and_nbd_client_mount_erofs(nbd_driver: None, sample: tuple[Path, dict[str, str]],
                                           tmp_path: Path) -> None:
    image, sums = sample
    sock, mnt, dev = tmp_path / "nbd.sock", tmp_path / "mnt", "/dev/nbd15"
    mnt.mkdir()
    nbdkit = subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--unix", str(sock), "file", str(image)])
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        subprocess.run(["nbd-client", "-unix", str(sock), dev], check=True, capture_output=True)
        try:
            subprocess.run(["mount", "-t", "erofs", "-o", "ro", dev, str(mnt)], check=True)
            try:
                for rel, digest in sums.items():
                    assert file_sha256(mnt / rel) == digest, rel
                for target in (dev, str(mnt)):  # another tool's device, by name or by its mountpoint
                    result = cli("reattach", target, check=False)
                    assert result.code != 0 and "None" not in result.err, result
                    assert result.err.strip().splitlines() == [
                        f"Error: nbd15 was not attached by erofs-mount ({_backend_words(dev)})"], result
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            subprocess.run(["nbd-client", "-d", dev], check=True, capture_output=True)
    finally:
        nbdkit.terminate()
        nbdkit.wait(10)


def _backend_words(dev: str) -> str:
    backend = Path(f"/sys/block/{dev[5:]}/backend")
    text = backend.read_text().strip() if backend.exists() else ""
    return f"its backend is {text!r}" if text else "it has no backend identifier"
