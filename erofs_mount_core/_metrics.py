"""What a daemon counts: per connection, per source, and the text Prometheus reads.

A serving thread owns its ``ConnectionStats`` and is its only writer, so the
hot path adds to plain list slots without a lock; a reader (the control
socket's ``stats``) sums the connections' lists, which at worst misses the
request being counted. Sources count what they do on their side (HTTP
requests, cache hits, decompressed bytes) in a ``Counters``, which is shared
between threads and so takes a lock.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

#: upper bounds of the request latency histogram, in seconds (Prometheus ``le``)
LATENCY_BOUNDS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
_BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BOUNDS)
#: the NBD commands a ConnectionStats counts, each its own slot
COMMANDS = ("read", "write", "flush", "trim", "other")


class Counters:
    """Named counters that only grow, safe to add to from any thread.

    A source keeps one and returns ``snapshot()`` from ``Source.counters()``;
    a source over another adds that one's counts in::

        self._counters = Counters()
        self._counters.add("http_requests")
        self._counters.add("http_bytes", len(body))
        ...
        def counters(self):
            return self._counters.snapshot(self.inner.counters())
    """

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def snapshot(self, *others: Mapping[str, int]) -> dict[str, int]:
        """The counts now, with ``others``' added (the counts of the sources below this one)."""
        with self._lock:
            mine = dict(self._values)
        return merged(mine, *others)


def merged(*parts: Mapping[str, int]) -> dict[str, int]:
    """Counters of stacked sources added together (two caches' hits are the device's hits)."""
    total: dict[str, int] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total.get(name, 0) + value
    return total


class ConnectionStats:
    """The counts of one thread serving a kernel connection; written by that thread only.

    ``counts`` holds a slot per command in ``COMMANDS``, then the bytes read,
    then the error replies; ``latency`` a slot per bound, then one past the last.
    """

    READ_BYTES = len(COMMANDS)
    ERRORS = READ_BYTES + 1

    def __init__(self, device: DeviceStats | None = None) -> None:
        self.counts = [0] * (len(COMMANDS) + 2)
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_ns = 0
        #: when the request being served started (monotonic ns); 0 between requests (the watchdog looks)
        self.started = 0
        self._device = device

    def sibling(self) -> ConnectionStats:
        """The counts of another thread serving the same connection: the same device's, when there is one."""
        return self._device.connection() if self._device is not None else ConnectionStats()

    def took(self, ns: int) -> None:
        self.latency[bisect.bisect_left(_BOUNDS_NS, ns)] += 1
        self.latency_ns += ns

    def failed(self, message: str) -> None:
        """An error reply was sent: counted, and kept as the device's last error."""
        self.counts[self.ERRORS] += 1
        if self._device is not None:
            self._device.failed(message, time.time())


class DeviceStats:
    """A daemon's connections, its source's counters and its last error, as one mapping for ``stats``."""

    def __init__(self, carried: Mapping[str, Any] | None = None) -> None:
        self.connections: list[ConnectionStats] = []
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        #: what a daemon handed its device over with (``restart``): its totals go on from there
        self.carried = dict(carried or {})
        if self.carried.get("latency", {}).get("bounds") != list(LATENCY_BOUNDS):
            self.carried.pop("latency", None)  # another version's buckets: they cannot be added

    def connection(self) -> ConnectionStats:
        stats = ConnectionStats(self)
        self.connections.append(stats)
        return stats

    def failed(self, message: str, when: float) -> None:
        self.last_error, self.last_error_time = message, when

    def snapshot(self, source_counters: Mapping[str, int]) -> dict[str, Any]:
        counts = [sum(c.counts[i] for c in self.connections) for i in range(len(COMMANDS) + 2)]
        latency = [sum(c.latency[i] for c in self.connections) for i in range(len(LATENCY_BOUNDS) + 1)]
        old = self.carried
        requests = merged(dict(zip(COMMANDS, counts, strict=False)), old.get("requests", {}))
        carried_latency = old.get("latency", {})
        return {
            "requests": requests,
            "read_bytes": counts[ConnectionStats.READ_BYTES] + old.get("read_bytes", 0),
            "errors": counts[ConnectionStats.ERRORS] + old.get("errors", 0),
            "latency": {
                "bounds": list(LATENCY_BOUNDS),
                "counts": [a + b for a, b in zip(latency, carried_latency.get("counts", [0] * len(latency)),
                                                 strict=True)],
                "sum_seconds": sum(c.latency_ns for c in self.connections) / 1e9
                + carried_latency.get("sum_seconds", 0.0),
            },
            "source": merged(source_counters, old.get("source", {})),
            "last_error": self.last_error or old.get("last_error"),
            "last_error_time": self.last_error_time or old.get("last_error_time"),
        }


# -- Prometheus text format -------------------------------------------------------

_NAME = re.compile(r"[^a-zA-Z0-9_]")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Mapping[str, str], float]]) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for suffix, labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        number = str(value) if isinstance(value, int) else repr(float(value))  # %g would round 1052672
        lines.append(f"{name}{suffix}{{{text}}} {number}" if text else f"{name}{suffix} {number}")
    return "\n".join(lines)


def prometheus(devices: Mapping[str, Mapping[str, Any]]) -> str:
    """The text exposition format for ``{device: stats or {}}``; ``{}`` is a device whose daemon is gone."""
    live = {d: s for d, s in devices.items() if s}
    blocks = [
        _metric("erofs_mount_daemon_up", "gauge", "1 while a daemon serves the device, 0 when it is gone.",
                (("", {"device": d}, 1 if s else 0) for d, s in devices.items())),
        _metric("erofs_mount_requests_total", "counter", "NBD requests answered, by command.",
                (("", {"device": d, "command": c}, n) for d, s in live.items() for c, n in s["requests"].items())),
        _metric("erofs_mount_read_bytes_total", "counter", "Bytes sent in read replies.",
                (("", {"device": d}, s["read_bytes"]) for d, s in live.items())),
        _metric("erofs_mount_errors_total", "counter", "Requests answered with an error (EIO: the source failed).",
                (("", {"device": d}, s["errors"]) for d, s in live.items())),
        _metric("erofs_mount_request_duration_seconds", "histogram",
                "Time from a request's arrival to its reply.", _histogram(live)),
    ]
    counters = sorted({name for s in live.values() for name in s["source"]})
    for name in counters:
        blocks.append(_metric(f"erofs_mount_source_{_NAME.sub('_', name)}_total", "counter",
                              f"Counted by the device's source: {name}.",
                              (("", {"device": d}, s["source"].get(name, 0)) for d, s in live.items())))
    return "\n".join(blocks) + "\n"


def _histogram(live: Mapping[str, Mapping[str, Any]]) -> Iterable[tuple[str, Mapping[str, str], float]]:
    for device, stats in live.items():
        latency = stats["latency"]
        running = 0
        for bound, count in zip([*latency["bounds"], "+Inf"], latency["counts"], strict=True):
            running += count
            yield "_bucket", {"device": device, "le": str(bound)}, running
        yield "_sum", {"device": device}, latency["sum_seconds"]
        yield "_count", {"device": device}, running
