"""An eStargz layer writer for the tests, after stargz-snapshotter's docs/estargz.md (no producer is packaged here).

The layer is a tar+gzip blob of concatenated gzip members: each file's
payload (each chunk of it) starts a member of its own, tar headers and
padding go into the member before; then a member holding the tar entry
``stargz.index.json`` (the TOC), then the 51-byte footer: an empty gzip
member whose extra field ``SG`` holds ``%016x`` of the TOC member's offset
and ``STARGZ``. The descriptor's annotation
``containerd.io/snapshot/stargz/toc.digest`` is the sha256 of the TOC JSON.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import tarfile
import zlib

TYPES = {tarfile.REGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink",
         tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


def rfc3339(seconds: float) -> str:
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{when.microsecond:06d}".rstrip("0") if when.microsecond
                                                  else "") + "Z"


def footer(toc_offset: int) -> bytes:
    extra = b"SG" + (22).to_bytes(2, "little") + b"%016xSTARGZ" % toc_offset
    return b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + len(extra).to_bytes(2, "little") + extra + b"\x01\x00\x00\xff\xff" \
        + bytes(8)


class Writer:
    def __init__(self, chunk_size: int = 4 << 20) -> None:
        self.chunk_size = chunk_size
        self.out = io.BytesIO()
        self.stream = hashlib.sha256()  # of the uncompressed tar stream: the diff_id
        self.pending = bytearray()
        self.entries: list[dict] = []

    def _write(self, data: bytes) -> None:
        self.pending += data
        self.stream.update(data)

    def _new_member(self) -> int:
        """Close the member being written (if it holds anything); the offset the next one starts at."""
        if self.pending:
            packer = zlib.compressobj(6, zlib.DEFLATED, 31)
            self.out.write(packer.compress(bytes(self.pending)) + packer.flush())
            self.pending.clear()
        return self.out.tell()

    def add(self, info: tarfile.TarInfo, data: bytes = b"") -> None:
        info.size = len(data) if info.isreg() else 0
        self._write(info.tobuf(tarfile.PAX_FORMAT))
        entry: dict = {"name": info.name, "type": TYPES[info.type], "modtime": rfc3339(info.mtime)}
        for key, value in (("mode", info.mode), ("uid", info.uid), ("gid", info.gid), ("size", info.size),
                           ("linkName", info.linkname), ("devMajor", info.devmajor), ("devMinor", info.devminor)):
            if value:
                entry[key] = value  # the writer leaves zeros out
        xattrs = {k.removeprefix("SCHILY.xattr."): v for k, v in info.pax_headers.items() if k.startswith("SCHILY.")}
        if xattrs:
            import base64

            entry["xattrs"] = {k: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
                               for k, v in xattrs.items()}
        if not data:
            self.entries.append(entry)
            return
        entry["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
        chunked = len(data) > self.chunk_size
        for at in range(0, len(data), self.chunk_size):
            piece = data[at:at + self.chunk_size]
            row = entry if at == 0 else {"name": info.name, "type": "chunk", "chunkOffset": at}
            row["offset"] = self._new_member()
            if chunked:
                row["chunkSize"] = len(piece)
            row["chunkDigest"] = "sha256:" + hashlib.sha256(piece).hexdigest()
            self.entries.append(row)
            self._write(piece)
        self._write(bytes(-len(data) % 512))

    def finish(self) -> tuple[bytes, str, str]:
        """(the blob, the TOC's digest for the annotation, the diff_id)"""
        toc = json.dumps({"version": 1, "entries": self.entries}).encode()
        toc_offset = self._new_member()
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        self._write(info.tobuf(tarfile.PAX_FORMAT) + toc + bytes(-len(toc) % 512) + bytes(1024))
        self._new_member()
        self.out.write(footer(toc_offset))
        return self.out.getvalue(), "sha256:" + hashlib.sha256(toc).hexdigest(), "sha256:" + self.stream.hexdigest()
