"""What watch's log says of the events it hears (its reattaching is tests/vm/test_operations.py's)."""

from __future__ import annotations

import logging

import pytest

from erofs_mount_core import _watch


class Events:
    def __init__(self, *batches: list[int]) -> None:
        self.batches = list(batches)

    def read(self) -> list[int]:
        return self.batches.pop(0)


def watcher(events: Events) -> _watch.Watcher:
    w = object.__new__(_watch.Watcher)  # no netlink socket, no plugins: only the bookkeeping under test
    w.events, w.due, w.dying, w.died, w.reattached = events, {}, {}, {}, {}
    return w


def test_the_replaced_daemon_s_other_connections_ending_are_said_for_what_they_are(
        caplog: pytest.LogCaptureFixture) -> None:
    w = watcher(Events([0], [0, 0]))
    with caplog.at_level(logging.INFO, logger="erofs_mount.watch"):
        w.heard(100.0)
        w._forget(0)
        w.reattached[0] = 101.0  # as look() notes a reattach it made
        w.heard(102.0)  # the old daemon's other connections: events too
    said = [r.message for r in caplog.records]
    assert said[0] == "nbd0: a connection died"
    assert said[1:] == ["nbd0: a connection of the daemon it replaced ended (the device is served)"] * 2
    assert w.due == {0: 102.0}, "the device is still looked at: a real death is reattached all the same"
