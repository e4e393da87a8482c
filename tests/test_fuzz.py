"""Every parser of untrusted bytes ends in the project's own errors, whatever it is fed.

Parsers: the NBD handshake and transmission requests (from any client of
``serve``), recovery records, OCI references, manifests and indexes (from a
registry), WWW-Authenticate headers, tar archives, cached indexes,
hosts.toml, zstd:chunked TOCs, prefetch lists. The default run tries 1,000 examples per
parser; ``EROFS_MOUNT_FUZZ_EXAMPLES=20000 scripts/test -m fuzz`` runs the
full count.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erofs_mount_core import ErofsMountError, Source, SourceError, UsageError
from erofs_mount_core import _record as rec
from erofs_mount_core._errors import RecordError
from erofs_mount_core._nbd import handshake
from erofs_mount_core._nbd import protocol as p
from erofs_mount_core._nbd.transmission import Disk, transmit

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("EROFS_MOUNT_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Small(Source):
    size = 4096

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(length)


def _fed(data: bytes) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.sendall(data)
    theirs.shutdown(socket.SHUT_WR)
    return ours, theirs


# the protocol's own words, so that examples get past the first check often
HANDSHAKE_WORDS = st.sampled_from([
    struct.pack(">I", 3), struct.pack(">I", 1), struct.pack(">Q", handshake.IHAVEOPT),
    struct.pack(">I", handshake.OPT_EXPORT_NAME), struct.pack(">I", 7), struct.pack(">I", 8),
    struct.pack(">I", 2), struct.pack(">I", 0), struct.pack(">I", 1 << 20), struct.pack(">H", 1),
    struct.pack(">H", 3), b"\0\0\0\x04abcd"])


@FUZZ
@given(st.lists(st.one_of(HANDSHAKE_WORDS, st.binary(max_size=16)), max_size=24).map(b"".join))
def test_the_handshake(data: bytes) -> None:
    ours, theirs = _fed(data)
    try:
        handshake.negotiate(ours, size=4096, flags=p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY, description="fuzz")
    except (handshake.HandshakeError, OSError):
        pass
    finally:
        ours.close()
        theirs.close()


REQUESTS = st.builds(
    lambda magic, flags, cmd, cookie, offset, length, tail: p.REQUEST.pack(magic, flags, cmd, cookie, offset,
                                                                          length) + tail,
    st.one_of(st.just(p.REQUEST_MAGIC), st.integers(0, 2**32 - 1)), st.integers(0, 2**16 - 1),
    st.one_of(st.integers(0, 8), st.integers(0, 2**16 - 1)), st.integers(0, 2**64 - 1),
    st.one_of(st.integers(0, 8192), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1)), st.binary(max_size=8))


@FUZZ
@given(st.lists(REQUESTS, max_size=12).map(b"".join))
def test_transmission_requests(data: bytes) -> None:
    ours, theirs = _fed(data)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    try:
        reason = transmit(ours, Disk(Small()), peer="fuzz")
        assert isinstance(reason, str)
    finally:
        ours.close()
        theirs.close()


TOML_VALUES = st.recursive(
    st.one_of(st.integers(-2**70, 2**70), st.text(max_size=20), st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


@FUZZ
@given(st.one_of(
    st.text(max_size=400),
    st.dictionaries(st.sampled_from(["format", "created", "daemon_pid", "device", "source", "x"]), TOML_VALUES,
                    max_size=6).map(lambda d: json.dumps(d).replace('": ', '" = ').strip("{}")),
    st.integers(1, 50000).map(lambda depth: "format = 1\nx = " + "[" * depth + "]" * depth),
))
def test_records(text: str) -> None:
    try:
        record = rec.loads(text)
    except RecordError:
        return
    assert isinstance(record, rec.Record)


@FUZZ
@given(st.one_of(st.text(max_size=300), st.from_regex(
    r"(([a-z0-9.-]{0,20}(:[0-9]{0,6})?)/)?[a-z0-9._/-]{0,40}(:[A-Za-z0-9_.-]{0,20})?(@sha256:[a-f0-9]{0,64})?",
    fullmatch=True)))
def test_references(text: str) -> None:
    from erofs_mount_oci import reference

    try:
        reference.parse(text)
    except UsageError:
        pass


DIGESTS = st.one_of(st.just("sha256:" + "ab" * 32), st.text(max_size=12), st.integers())
DESCRIPTOR = st.fixed_dictionaries({}, optional={
    "digest": DIGESTS, "size": st.one_of(st.integers(-5, 2**64), st.booleans(), st.text(max_size=4)),
    "mediaType": st.one_of(st.sampled_from(["application/vnd.erofs", "application/vnd.oci.image.manifest.v1+json"]),
                           st.integers()),
    "platform": st.one_of(st.fixed_dictionaries({"os": st.sampled_from(["linux", 1]),
                                                 "architecture": st.sampled_from(["amd64", "arm64", None])}),
                          st.text(max_size=3)),
    "annotations": st.one_of(st.dictionaries(st.just("vnd.docker.reference.type"), st.text(max_size=25)),
                             st.lists(st.integers(), max_size=2)),
})
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=10)
DOCUMENTS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "mediaType": st.one_of(st.sampled_from([
            "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json"]), JSON),
        "manifests": st.one_of(st.lists(DESCRIPTOR, max_size=4), JSON),
        "layers": st.one_of(st.lists(DESCRIPTOR, max_size=4), JSON),
        "schemaVersion": JSON,
    }).map(json.dumps),
    JSON.map(json.dumps),
    st.integers(1, 100000).map(lambda depth: "[" * depth + "]" * depth),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
)


class FakeRegistry:
    """The registry's answers, fed by the example: the parsing under test is the real one."""

    def __init__(self, bodies: list[str]) -> None:
        self.bodies = bodies

    def respond(self, reference: str) -> tuple[Any, bytes]:
        import httpx

        body = self.bodies.pop(0).encode("utf-8", "surrogatepass") if self.bodies else b"{}"
        return httpx.Response(200, content=body, headers={"Content-Type": "application/json"}), body


