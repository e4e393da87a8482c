"""containerd's filter language, as ``List`` gets it (``filters/parser.go``): what a snapshot must match.

A filter is selectors joined by ``,`` (all must hold); several filters
are alternatives (one must). A selector is a field path (``name``,
``parent``, ``kind``, ``labels.KEY``; a part may be quoted,
``labels."containerd.io/snapshot.ref"``) alone (the field is there), or with
``==``, ``!=`` or ``~=`` (a regular expression) and a value, quoted or
not. containerd's own remote-snapshot lookup is one:
``labels."containerd.io/snapshot.ref"==<chainID>,parent=="<parent>"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import grpc

from .store import KINDS, Snapshot, StoreError

_TOKEN = re.compile(r'\s*(?:(?P<quoted>"(?:[^"\\]|\\.)*")|(?P<op>==|!=|~=)|(?P<punct>[.,])|(?P<word>[^\s.,="!~]+))')
MAX_FILTER = 4096

Match = Callable[[Snapshot], bool]


def parse(filters: Sequence[str]) -> Match:
    """What a snapshot must match for ``List``; every snapshot when there is no filter."""
    alternatives = [_filter(text) for text in filters if text.strip()]
    if not alternatives:
        return lambda snapshot: True
    return lambda snapshot: any(all(selector(snapshot) for selector in one) for one in alternatives)


def _filter(text: str) -> list[Match]:
    if len(text) > MAX_FILTER:
        raise _invalid(text, "longer than 4096 bytes")
    tokens = _tokens(text)
    selectors: list[Match] = []
    while True:
        path = [_part(tokens, text)]
        while tokens and tokens[0] == ("punct", "."):
            tokens.pop(0)
            path.append(_part(tokens, text))
        if tokens and tokens[0][0] == "op":
            op = tokens.pop(0)[1]
            value = _value(tokens, text)
            selectors.append(_selector(path, op, value, text))
        else:
            selectors.append(_selector(path, None, "", text))
        if not tokens:
            return selectors
        if tokens.pop(0) != ("punct", ","):
            raise _invalid(text, "selectors are joined by ','")


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        found = _TOKEN.match(text, pos)
        if found is None:
            raise _invalid(text, f"cannot read it at {text[pos:pos + 20]!r}")
        kind = found.lastgroup or ""
        tokens.append((kind, found.group(kind)))
        pos = found.end()
    return tokens


def _part(tokens: list[tuple[str, str]], text: str) -> str:
    if not tokens or tokens[0][0] not in ("word", "quoted"):
        raise _invalid(text, "a field name is missing")
    kind, value = tokens.pop(0)
    return _unquote(value, text) if kind == "quoted" else value


def _value(tokens: list[tuple[str, str]], text: str) -> str:
    if tokens and tokens[0][0] == "quoted":
        return _unquote(tokens.pop(0)[1], text)
    words = []
    while tokens and tokens[0] != ("punct", ","):
        words.append(tokens.pop(0)[1])
    if not words:
        raise _invalid(text, "a value is missing")
    return "".join(words)


def _unquote(quoted: str, text: str) -> str:
    try:
        return str(json.loads(quoted))
    except ValueError:
        raise _invalid(text, f"{quoted[:40]} is not a quoted string") from None


def _selector(path: list[str], op: str | None, value: str, text: str) -> Match:
    def field(snapshot: Snapshot) -> str | None:
        if path == ["name"]:
            return snapshot.key
        if path == ["parent"]:
            return snapshot.parent
        if path == ["kind"]:
            return next(name for name, kind in KINDS.items() if kind == snapshot.kind)
        if path[0] == "labels" and len(path) == 2:
            return snapshot.labels.get(path[1])
        return None

    if not (path in (["name"], ["parent"], ["kind"]) or (path[0] == "labels" and len(path) == 2)):
        raise _invalid(text, f"no field {'.'.join(path)!r} (name, parent, kind, labels.KEY)")
    if op is None:
        return lambda snapshot: field(snapshot) not in (None, "")
    if op == "~=":
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise _invalid(text, f"{value!r} is not a regular expression ({exc})") from None
        return lambda snapshot: (found := field(snapshot)) is not None and pattern.search(found) is not None
    if op == "==":
        return lambda snapshot: field(snapshot) == value
    return lambda snapshot: field(snapshot) != value


def _invalid(text: str, why: str) -> StoreError:
    return StoreError(grpc.StatusCode.INVALID_ARGUMENT, f"filter {text[:200]!r}: {why}")
