"""The oci plugin's warm-up: what its first use in a process costs, paid once by a process that forks commands."""

from __future__ import annotations

import subprocess
import sys

WARMED = """
import sys
from erofs_mount_core import _forkserver
_forkserver._preload()
import httpx
from erofs_mount_oci import _http
def no_new_context(*args, **kwargs):
    raise AssertionError("a CA bundle loaded again")
httpx.create_ssl_context = no_new_context
_http.make_client(insecure=False, ca_bundle=None, auth=None).close()
_http.make_client(insecure=True, ca_bundle=None, auth=None).close()
print(" ".join(m for m in ("httpcore", "h11", "cattrs", "cryptography.hazmat.primitives.serialization")
               if m in sys.modules))
"""


def test_a_forked_command_imports_no_http_library_and_loads_no_ca_bundle_again() -> None:
    """httpx imports its transport's libraries when the first client is made, the verifying context loads
    certifi's bundle (a second on an emulated machine), signatures need cryptography's key loading: the
    fork server's warm-up (``erofs_mount_warm_up``) does each once, and every client after uses them."""
    done = subprocess.run([sys.executable, "-c", WARMED], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["httpcore", "h11", "cattrs", "cryptography.hazmat.primitives.serialization"]