@FUZZ
@given(st.lists(DOCUMENTS, min_size=1, max_size=2), st.one_of(st.none(), st.integers(-1, 3)),
       st.one_of(st.none(), st.just("sha256:" + "ab" * 32)))
def test_manifests_and_indexes(bodies: list[str], layer: int | None, blob: str | None) -> None:
    from erofs_mount_oci import _http
    from erofs_mount_oci.platform import Platform
    from erofs_mount_oci.reference import parse
    from erofs_mount_oci.registry import Registry

    feed = FakeRegistry(bodies)
    registry = Registry(None, parse("registry.example/team/app:v1"), insecure=False)
    original = _http.fetch
    _http.fetch = lambda client, method, url, **kw: feed.respond(url)  # type: ignore[assignment]
    try:
        manifest, digest, platform = registry.image_manifest(Platform.of("linux", "amd64"))
        if layer is None or layer >= 0:
            registry.choose_layer(manifest, digest, platform, index=layer, blob=blob if layer is None else None)
    except (SourceError, UsageError):
        pass
    finally:
        _http.fetch = original


@FUZZ
@given(st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(st.sampled_from(['realm="', 'service=', ",", '"', "\\", " ", "scope=", "Bearer ", "a"]),
                       st.text(max_size=5)), max_size=60).map("".join),
))
def test_www_authenticate(header: str) -> None:
    from erofs_mount_oci._http import parse_challenge

    scheme, params = parse_challenge(header)
    assert isinstance(scheme, str) and all(isinstance(v, str) for v in params.values())


@pytest.mark.timeout(10)
def test_a_long_malformed_www_authenticate_takes_linear_time() -> None:
    from erofs_mount_oci._http import parse_challenge

    for header in ("Bearer " + "a" * 1_000_000, "Bearer " + 'a="' * 300_000, "Bearer " + "a=b " * 300_000):
        parse_challenge(header)


def test_the_project_s_errors_are_what_the_parsers_raise() -> None:
    """The allowed exceptions above are the user-facing ones: one line each, an exit code."""
    for cls in (SourceError, UsageError, RecordError):
        assert issubclass(cls, ErofsMountError)


# -- archives: the tar reader, the index and the tree it keeps ---------------------------------------

_NAMES = st.one_of(st.sampled_from(["a", "a/b", "./c", "/d", "e/", ".wh.a", "a/.wh.b", "a/.wh..wh..opq", ".wh.",
                                    ".wh..", "..", "a/../b", "a\0b", "n" * 300, "/".join("d" * 600),
                                    "données", "\udcff"]),
                   st.text(alphabet="ab/.wh\0", max_size=12))
