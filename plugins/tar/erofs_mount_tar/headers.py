"""Tar headers read with bounds: what Python's tarfile would read whole, or follow without end, is checked first.

tarfile reads a GNU long name (``L``, ``K``) or a PAX header (``x``, ``g``)
in one piece of the size its header declares, follows a chain of them by
recursion, and keeps every global PAX record for the rest of the archive.
A small compressed archive can declare gigabytes. ``BoundedTarInfo`` (the
``tarinfo`` class of the reader) refuses, before reading it:

- a long name or link target over ``PATH_MAX`` bytes;
- a PAX header over ``PAX_HEADER_MAX`` bytes, and global PAX records that
  add up to more than that;
- more than ``EXTENSION_CHAIN_MAX`` extension headers in front of one entry;
- a negative size, and sparse files (not supported yet, in every format).

PAX records are parsed by their length prefix, in one linear pass (the
regular expressions of some Python versions backtrack quadratically).
"""

from __future__ import annotations

import tarfile
from typing import Any

PATH_MAX = 4096
"""The longest path or link target an entry may have, in bytes (Linux's PATH_MAX)."""
PAX_HEADER_MAX = 1 << 20
"""The largest PAX header, in bytes: room for the largest xattrs Linux holds, several times over."""
EXTENSION_CHAIN_MAX = 8
"""Extension headers (long names, PAX) in front of one entry: real archives have two at most."""

_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class HeaderError(Exception):
    """An entry's headers are out of bounds or damaged; the reader names the archive."""


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, its extension headers bounded before they are read (see the module)."""

    def _proc_member(self, tar: Any) -> tarfile.TarInfo:
        if self.size < 0:
            raise HeaderError(f"entry {self.name!r} declares a negative size")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise HeaderError(f"entry {self.name!r} is a sparse file, which is not supported yet")
        if self.type not in _LONG + _PAX:
            return super()._proc_member(tar)
        if self.type in _LONG and self.size > PATH_MAX + 1:
            raise HeaderError(f"an entry's name is {self.size:,} bytes long (more than {PATH_MAX}): "
                              "refusing the archive")
        if self.type in _PAX and self.size > PAX_HEADER_MAX:
            raise HeaderError(f"a PAX header is {self.size:,} bytes (more than {PAX_HEADER_MAX:,}): "
                              "refusing the archive")
        depth = getattr(tar, "_extension_depth", 0)
        if depth >= EXTENSION_CHAIN_MAX:
            raise HeaderError(f"more than {EXTENSION_CHAIN_MAX} extension headers in front of one entry: "
                              "refusing the archive")
        tar._extension_depth = depth + 1
        try:
            member = super()._proc_member(tar)
        finally:
            tar._extension_depth = depth
        if member.size < 0:
            raise HeaderError(f"entry {member.name!r} declares a negative size")
        return member

    def _proc_pax(self, tar: Any) -> tarfile.TarInfo:
        """tarfile's own steps, with the records parsed by length (``_records``) and sparse files refused."""
        buf = tar.fileobj.read(self._block(self.size))
        if len(buf) < self.size:
            raise EOFError
        records = _records(buf[:self.size])
        headers = tar.pax_headers if self.type == tarfile.XGLTYPE else tar.pax_headers.copy()
        charset = dict(records).get(b"hdrcharset")
        if charset is not None:
            headers["hdrcharset"] = charset.decode("utf-8", "surrogateescape")
        encoding = tar.encoding if headers.get("hdrcharset") == "BINARY" else "utf-8"
        for key, value in records:
            keyword = self._decode_pax_field(key, "utf-8", "utf-8", tar.errors)
            if keyword.startswith("GNU.sparse."):
                raise HeaderError("an entry is a sparse file, which is not supported yet")
            if keyword in tarfile.PAX_NAME_FIELDS:
                headers[keyword] = self._decode_pax_field(value, encoding, tar.encoding, tar.errors)
            else:
                headers[keyword] = self._decode_pax_field(value, "utf-8", "utf-8", tar.errors)
        if self.type == tarfile.XGLTYPE and sum(len(k) + len(v) for k, v in headers.items()) > PAX_HEADER_MAX:
            raise HeaderError(f"its global PAX records add up to more than {PAX_HEADER_MAX:,} bytes: "
                              "refusing the archive")
        try:
            member = self.fromtarfile(tar)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None
        if self.type != tarfile.XGLTYPE:
            member._apply_pax_info(headers, tar.encoding, tar.errors)
            member.offset = self.offset
            if "size" in headers:  # the data, and so the next header, moved
                offset = member.offset_data
                if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                    offset += member._block(max(member.size, 0))
                tar.offset = offset
        return member


def _records(data: bytes) -> list[tuple[bytes, bytes]]:
    """``LENGTH KEY=VALUE\\n`` records, each found by its length: linear in ``data``, strict."""
    records, pos = [], 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space <= pos or not data[pos:space].isdigit():
            raise HeaderError("a PAX header is damaged (a record without its length): refusing the archive")
        end = pos + int(data[pos:space])
        if end > len(data) or end < space + 3 or data[end - 1] != 0x0A:
            raise HeaderError("a PAX header is damaged (a record's length is wrong): refusing the archive")
        key, equals, value = data[space + 1:end - 1].partition(b"=")
        if not equals or not key:
            raise HeaderError("a PAX header is damaged (a record without KEY=): refusing the archive")
        records.append((key, value))
        pos = end
    return records
