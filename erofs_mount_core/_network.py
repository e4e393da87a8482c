"""Network failures that a retry cannot change, told apart from those it may: a source stops at once at these."""

from __future__ import annotations

import socket

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