_PAX = st.dictionaries(
    st.one_of(st.sampled_from(["mtime", "uid", "gid", "size", "path", "linkpath", "SCHILY.xattr.user.x",
                               "SCHILY.xattr.", "SCHILY.xattr.com.apple.q", "LIBARCHIVE.xattr.user.y",
                               "GNU.sparse.major", "hdrcharset"]), st.text(max_size=6)),
    st.one_of(st.sampled_from(["-5.5", "1e30", "inf", "nan", "-1", str(1 << 40), "4294967296", "BINARY", "x" * 70000,
                               "0"]), st.text(max_size=8)),
    max_size=3)
_ENTRIES = st.lists(st.tuples(_NAMES, st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"S"]),
                              st.binary(max_size=40), _PAX, st.integers(-(1 << 40), 1 << 40),
                              st.sampled_from([1, 2])), max_size=8)
_FLIPS = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4)


def _tar_bytes(entries: list[Any], flips: list[tuple[int, int]]) -> bytes:
    import tarfile

    out = bytearray()
    for name, kind, data, pax, number, fmt in entries:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.pax_headers = kind, len(data), dict(pax)
        info.mtime, info.linkname = number if fmt == 1 else 0, "a" if kind in (b"1", b"2") else ""
        try:
            out += info.tobuf(format=tarfile.PAX_FORMAT if fmt == 1 else tarfile.GNU_FORMAT, encoding="utf-8",
                              errors="surrogateescape")
        except (ValueError, UnicodeError, OverflowError):
            continue  # tarfile will not write it: nothing to read
        out += data + bytes(-len(data) % 512)
    out += bytes(1024)
    for at, value in flips:
        if out:
            out[at % len(out)] = value
    return bytes(out)


class _Bytes(Source):
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:  # type: ignore[override]
        return len(self.data)

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]


@FUZZ
@given(_ENTRIES, _FLIPS, st.sampled_from(["tar", "gzip", "zstd"]))
def test_tar_archives(entries: list[Any], flips: list[tuple[int, int]], compression: str) -> None:
    import gzip
    import tempfile

    import zstandard
    from erofs_mount_tar import index as indexes
    from erofs_mount_tar import packed_tree

    data = _tar_bytes(entries, flips)
    if compression == "gzip":
        data = gzip.compress(data, mtime=0)
    elif compression == "zstd":
        data = zstandard.ZstdCompressor().compress(data)
    with tempfile.TemporaryDirectory() as cache:
        previous = os.environ.get("EROFS_MOUNT_CACHE_DIR")
        os.environ["EROFS_MOUNT_CACHE_DIR"] = cache
        try:
            built = indexes.build(_Bytes(data), "fuzz")
        except SourceError:
            return
        finally:
            if previous is None:
                os.environ.pop("EROFS_MOUNT_CACHE_DIR")
            else:
                os.environ["EROFS_MOUNT_CACHE_DIR"] = previous
    again = indexes.ArchiveIndex.from_bytes(built.to_bytes())  # what it wrote, it reads back
    assert again.layout == built.layout and packed_tree.load(again.tree).root.mode == built.read_tree().root.mode


_SECTION = st.sampled_from(["meta", "hashes", "tree", "layout", "gzip", "x"])
_TREE_ROWS = st.lists(st.lists(st.one_of(st.integers(-(1 << 70), 1 << 70), st.text(max_size=4),
                                         st.lists(st.integers(-3, 3), max_size=3),
                                         st.dictionaries(st.text(max_size=3), st.text(max_size=4), max_size=2),
                                         st.lists(st.tuples(st.text(max_size=3), st.integers(-1, 4)), max_size=3),
                                         st.none(), st.floats()), min_size=10, max_size=13), max_size=5)


