"""Prefetch: the order in which an image's layers were first read, recorded by its serving daemon, and replayed
in the background by the next mount of that image, behind the kernel's own reads.

A unit is a piece of one layer's stream: a span of an archive layer (the
span its index hashes, 1 MiB) or 256 KiB of a TOC layer's files. The daemon
notes each unit the kernel reads for the first time, in order, up to
``MAX_ENTRIES``, and keeps the list in the cache under the image manifest's
digest (``prefetch/<hex>.json``), written every few seconds and when it ends;
``erofs-mount index push --prefetch-from MOUNTPOINT`` publishes it with the
image's indexes, so a fresh host gets it too.

A mount that finds a list (its own in the cache, else the published one)
fetches its units in order, ``WORKERS`` at a time, once it serves. A read
the kernel waits for never queues behind a fetch of other bytes (one that
needs a unit being prefetched waits for that fetch instead of making a
second one): an archive layer's units are
fetched by a decoder of their own and land in the span store, where the
kernel's reads find them (without a span store there is nowhere to put them,
and such layers are not prefetched); a TOC layer's through its chunk
reader, which fetches without holding a lock, into its memory cache, up to
what that cache holds. A unit the kernel read first is skipped. Every unit is
checked against its hash like any other read, so a list can waste bytes
but never change one; its size is bounded and every field checked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence

import attrs

from erofs_mount_core import (
    Counters,
    Filter,
    RetryPolicy,
    Source,
    SourceError,
    cache_directory,
    open_cache_file,
    write_cache_file,
)

log = logging.getLogger("erofs_mount.oci")

PREFETCH_DIR = "prefetch"
MEDIA_TYPE = "application/vnd.erofs-mount.prefetch.v1+json"
#: a TOC layer's unit (an archive layer's is its index's span): its files are small, read whole
TOC_UNIT = 256 << 10
#: the most one prefetch fetches at once: units the plan names one after another, in one request
RUN_BYTES = 4 << 20
#: a list's bounds: units, bytes, layers
MAX_ENTRIES, MAX_LIST_BYTES, MAX_LAYERS = 1 << 16, 4 << 20, 1024
MAX_READ = 4 * MAX_ENTRIES  # units whose first read is remembered (for hits and waste): memory bounded
KINDS = ("archive", "toc")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@attrs.frozen
class LayerUnits:
    """How a layer's stream is cut into units: its blob's digest, what its stream is, the unit's size."""

    digest: str
    kind: str
    unit: int


@attrs.frozen
class PrefetchList:
    """Units in first-read order: (the layer's position in ``layers``, the unit's number in its stream)."""

    layers: tuple[LayerUnits, ...]
    entries: tuple[tuple[int, int], ...]

    def to_bytes(self) -> bytes:
        return json.dumps({"version": 1, "layers": [attrs.asdict(layer) for layer in self.layers],
                           "entries": [list(entry) for entry in self.entries]}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> PrefetchList:
        """A list from untrusted bytes (the cache, a registry): ValueError unless every field is sound."""
        if len(data) > MAX_LIST_BYTES:
            raise ValueError(f"a prefetch list of {len(data)} bytes, more than {MAX_LIST_BYTES}")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("not a version 1 prefetch list")
        rows, entries = doc.get("layers"), doc.get("entries")
        if not isinstance(rows, list) or not isinstance(entries, list) or len(rows) > MAX_LAYERS \
                or len(entries) > MAX_ENTRIES:
            raise ValueError("its layers or entries are missing or too many")
        layers = []
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("digest"), str) \
                    or not _DIGEST.fullmatch(row["digest"]) or row.get("kind") not in KINDS \
                    or type(row.get("unit")) is not int or not 4096 <= row["unit"] <= 64 << 20:
                raise ValueError(f"a layer row that is not one: {str(row)[:80]}")
            layers.append(LayerUnits(row["digest"], row["kind"], row["unit"]))
        seen: set[tuple[int, int]] = set()
        kept = []
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 2 or any(type(v) is not int for v in entry) \
                    or not 0 <= entry[0] < len(layers) or not 0 <= entry[1] < 1 << 40:
                raise ValueError(f"an entry that is not one: {str(entry)[:80]}")
            pair = (entry[0], entry[1])
            if pair not in seen:
                seen.add(pair)
                kept.append(pair)
        return cls(tuple(layers), tuple(kept))

    def for_layers(self, layers: Sequence[LayerUnits]) -> list[tuple[int, int]]:
        """The entries that apply to ``layers`` (the image as this host opened it), as (position, unit):
        a layer cut otherwise here (indexed, where the list's host used its TOC) is left out."""
        position = {layer: n for n, layer in enumerate(layers)}
        mapped = [position.get(layer) for layer in self.layers]
        return [(to, unit) for at, unit in self.entries if (to := mapped[at]) is not None]


