"""What /sys/block/nbdN says about a device.

``pid`` and ``backend`` exist only while the device has a configuration;
``pid`` names the process that connected it and is never updated by a
reconfigure, so it says nothing about the daemon of the moment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs

SYS_BLOCK = Path("/sys/block")
NBD_MAJOR = 43


@attrs.frozen
class DeviceInfo:
    index: int
    size: int
    """bytes; 0 when not connected"""
    pid: int | None
    backend: str | None

    @property
    def path(self) -> str:
        return f"/dev/nbd{self.index}"

    @property
    def configured(self) -> bool:
        return self.pid is not None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().rstrip("\n")
    except (FileNotFoundError, ProcessLookupError, OSError):
        return None


def device(index: int) -> DeviceInfo | None:
    base = SYS_BLOCK / f"nbd{index}"
    if not base.is_dir():
        return None
    sectors = _read(base / "size")
    pid = _read(base / "pid")
    backend = _read(base / "backend")
    return DeviceInfo(
        index=index,
        size=int(sectors) * 512 if sectors and sectors.isdigit() else 0,
        pid=int(pid) if pid and pid.isdigit() else None,
        backend=backend or None,
    )


def devices() -> list[DeviceInfo]:
    found = []
    for entry in SYS_BLOCK.glob("nbd*"):
        m = re.fullmatch(r"nbd(\d+)", entry.name)
        if m and (info := device(int(m.group(1)))) is not None:
            found.append(info)
    return sorted(found, key=lambda d: d.index)


def index_of(target: str) -> int:
    """``/dev/nbd3``, ``nbd3`` or ``3`` -> 3; ValueError if it is no nbd device."""
    m = re.fullmatch(r"(?:/dev/)?nbd(\d+)|(\d+)", target)
    if m:
        return int(m.group(1) or m.group(2))
    st = os.stat(target)
    if os.major(st.st_rdev) == NBD_MAJOR and st.st_mode & 0o170000 == 0o060000:
        info = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}").resolve().name
        m = re.fullmatch(r"nbd(\d+)", info)
        if m:
            return int(m.group(1))
    raise ValueError(f"{target} is not an nbd device")