@FUZZ
@given(st.one_of(
    st.binary(max_size=200),
    st.lists(st.tuples(_SECTION, st.binary(max_size=60)), max_size=6),
    _TREE_ROWS,
))
def test_cached_indexes_and_trees(example: Any) -> None:
    """A cached index whose checksum matches (as a damaged but resealed one would) is whole, or a ValueError."""
    import hashlib
    import zlib

    from erofs_mount_tar import index as indexes
    from erofs_mount_tar import packed_tree

    if isinstance(example, bytes):
        payload = example
    elif example and isinstance(example[0], tuple):
        payload = b"".join(struct.pack("<B", len(n)) + n.encode() + struct.pack("<Q", len(b)) + b for n, b in example)
    else:
        tree = json.dumps(example, allow_nan=True).encode()
        try:
            packed_tree.load(tree)
        except ValueError:
            pass
        meta = json.dumps({"compression": "tar", "archive_sha256": "0" * 64, "archive_size": 0, "stream_size": 0,
                           "stream_sha256": "0" * 64, "span_size": 1 << 20, "zstd_frames": []}).encode()
        payload = b"".join(struct.pack("<B", len(n)) + n + struct.pack("<Q", len(b)) + b
                           for n, b in ((b"meta", meta), (b"hashes", b""), (b"tree", zlib.compress(tree))))
    data = struct.pack("<16sIQ32s", indexes.MAGIC, indexes.VERSION, len(payload),
                       hashlib.sha256(payload).digest()) + payload
    try:
        indexes.ArchiveIndex.from_bytes(data)
    except ValueError:
        pass


@FUZZ
@given(st.binary(max_size=40), st.lists(st.tuples(*[st.integers(0, (1 << 64) - 1)] * 4, st.binary(min_size=32,
                                                           max_size=32), st.booleans(), st.integers(0, 1 << 26)),
                                          max_size=4), st.integers(-2, 1 << 40), st.sampled_from(["zstd", "gzip", "x"]))
def test_cached_toc_indexes(tree: bytes, chunks: list[tuple[Any, ...]], stream_size: int, codec: str) -> None:
    """A cached TOC index whose checksum matches (resealed) is one a TOC read could give, or none at all."""
    from erofs_mount_tar import toc_cache
    from erofs_mount_tar.chunked_files import MAX_CHUNK, Chunk
    from erofs_mount_tar.toc import TocIndex

    index = TocIndex(tree, tuple(Chunk(*c) for c in chunks), max(stream_size, 0), 1, codec)
    try:
        loaded = toc_cache._from_bytes(toc_cache._to_bytes(index))
    except ValueError:
        return
    at = 0
    for chunk in loaded.chunks:
        assert chunk.start == at and 0 < chunk.size <= MAX_CHUNK and chunk.blob_start <= chunk.blob_end
        at += chunk.size
    assert loaded.stream_size == at and loaded.codec in ("zstd", "gzip")


