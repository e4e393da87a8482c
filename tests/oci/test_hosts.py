"""containerd's hosts directory, read as containerd reads it: the examples of its docs/hosts.md and the file
Spegel writes (pkg/oci/containerd/mirror.go, templateHosts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from erofs_mount_oci.hosts import Host, hosts_for

from erofs_mount_core import UsageError


def write(root: Path, namespace: str, text: str) -> Path:
    directory = root / namespace
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text(text)
    (directory / "hosts.toml").chmod(0o644)
    return directory


def test_no_hosts_directory_is_the_registry_alone(tmp_path: Path) -> None:
    assert hosts_for("registry.example", None) == [Host("https", "registry.example", "/v2")]
    assert hosts_for("localhost:5000", tmp_path, insecure=True) == [Host("http", "localhost:5000", "/v2")]
    assert hosts_for("docker.io", tmp_path) == [Host("https", "registry-1.docker.io", "/v2")]


def test_the_simple_docker_example(tmp_path: Path) -> None:
    write(tmp_path, "docker.io", 'server = "https://docker.io"\n\n'
                                 '[host."https://registry-1.docker.io"]\n  capabilities = ["pull", "resolve"]\n')
    assert hosts_for("docker.io", tmp_path) == [
        Host("https", "registry-1.docker.io", "/v2", pull=True, resolve=True),
        Host("https", "docker.io", "/v2"),
    ]


def test_a_local_mirror_for_docker(tmp_path: Path) -> None:
    d = write(tmp_path, "docker.io", '''
server = "https://registry-1.docker.io"    # Exclude this to not use upstream

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]                  # Requires less trust, won't resolve tag to digest from this host
[host."https://docker-mirror.internal"]
  capabilities = ["pull", "resolve"]
  ca = "docker-mirror.crt"                 # Or absolute path /etc/containerd/certs.d/docker.io/docker-mirror.crt
''')
    public, internal, upstream = hosts_for("docker.io", tmp_path)
    assert public == Host("https", "public-mirror.example.com", "/v2", pull=True, resolve=False)
    assert internal == Host("https", "docker-mirror.internal", "/v2", ca=(str(d / "docker-mirror.crt"),))
    assert upstream == Host("https", "registry-1.docker.io", "/v2")
    assert public.query("docker.io") == {"ns": "docker.io"} and public.root == "https://public-mirror.example.com/v2"


def test_the_default_namespace_and_the_upstream_last(tmp_path: Path) -> None:
    write(tmp_path, "_default", '[host."https://registry.example.com"]\n  capabilities = ["pull", "resolve"]\n')
    mirror, upstream = hosts_for("quay.io", tmp_path)
    assert mirror == Host("https", "registry.example.com", "/v2")
    assert upstream == Host("https", "quay.io", "/v2")
    assert upstream.query("quay.io") == {}


def test_a_port_s_directory_comes_before_the_plain_name(tmp_path: Path) -> None:
    write(tmp_path, "myregistry.io:5000", 'server = "https://colon.example"\n')
    assert hosts_for("myregistry.io:5000", tmp_path)[-1].host == "colon.example"
    write(tmp_path, "myregistry.io_5000_", 'server = "https://underscore.example"\n')
    assert hosts_for("myregistry.io:5000", tmp_path)[-1].host == "underscore.example"


def test_skip_verify_and_plain_http(tmp_path: Path) -> None:
    write(tmp_path, "docker.io", 'server = "https://registry-1.docker.io"\n\n[host."http://192.168.31.250:5000"]\n'
                                 '  capabilities = ["pull", "resolve", "push"]\n  skip_verify = true\n')
    mirror, _ = hosts_for("docker.io", tmp_path)
    assert mirror == Host("http", "192.168.31.250:5000", "/v2", skip_verify=True)


def test_the_detail_section_s_hosts(tmp_path: Path) -> None:
    write(tmp_path, "registry.example", '''
[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"
  skip_verify = false
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
  skip_verify = true

[host."http://mirror.registry"]
  capabilities = ["pull"]

[host."https://test-1.registry"]
  capabilities = ["pull", "resolve", "push"]
  ca = ["/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]

[host."https://test-2.registry"]
  client = "/etc/certs/client.pem"

[host."https://test-3.registry"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]

[host."https://non-compliant-mirror.registry/v2/upstream"]
  capabilities = ["pull"]
  override_path = true
''')
    hosts = hosts_for("registry.example", tmp_path)
    pull_only = {"pull": True, "resolve": False}
    assert hosts == [
        Host("https", "mirror.registry", "/v2", **pull_only, ca=("/etc/certs/mirror.pem",), skip_verify=False,
             header=(("x-custom-2", ("value1", "value2")),)),
        Host("https", "mirror-bak.registry", "/us/v2", **pull_only, skip_verify=True),
        Host("http", "mirror.registry", "/v2", **pull_only),
        Host("https", "test-1.registry", "/v2", ca=("/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"),
             client=(("/etc/certs/client.cert", "/etc/certs/client.key"), ("/etc/certs/client.pem", ""))),
        Host("https", "test-2.registry", "/v2", client=(("/etc/certs/client.pem", ""),)),
        Host("https", "test-3.registry", "/v2",
             client=(("/etc/certs/client-1.pem", ""), ("/etc/certs/client-2.pem", ""))),
        Host("https", "non-compliant-mirror.registry", "/v2/upstream", **pull_only),
        Host("https", "registry.example", "/v2"),
    ]


def test_the_file_spegel_writes(tmp_path: Path) -> None:
    """templateHosts for docker.io with two peers, tags resolved, and a header for the peers."""
    write(tmp_path, "docker.io", """server = 'https://registry-1.docker.io'

