"""Whether a source's bytes are an EROFS image: what mount checks before it attaches them, and serve before
it exports them (so a typo'd path never ends as a mount(2) error in the kernel log)."""

from __future__ import annotations

from .._errors import SourceError
from .._source import Source
from . import format as fmt


def check_erofs(source: Source, spec: str) -> None:
    """SourceError unless ``source`` starts as an EROFS image does and holds every block its superblock names."""
    if source.size < fmt.SUPER_OFFSET + fmt.SUPER.size:
        raise SourceError(f"{spec} is not an EROFS image (only {source.size} bytes)")
    fields = fmt.SUPER.unpack(bytes(source.pread(fmt.SUPER.size, fmt.SUPER_OFFSET)))
    magic, block_bits, blocks = fields[0], fields[3], fields[9]
    if magic != fmt.MAGIC or not 9 <= block_bits <= 16:
        raise SourceError(f"{spec} is not an EROFS image (no EROFS superblock)")
    if blocks << block_bits > source.size:
        raise SourceError(f"{spec} is a truncated EROFS image: its superblock names {blocks << block_bits} bytes, "
                          f"it has {source.size}")