def list_name(manifest_digest: str, layer: int | None = None) -> str:
    """Whose list: the whole image's, or (``-o layer=N``) one layer's, by the image manifest's digest."""
    if not _DIGEST.fullmatch(manifest_digest):
        raise ValueError(f"not a sha256 digest: {manifest_digest[:80]}")
    return manifest_digest.removeprefix("sha256:") + ("" if layer is None else f"-layer{int(layer)}")


def cached(name: str) -> PrefetchList | None:
    """The list a daemon kept here under ``name`` (``list_name``), if any (a damaged one is none)."""
    fd = open_cache_file(cache_directory(PREFETCH_DIR) / f"{name}.json")
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_LIST_BYTES + 1)
    try:
        return PrefetchList.from_bytes(data)
    except ValueError as exc:
        log.warning("prefetch list %s in the cache: %s; not used", name, exc)
        return None


def keep(name: str, found: PrefetchList) -> None:
    write_cache_file(cache_directory(PREFETCH_DIR) / f"{name}.json", found.to_bytes())


#: fetches ``count`` units of a layer from unit ``first`` on into where the kernel's reads look first; the bytes
Fetcher = Callable[[int, int], int]


#: units fetched at once
WORKERS = 4
#: how often a serving daemon writes its list when it grew
FLUSH_EVERY = 5.0
#: the longest a read waits for a prefetch of its own bytes (one fetch and its retries); then it fetches them
UNDER_WAY_WAIT = 30.0


