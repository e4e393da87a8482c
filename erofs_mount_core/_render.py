"""What the commands print for people: tables, sizes, latencies, a daemon's counts, and paths a shell can take back."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ._errors import UsageError


def shell_quoted(text: str) -> str:
    """Each word holding bytes that are not UTF-8 (a path's, kept as surrogate escapes, or their repr
    ``\\udcff``) as bash writes it, ``$'a\\xff'``, so that it can be pasted back into a shell."""

    def quoted(word: re.Match[str]) -> str:
        body, tail = word.group(1), word.group(2)
        body = re.sub(r"\\udc([89a-f][0-9a-f])", lambda m: chr(0xDC00 + int(m.group(1), 16)), body)
        out = "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else
                      "\\" + c if c in "\\'" else c for c in body)
        return f"$'{out}'{tail}"

    return re.sub(r"'?([^\s'\"]*(?:[\udc80-\udcff]|\\udc[89a-f][0-9a-f])[^\s'\"]*?)'?([:,.;)]*)(?=\s|$)",
                  quoted, text)


def stats_text(counts: dict[str, Any]) -> str:
    requests = counts["requests"]
    latency = counts["latency"]
    served = sum(latency["counts"])
    lines = [f"daemon {counts['pid']}, {counts['connections']} connection(s)",
             "  requests: " + ", ".join(f"{n} {c}" for c, n in requests.items() if n) + f"; {counts['errors']} errors",
             f"  read: {size_text(counts['read_bytes'])}",
             f"  latency: {latency_text(latency)}" if served else "  latency: -"]
    if counts["source"]:
        lines.append("  source: " + ", ".join(f"{k} {v}" for k, v in sorted(counts["source"].items())))
    if counts["last_error"]:
        lines.append(f"  last error: {counts['last_error']}")
    if counts.get("refused"):
        lines.append(f"  refused: {counts['refused']}")
    return "\n".join(lines)


def latency_text(latency: dict[str, Any]) -> str:
    """Mean, and the bucket bounds under which half and 99 % of the requests were answered."""
    total = sum(latency["counts"])
    bounds = [*latency["bounds"], float("inf")]

    def under(share: float) -> str:
        running = 0
        for bound, count in zip(bounds, latency["counts"], strict=True):
            running += count
            if running >= share * total:
                return f"<= {bound * 1000:g} ms" if bound != float("inf") else f"> {bounds[-2] * 1000:g} ms"
        return "-"

    return f"mean {latency['sum_seconds'] / total * 1000:.2f} ms, p50 {under(0.5)}, p99 {under(0.99)}"


def maybe(value: Any, text: Callable[[Any], str]) -> str:
    return "-" if value is None else text(value)


def table_lines(table: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell; the last one is left ragged."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)), line[-1]])
            for line in table]


def size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    shift, unit = next((s, u) for s, u in ((10, "KiB"), (20, "MiB"), (30, "GiB")) if n < 1024 << s or u == "GiB")
    return f"{n / (1 << shift):.1f} {unit}"


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("KMGTkmgtiBb"), text[len(text.rstrip("KMGTkmgtiBb")):]
    unit = unit.upper().removesuffix("B").removesuffix("I")
    if not number.isdigit() or unit not in units:
        raise UsageError(f"--max-size: {text!r} is not a size (like 500M or 20G)")
    return int(number) * units[unit]
