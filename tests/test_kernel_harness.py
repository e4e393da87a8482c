"""The kernel tests cannot be lost quietly: no VM means failures, skipping must be asked for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONE_KERNEL_TEST = "tests/vm/test_harness.py::test_modprobe_nbd_gives_devices"


def run_pytest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A pytest session of its own, its guests' logs and reports apart from this session's (whose guests may
    be running meanwhile)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("EROFS_MOUNT_SKIP_KERNEL_TESTS", "VMTEST_GUEST")}
    logs = tempfile.mkdtemp(prefix="guest-logs-")
    try:
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=ROOT,
                              env={**environ, "EROFS_MOUNT_GUEST_LOG_DIR": logs, **env}, capture_output=True,
                              text=True, timeout=120)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def test_without_a_vm_the_kernel_tests_fail() -> None:
    result = run_pytest(ONE_KERNEL_TEST, EROFS_MOUNT_VM_RUN="/bin/false")
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout
    assert "the test VM ran no tests" in result.stdout


def test_skipping_them_is_explicit() -> None:
    result = run_pytest(ONE_KERNEL_TEST, "--skip-kernel", EROFS_MOUNT_VM_RUN="/bin/false")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
    result = run_pytest(ONE_KERNEL_TEST, "-rs", EROFS_MOUNT_VM_RUN="/bin/false", EROFS_MOUNT_SKIP_KERNEL_TESTS="1")
    assert "kernel tests skipped on request" in result.stdout


def test_driver_sensitive_tests_also_run_on_the_newer_kernel() -> None:
    result = run_pytest("tests/vm/test_local_mount.py", "--collect-only")
    names = [line.strip() for line in result.stdout.splitlines() if "::" in line]
    assert "tests/vm/test_local_mount.py::test_reattach_on_a_healthy_device_changes_nothing" in names
    assert "tests/vm/test_local_mount.py::test_reattach_on_a_healthy_device_changes_nothing@6.12" in names
    assert "tests/vm/test_local_mount.py::test_no_nbd_driver@6.12" not in names


FAKE_VM = str(ROOT / "tests" / "data" / "fake-vm-run")
TWO_KERNEL_TESTS = ("tests/vm/test_harness.py::test_modprobe_nbd_gives_devices",
                    "tests/vm/test_local_mount.py::test_reattach_on_a_healthy_device_changes_nothing")


def test_a_guest_that_fails_to_boot_is_booted_once_more(tmp_path: Path) -> None:
    result = run_pytest(ONE_KERNEL_TEST, EROFS_MOUNT_VM_RUN=FAKE_VM, FAKE_VM="fail-boot-once",
                        FAKE_VM_COUNT=str(tmp_path / "boots"))
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout
    assert (tmp_path / "boots").read_text() == "2"
    assert "its first boot failed and it was booted again" in result.stdout


def test_a_session_cut_short_fails_only_the_tests_it_had_not_run(tmp_path: Path) -> None:
    result = run_pytest(*TWO_KERNEL_TESTS, "-k", "not 6.12", EROFS_MOUNT_VM_RUN=FAKE_VM, FAKE_VM="cut-after-one",
                        FAKE_VM_COUNT=str(tmp_path / "boots"), EROFS_MOUNT_GUEST_TIMEOUT="4")
    assert "1 passed" in result.stdout and "1 failed" in result.stdout, result.stdout
    assert "stopped at its timeout, 4 s" in result.stdout, result.stdout
    assert (tmp_path / "boots").read_text() == "1", "a guest that ran tests is not booted again"