_HOST_VALUES = st.one_of(st.text(max_size=8), st.integers(-5, 10), st.booleans(),
                         st.lists(st.one_of(st.text(max_size=6), st.lists(st.text(max_size=4), max_size=3)),
                                  max_size=3),
                         st.sampled_from(["200ms", "9" * 400 + "s", "1h", "-1s", ".5s", "1.5.5s"]),
                         st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
_HOST_URLS = st.one_of(st.sampled_from(["https://m", "http://[m", "https://m:port", "m:5000", "ftp://m",
                                        "https://m/v2?x=1", "https://[::1]:5000/p", ""]), st.text(max_size=10))


@FUZZ
@given(st.one_of(
    st.text(max_size=200),
    st.fixed_dictionaries({}, optional={
        "server": st.one_of(_HOST_URLS, _HOST_VALUES),
        "host": st.one_of(st.dictionaries(_HOST_URLS, st.dictionaries(
            st.sampled_from(["capabilities", "ca", "client", "skip_verify", "header", "dial_timeout",
                             "override_path", "x"]), _HOST_VALUES, max_size=4), max_size=3), _HOST_VALUES),
        "capabilities": _HOST_VALUES, "skip_verify": _HOST_VALUES,
    }),
))
def test_hosts_toml(doc: Any) -> None:
    import tempfile

    import tomli_w
    from erofs_mount_oci.hosts import hosts_for

    try:
        text = doc if isinstance(doc, str) else tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return
    with tempfile.TemporaryDirectory() as root:
        os.mkdir(os.path.join(root, "r.example"))
        with open(os.path.join(root, "r.example", "hosts.toml"), "w", encoding="utf-8",
                  errors="surrogateescape") as f:
            f.write(text)
        try:
            hosts = hosts_for("r.example", root)
        except UsageError:
            return
    assert hosts and all(h.scheme in ("http", "https") for h in hosts)


_TOC_TYPES = st.sampled_from(["reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk", "sock", ""])
_TOC_VALUES = st.one_of(st.integers(-3, 1 << 64), st.text(max_size=6), st.none(), st.booleans(),
                        st.sampled_from(["sha256:" + "a" * 64, "1969-12-31T23:59:59.5Z", "2024-02-30T00:00:00Z",
                                         "0001-01-01T00:00:00Z", "2024-01-01T00:00:00+25:99", "AAAA", "!!"]))
_TOC_ENTRY = st.fixed_dictionaries(
    {"type": _TOC_TYPES, "name": st.sampled_from(["a", "a/b", "../x", "", ".wh.a", "a/.wh..wh..opq", "b"])},
    optional={k: _TOC_VALUES for k in ("mode", "size", "uid", "gid", "modtime", "linkName", "digest", "offset",
                                       "endOffset", "chunkSize", "chunkOffset", "chunkDigest", "chunkType",
                                       "devMajor", "devMinor")}
    | {"xattrs": st.dictionaries(st.text(max_size=8), _TOC_VALUES, max_size=2)})


@FUZZ
@given(st.one_of(st.lists(_TOC_ENTRY, max_size=8).map(lambda e: {"version": 1, "entries": e}),
                 st.dictionaries(st.text(max_size=4), _TOC_VALUES, max_size=3), st.binary(max_size=40).map(list)),
       st.dictionaries(st.sampled_from(["io.containers.zstd-chunked.manifest-position",
                                        "io.containers.zstd-chunked.manifest-checksum",
                                        "io.github.containers.zstd-chunked.manifest-position"]),
                       st.one_of(st.text(max_size=30), st.sampled_from(["100:20:300:1", "0:0:0:1", "5:5:5:2"])),
                       max_size=3),
       st.binary(max_size=64))
def test_zstd_chunked_tocs(document: Any, annotations: dict[str, str], blob_tail: bytes) -> None:
    """A TOC whose sha256 matches its pin (as a hostile writer's would) gives an index whose every read is
    checked bytes or a SourceError; its annotations are a position or an ArchiveError."""
    import hashlib

    import zstandard
    from erofs_mount_tar import toc

    try:
        toc.TocPosition.of(annotations, 1000, "application/vnd.oci.image.layer.v1.tar+zstd")
    except SourceError:
        pass
    raw = json.dumps(document).encode()
    compressed = zstandard.ZstdCompressor().compress(raw)
    blob = blob_tail + compressed
    position = toc.TocPosition("sha256:" + hashlib.sha256(compressed).hexdigest(), len(blob_tail), len(compressed),
                               len(raw))
    try:
        index = toc.load_toc(toc.FoundToc(compressed, len(blob_tail)), position, "layer")
    except SourceError:
        return

    class Blob(Source):
        size = len(blob)

        def pread(self, length: int, offset: int) -> bytes:
            return blob[offset:offset + length]

    stream = index.open_stream(Blob(), 1 << 20, "layer")
    for offset in range(0, index.stream_size, max(1, index.stream_size // 4)):
        try:
            stream.pread(min(4096, index.stream_size - offset), offset)
        except SourceError:
            pass
    index.image_layout()


_UNITS = st.fixed_dictionaries({"digest": st.one_of(st.just("sha256:" + "a" * 64), st.text(max_size=80)),
                                "kind": st.sampled_from(["archive", "toc", "other", 1]),
                                "unit": st.one_of(st.just(1 << 20), st.integers(-1, 1 << 30), st.booleans())})
_PAIRS = st.lists(st.one_of(st.tuples(st.integers(-2, 4), st.integers(-2, 1 << 41)).map(list),
                            st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=3)),
                  max_size=20)


@FUZZ
@given(st.one_of(
    st.fixed_dictionaries({"version": st.sampled_from([1, 2, "1"]), "layers": st.lists(_UNITS, max_size=4),
                           "entries": _PAIRS}).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
))
def test_prefetch_lists(data: bytes) -> None:
    """A published or cached prefetch list is a list of units of this image's layers, or a ValueError."""
    from erofs_mount_oci.prefetch import KINDS, LayerUnits, PrefetchList

    try:
        found = PrefetchList.from_bytes(data)
    except ValueError:
        return
    assert all(layer.kind in KINDS and 4096 <= layer.unit <= 64 << 20 for layer in found.layers)
    assert all(0 <= at < len(found.layers) and unit >= 0 for at, unit in found.entries)
    assert len(set(found.entries)) == len(found.entries)
    assert PrefetchList.from_bytes(found.to_bytes()) == found
    found.for_layers([LayerUnits("sha256:" + "a" * 64, "archive", 1 << 20)])
