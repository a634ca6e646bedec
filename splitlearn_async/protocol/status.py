"""The one table between our exception tree and gRPC status codes, for server and client.

The server ends a failed call with the code of the first row whose class the error is an
instance of (:func:`status_for`); the client turns a code back into the class of the first
row with that code (:func:`error_for`). So a ``PreconditionFailed`` raised by the server's
training host reaches the user as a ``PreconditionFailed``, and a ``WireError`` (a server-side
refusal of malformed input) reaches the user as a ``TrunkRejected``.

An error that matches no row is a bug on the server's side: it is logged there and answered
with ``INTERNAL``, which the client reads as a plain :class:`~splitlearn_async.errors.TrunkError`.
"""

from __future__ import annotations

import grpc

from splitlearn_async.errors import (
    AlreadyExists,
    CheckpointError,
    ConfigError,
    PreconditionFailed,
    SessionNotFound,
    TrunkBusy,
    TrunkError,
    TrunkRejected,
    TrunkTimeout,
    TrunkUnavailable,
    Unauthenticated,
    WireError,
    WorkerDied,
    WorkerStopped,
)

__all__ = ["STATUS_TABLE", "error_for", "is_retryable", "status_for"]

_Code = grpc.StatusCode

#: ``(error class, status code)`` rows, most specific class first. The client reads a
#: code as the first row's class with that code; the server answers an error with the
#: first row whose class it is an instance of.
STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    # errors of the trunk, the same class on both sides of the wire
    (Unauthenticated, _Code.UNAUTHENTICATED),
    (PreconditionFailed, _Code.FAILED_PRECONDITION),
    (AlreadyExists, _Code.ALREADY_EXISTS),
    (SessionNotFound, _Code.NOT_FOUND),
    (TrunkBusy, _Code.RESOURCE_EXHAUSTED),
    (TrunkTimeout, _Code.DEADLINE_EXCEEDED),
    (TrunkUnavailable, _Code.UNAVAILABLE),
    (TrunkRejected, _Code.INVALID_ARGUMENT),
    # codes our server does not send, which other gRPC servers or proxies may
    (TrunkRejected, _Code.OUT_OF_RANGE),
    (Unauthenticated, _Code.PERMISSION_DENIED),
    # server-side errors, read back by the client as the trunk error of the same code
    (WorkerStopped, _Code.UNAVAILABLE),
    (WorkerDied, _Code.UNAVAILABLE),
    (WireError, _Code.INVALID_ARGUMENT),
    (ConfigError, _Code.INVALID_ARGUMENT),
    (CheckpointError, _Code.INVALID_ARGUMENT),
    (ValueError, _Code.INVALID_ARGUMENT),  # torch refused the input: shapes, NaN
)

_ERROR_OF: dict[grpc.StatusCode, type[TrunkError]] = {}
for _cls, _code in STATUS_TABLE:
    if issubclass(_cls, TrunkError):
        _ERROR_OF.setdefault(_code, _cls)


def status_for(error: BaseException) -> grpc.StatusCode | None:
    """The status code the server answers ``error`` with; None if no row matches (a bug: INTERNAL)."""
    for cls, code in STATUS_TABLE:
        if isinstance(error, cls):
            return code
    return None


def error_for(code: grpc.StatusCode | None) -> type[TrunkError]:
    """The class of our tree the client raises for ``code``; :class:`TrunkError` for any other code."""
    return _ERROR_OF.get(code or _Code.UNKNOWN, TrunkError)


def is_retryable(code: grpc.StatusCode | None) -> bool:
    """True only for ``UNAVAILABLE``: the server is down, restarting or shutting down.

    Every other status (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``RESOURCE_EXHAUSTED``...)
    would fail the same way again, so it is never retried.
    """
    return code is _Code.UNAVAILABLE