[host.'http://127.0.0.1:30020']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'
[host.'http://127.0.0.1:30020'.header]
Authorization = 'Basic c3BlZ2VsOnNwZWdlbA=='

[host.'http://127.0.0.1:30021']
capabilities = ['pull', 'resolve']
dial_timeout = '200ms'""")
    first, second, upstream = hosts_for("docker.io", tmp_path)
    assert first == Host("http", "127.0.0.1:30020", "/v2", dial_timeout=0.2,
                         header=(("Authorization", ("Basic c3BlZ2VsOnNwZWdlbA==",)),))
    assert second == Host("http", "127.0.0.1:30021", "/v2", dial_timeout=0.2)
    assert upstream == Host("https", "registry-1.docker.io", "/v2")


def test_docker_s_certificate_files_without_a_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "registry.example:5000"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "stray.cert"):
        (d / name).write_text("x")
    (host,) = hosts_for("registry.example:5000", tmp_path)
    assert host == Host("https", "registry.example:5000", "/v2", ca=(str(d / "ca.crt"),),
                        client=((str(d / "client.cert"), str(d / "client.key")),))


@pytest.mark.parametrize(("text", "says"), [
    ('[host."https://m"]\ncapabilities = ["pull", "mirror"]\n', "unknown capability 'mirror'"),
    ('[host."https://m"]\ndial_timeout = "soon"\n', "is not a duration"),
    ('[host."ftp://m"]\n', "not an http(s) URL"),
    ('[host."https://m"]\nskip_verify = "yes"\n', "skip_verify must be true or false"),
    ('[host."https://m".header]\nx = "a\\r\\nInjected: 1"\n', "has a line break"),
    ('server = "https://m"\nserver = "https://n"\n', "is not valid TOML"),
    ('[host."https://m"]\nclient = [["a", "b", "c"]]\n', "neither a file nor a [cert, key] pair"),
    ('[host."https://[m"]\n', "not an http(s) URL"),
    ('[host."https://m:port"]\n', "not an http(s) URL"),
    ('server = "http://[::1"\n', "not an http(s) URL"),
    ('[host."https://m"]\ndial_timeout = "' + "9" * 400 + 's"\n', "is not between 0 and 86400s"),
    ('[host."https://m"]\ndial_timeout = "25h"\n', "is not between 0 and 86400s"),
])
def test_a_bad_file_is_one_clear_line(tmp_path: Path, text: str, says: str) -> None:
    write(tmp_path, "registry.example", text)
    with pytest.raises(UsageError, match=r"oci: .*hosts\.toml.*") as caught:
        hosts_for("registry.example", tmp_path)
    assert says in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check applies to root")
def test_as_root_a_file_others_can_write_is_refused(tmp_path: Path) -> None:
    d = write(tmp_path, "registry.example", 'server = "https://elsewhere.example"\n')
    (d / "hosts.toml").chmod(0o666)
    with pytest.raises(UsageError, match="writable by no one else"):
        hosts_for("registry.example", tmp_path)
    (d / "hosts.toml").chmod(0o644)
    os.chown(d / "hosts.toml", 1000, 1000)
    with pytest.raises(UsageError, match="must belong to root"):
        hosts_for("registry.example", tmp_path)


def test_go_durations(tmp_path: Path) -> None:
    for text, seconds in (("200ms", 0.2), ("1s", 1.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("300us", 0.0003)):
        write(tmp_path / text, "r.example", f'[host."https://m"]\ndial_timeout = "{text}"\n')
        assert hosts_for("r.example", tmp_path / text)[0].dial_timeout == pytest.approx(seconds)


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check applies to root")
def test_as_root_docker_s_certificate_files_others_can_write_are_refused(tmp_path: Path) -> None:
    """Without a hosts.toml the directory's CAs are trusted: as root, only those root alone can change."""
    d = tmp_path / "registry.example"
    d.mkdir()
    (d / "evil.crt").write_text("x")
    d.chmod(0o777)
    os.chown(d, 65534, 65534)
    with pytest.raises(UsageError, match="must belong to root"):
        hosts_for("registry.example", tmp_path)
    d.chmod(0o755)
    os.chown(d, 0, 0)
    os.chown(d / "evil.crt", 65534, 65534)
    with pytest.raises(UsageError, match=r"evil\.crt must belong to root"):
        hosts_for("registry.example", tmp_path)
    os.chown(d / "evil.crt", 0, 0)
    assert hosts_for("registry.example", tmp_path)[0].ca == (str(d / "evil.crt"),)