class ReadOrder:
    """One image's prefetch: it records the units the kernel reads first (kept under ``name``), and replays
    ``replay`` with ``fetchers`` (one per layer; None: the layer is not prefetched), each up to its budget
    of bytes, from ``start`` until ``close``."""

    def __init__(self, name: str, layers: Sequence[LayerUnits], replay: PrefetchList | None,
                 fetchers: Sequence[Fetcher | None], budgets: Sequence[int]) -> None:
        self.name, self.layers = name, tuple(layers)
        self.fetchers, self.budgets = list(fetchers), list(budgets)
        self.plan = replay.for_layers(self.layers) if replay is not None else []
        self._order: list[tuple[int, int]] = []
        self._read: set[tuple[int, int]] = set()
        self._prefetched: set[tuple[int, int]] = set()
        self._fetching: dict[tuple[int, int], threading.Event] = {}
        self._spent = [0] * len(self.layers)
        self._lock = threading.Lock()
        self._next = 0
        self._dirty = False
        self._started = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counters = Counters()

    def recorded(self, position: int, stream: Source) -> Source:
        """``stream`` (layer ``position``'s), its reads noted."""
        return _Recorded(stream, self, position, self.layers[position].unit)

    def noted(self, position: int, first: int, last: int) -> None:
        """The kernel reads units ``first`` to ``last`` of layer ``position``; returns once none of them is
        being prefetched (a read waits for a fetch of its own bytes under way, never for other bytes)."""
        if not self._started:
            return  # the command's own open: only a serving daemon's reads are the image's use
        under_way = []
        with self._lock:
            for unit in range(first, last + 1):
                key = (position, unit)
                fetching = self._fetching.get(key)
                if fetching is not None:
                    under_way.append(fetching)
                if key in self._read or len(self._read) >= MAX_READ:  # (past it, hits are counted no more)
                    continue
                self._read.add(key)
                if key in self._prefetched or fetching is not None:
                    self._counters.add("prefetch_hits")
                if len(self._order) < MAX_ENTRIES:
                    self._order.append(key)
                    self._dirty = True
        for fetching in under_way:
            fetching.wait(UNDER_WAY_WAIT)

    def start(self) -> None:
        """Once the image serves: replay the plan, and keep the order of reads in the cache."""
        if self._started:
            return
        self._started = True
        workers = WORKERS if any(self.fetchers[at] is not None for at, _ in self.plan) else 0
        for n in range(workers):
            self._spawn(self._replay, f"prefetch-{n}")
        self._spawn(self._flush_now_and_then, "prefetch-list")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _take(self) -> tuple[int, int, int] | None:
        """The next run of the plan to fetch: (layer position, first unit, how many), the run being units the
        plan names one after another, in one layer, up to ``RUN_BYTES`` (one request, one decoder pass)."""
        with self._lock:
            while self._next < len(self.plan):
                key = self.plan[self._next]
                self._next += 1
                position, unit = key
                if key in self._read or key in self._prefetched or key in self._fetching:
                    self._counters.add("prefetch_skipped")  # the kernel was there first
                elif self.fetchers[position] is not None and self._spent[position] < self.budgets[position]:
                    count = 1
                    self._fetching[key] = threading.Event()
                    while count * self.layers[position].unit < RUN_BYTES and self._next < len(self.plan):
                        after = (position, unit + count)
                        if self.plan[self._next] != after or after in self._read or after in self._fetching \
                                or after in self._prefetched:
                            break
                        self._fetching[after] = threading.Event()
                        self._next += 1
                        count += 1
                    return position, unit, count
                else:
                    self._counters.add("prefetch_passed")  # a layer not prefetched, or past its budget
            return None

    def _replay(self) -> None:
        while not self._stop.is_set() and (run := self._take()) is not None:
            position, first, count = run
            fetch = self.fetchers[position]
            assert fetch is not None
            keys = [(position, unit) for unit in range(first, first + count)]
            try:
                fetched = RetryPolicy(quiet=True).call(lambda: fetch(first, count),  # noqa: B023 - called here
                                                       f"prefetch of layer {position}")
            except SourceError as exc:
                log.warning("oci: prefetch of layer %s stopped: %s; reads fetch what they need",
                            self.layers[position].digest[:19], exc)
                self._counters.add("prefetch_passed", count)
                with self._lock:
                    self.fetchers[position] = None
                    for key in keys:
                        self._fetching.pop(key).set()
                continue
            with self._lock:
                self._spent[position] += fetched
                for key in keys:
                    self._prefetched.add(key)
                    self._fetching.pop(key).set()
            self._counters.add("prefetch_units", count)
            self._counters.add("prefetch_bytes", fetched)

    def _flush_now_and_then(self) -> None:
        while not self._stop.wait(FLUSH_EVERY):
            self.flush()

    def flush(self) -> None:
        """Keep the order of reads so far in the cache, if it grew."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            order = PrefetchList(self.layers, tuple(self._order))
        try:
            keep(self.name, order)
        except OSError as exc:
            log.warning("oci: the prefetch list was not kept (%s)", exc)

    def counters(self) -> Mapping[str, int]:
        with self._lock:
            waste = len(self._prefetched - self._read) if self._started else 0
        counted = self._counters.snapshot()
        return {**counted, "prefetch_planned": len(self.plan), "prefetch_waste": waste} if self.plan else counted

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)  # at most one unit's fetch, and its retries, are under way
        if self._started:
            self.flush()


class _Recorded(Filter):
    """A layer's stream whose reads ``order`` notes, unit by unit."""

    def __init__(self, inner: Source, order: ReadOrder, position: int, unit: int) -> None:
        super().__init__(inner)
        self.order, self.position, self.unit = order, position, unit

    def pread(self, length: int, offset: int) -> bytes | memoryview:
        if length > 0:
            self.order.noted(self.position, offset // self.unit, (offset + length - 1) // self.unit)
        return self.inner.pread(length, offset)
