"""A synthesized image as a Source: its metadata from memory, its files' blocks from the backing stream."""

from __future__ import annotations

from collections.abc import Mapping

from .._errors import SourceError
from .._source import Source
from .build import BS, ImageLayout, ImageNode


class SynthesizedImage(Source):
    """An EROFS image made from a tree: block n is metadata, a block of a file's bytes in ``backing``, or zeros.

    It is built from ``layout``: ``ImageLayout.of(root)`` of a directory
    ``ImageNode`` whose regular files name where their bytes start in
    ``backing`` (``data_offset``), or a layout kept from an earlier build
    (``ImageLayout.from_bytes``), which serves the very same bytes. It
    answers no recovery state of its own: the source that made it records
    how to make it again (``state()`` of a subclass).
    """

    def __init__(self, layout: ImageLayout | ImageNode, backing: Source,
                 description: str = "synthesized EROFS image") -> None:
        self.layout = layout if isinstance(layout, ImageLayout) else ImageLayout.of(layout)
        self.backing, self.description = backing, description

    @property
    def size(self) -> int:
        return self.layout.size

    def describe(self) -> str:
        return self.description

    def pread(self, length: int, offset: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SourceError(f"read of {length} bytes at {offset} is outside the image's {self.size} bytes")
        out = bytearray()
        end = offset + length
        meta_end = self.layout.data_start * BS
        while offset < end:
            if offset < meta_end:
                n = min(end, meta_end) - offset
                out += self.layout.metadata[offset:offset + n]
                offset += n
                continue
            block = offset // BS
            extent = self.layout.extent_at(block)
            if extent is None:  # a gap between files: zeros up to the next block
                n = min(end, (block + 1) * BS) - offset
                out += bytes(n)
            else:
                into = offset - extent.first_block * BS
                extent_end = (extent.first_block * BS) + -(-extent.size // BS) * BS
                n = min(end, extent_end) - offset
                have = max(0, min(n, extent.size - into))  # past the file's bytes: its last block's zeros
                if have:
                    out += self.backing.pread(have, extent.backing_offset + into)
                out += bytes(n - have)
            offset += n
        return bytes(out)

    def counters(self) -> Mapping[str, int]:
        return self.backing.counters()

    def close(self) -> None:
        self.backing.close()
