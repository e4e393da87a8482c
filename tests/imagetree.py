"""Test images: a directory tree with awkward names and sizes, made into EROFS."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from pathlib import Path

NAMES = ["plain", "with space", "ünïcödé", "日本語", "quote'and\"dq", "tab\tname", "dash-_.x"]


def make_tree(root: Path, files: int = 300, seed: int = 1, max_size: int = 8 << 20) -> dict[str, str]:
    """Write ``files`` files (0 B .. max_size) under ``root``; return {relpath: sha256}."""
    rng = random.Random(seed)
    sizes = [0, 1, 511, 512, 4095, 4096, 4097, 65536, 1 << 20, max_size]
    sums = {}
    for i in range(files):
        sub = root / f"dir {i % 7}" / NAMES[i % len(NAMES)]
        sub.mkdir(parents=True, exist_ok=True)
        size = sizes[i] if i < len(sizes) else rng.choice([rng.randrange(0, 70000), rng.randrange(0, 600000)])
        name = f"{NAMES[(i * 3) % len(NAMES)]} {i}.bin"
        data = rng.randbytes(size)
        (sub / name).write_bytes(data)
        sums[str((sub / name).relative_to(root))] = hashlib.sha256(data).hexdigest()
    return sums


def mkfs(image: Path, tree: Path, *extra: str) -> Path:
    subprocess.run(["mkfs.erofs", "--quiet", *extra, str(image), str(tree)], check=True)
    return image


def tree_sums(root: Path) -> dict[str, str]:
    sums = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            sums[str(p.relative_to(root))] = file_sha256(p)
    return sums


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
