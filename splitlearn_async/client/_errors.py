"""The one place where ``grpc.aio.AioRpcError`` becomes an error of our tree.

Every gRPC failure seen by the client passes through :func:`translate_rpc_error`, which
picks the :class:`~splitlearn_async.errors.TrunkError` subclass by status code and keeps
the server's sentence; call sites write ``raise translate_rpc_error(exc, what) from exc``.
"""

from __future__ import annotations

import grpc

from ..errors import (
    SessionNotFound,
    TrunkBusy,
    TrunkError,
    TrunkRejected,
    TrunkTimeout,
    TrunkUnavailable,
    Unauthenticated,
)

__all__ = ["translate_rpc_error", "is_retryable", "status_error"]

_Code = grpc.StatusCode

_BY_CODE: dict[grpc.StatusCode, type[TrunkError]] = {
    _Code.UNAVAILABLE: TrunkUnavailable,
    _Code.DEADLINE_EXCEEDED: TrunkTimeout,
    _Code.RESOURCE_EXHAUSTED: TrunkBusy,
    _Code.INVALID_ARGUMENT: TrunkRejected,
    _Code.FAILED_PRECONDITION: TrunkRejected,
    _Code.OUT_OF_RANGE: TrunkRejected,
    _Code.NOT_FOUND: SessionNotFound,
    _Code.UNAUTHENTICATED: Unauthenticated,
    _Code.PERMISSION_DENIED: Unauthenticated,
}


def is_retryable(code: grpc.StatusCode | None) -> bool:
    """True only for ``UNAVAILABLE``: the server is down, restarting or shutting down.

    Every other status (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``RESOURCE_EXHAUSTED``...)
    would fail the same way again, so it is never retried.
    """
    return code is _Code.UNAVAILABLE


def status_error(code: grpc.StatusCode | None, details: str | None, what: str) -> TrunkError:
    """The error of our tree for a status ``code`` with the server's ``details``.

    Args:
        code: The gRPC status code (``None`` is treated as ``UNKNOWN``).
        details: The server's sentence, if any.
        what: What the client was doing, e.g. ``"decode step 7 of session ab12"``.

    Returns:
        A :class:`TrunkError` subclass instance (not raised).
    """
    code = code or _Code.UNKNOWN
    cls = _BY_CODE.get(code, TrunkError)
    text = (details or "").strip() or "no details"
    error = cls(f"{what} failed with {code.name}: {text}")
    error.code = code  # type: ignore[attr-defined]
    return error


def translate_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> TrunkError:
    """Translate a failed gRPC call into our exception tree.

    Args:
        exc: The error grpc.aio raised.
        what: What the client was doing, for the message.

    Returns:
        The :class:`TrunkError` to raise (``raise translate_rpc_error(exc, what) from exc``).
    """
    return status_error(exc.code(), exc.details(), what)
