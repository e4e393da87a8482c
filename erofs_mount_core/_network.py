"""What every source that speaks a network protocol needs alike: the failures no retry can change (a source
stops at once at these), and answers read no further than their bound."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from ._errors import SourceError

#: getaddrinfo's answers that a retry cannot change: the name does not exist (a temporary failure, EAI_AGAIN,
#: is retried)
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)}


def final_network_error(exc: BaseException, host: str) -> str | None:
    """Why retrying ``exc`` (a transport failure reaching ``host``) cannot help, with what to do; None if a
    retry may (a refused or reset connection, a timeout: a server that is starting or busy)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_NAME:
            return f"{host} cannot be resolved ({cause.strerror}): check its name"
        cause = cause.__cause__ or cause.__context__
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return f"{host}'s TLS certificate is not trusted (give its CA bundle with -o ca=PATH)"
    return None


def read_capped(chunks: Iterable[bytes], cap: int, what: str, *, declared: str = "", transient: bool = False,
                failures: tuple[type[BaseException], ...] = ()) -> bytes:
    """An answer's body from its ``chunks``, if it is at most ``cap`` bytes: SourceError as soon as it is more
    (a ``declared`` Content-Length over ``cap`` before a byte is read), never read whole. ``failures``: the HTTP
    library's errors while reading, each a transient SourceError."""
    if declared.isdigit() and int(declared) > cap:
        raise SourceError(f"{what}: the answer is {declared} bytes, more than the {cap} expected", transient=transient)
    got, body = 0, []
    try:
        for chunk in chunks:
            got += len(chunk)
            if got > cap:
                raise SourceError(f"{what}: the answer is more than the {cap} bytes expected", transient=transient)
            body.append(chunk)
    except failures as exc:
        raise SourceError(f"{what}: {type(exc).__name__}: {exc}", transient=True) from None
    return b"".join(body)
