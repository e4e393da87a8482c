"""The distributions install on their own and find each other through entry points."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = tmp_path_factory.mktemp("venv") / "v"
    venv.create(env, with_pip=True)
    return env


def pip(env: Path, *args: str) -> None:
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", *args], check=True, capture_output=True)


def plugins_json(env: Path) -> dict[str, object]:
    out = subprocess.run([str(env / "bin" / "erofs-mount"), "plugins", "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["result"]


def test_core_and_local_plugin_install_separately(fresh_venv: Path) -> None:
    pip(fresh_venv, str(ROOT))
    assert plugins_json(fresh_venv)["plugins"] == []
    pip(fresh_venv, str(ROOT / "plugins" / "local"))
    (local,) = plugins_json(fresh_venv)["plugins"]
    assert local == {"name": "local", "distribution": "erofs-mount-local", "version": "0.1.0",
                     "schemes": {"local": "EROFS image in a local file: local:PATH"},
                     "status": "ok", "error": None, "options": {"local": []}, "wrapping": []}


def test_a_broken_plugin_is_listed_with_its_error_and_local_still_works(fresh_venv: Path) -> None:
    pip(fresh_venv, str(ROOT / "tests" / "data" / "broken-plugin"))
    found = {p["name"]: p for p in plugins_json(fresh_venv)["plugins"]}
    assert found["local"]["status"] == "ok"
    assert found["broken"]["status"] == "failed"
    assert found["broken"]["distribution"] == "erofs-mount-broken"
    assert "erofs_mount_no_such_dependency" in found["broken"]["error"]
    text = subprocess.run([str(fresh_venv / "bin" / "erofs-mount"), "plugins"],
                          check=True, capture_output=True, text=True).stdout
    assert "broken" in text and "failed" in text and "local" in text


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["mount", "--help"], ["cache", "list"]])
def test_cli_start_does_not_import_heavy_modules(argv: list[str]) -> None:
    code = ("import sys\n"
            "from erofs_mount_core._cli import cli\n"
            f"try: cli({argv!r}, prog_name='erofs-mount')\n"
            "except SystemExit: pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pyroute2', 'httpx', 'rapidgzip', 'zstandard', 'tarfile')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_core_and_s3_alone(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A third-party source needs no core change: core + erofs-mount-s3 only."""
    env = tmp_path_factory.mktemp("venv-s3") / "v"
    venv.create(env, with_pip=True)
    pip(env, str(ROOT), str(ROOT / "plugins" / "s3"))
    (s3,) = plugins_json(env)["plugins"]
    assert (s3["name"], s3["distribution"], s3["status"]) == ("s3", "erofs-mount-s3", "ok")


def test_no_core_module_names_a_source_type() -> None:
    import re

    for path in (ROOT / "erofs_mount_core").rglob("*.py"):
        text = path.read_text()
        found = re.search(r"\b(oci|s3)\b|erofs_mount_(local|oci|s3)\b", text)
        assert found is None, f"{path.relative_to(ROOT)} names {found.group(0)!r}"
