"""Where a failed gRPC call becomes an error of our tree, on the client's side.

The class comes from the one status table (:mod:`splitlearn_async.protocol.status`), the
message keeps the server's sentence; call sites write
``raise translate_rpc_error(exc, what) from exc``.
"""

from __future__ import annotations

import grpc

from ..errors import TrunkError
from ..protocol.status import error_for, is_retryable

__all__ = ["is_retryable", "status_error", "translate_rpc_error"]


def status_error(code: grpc.StatusCode | None, details: str | None, what: str) -> TrunkError:
    """The error of our tree for a status ``code`` with the server's ``details``.

    Args:
        code: The gRPC status code (``None`` is treated as ``UNKNOWN``).
        details: The server's sentence, if any.
        what: What the client was doing, e.g. ``"decode step 7 of session ab12"``.

    Returns:
        A :class:`TrunkError` subclass instance (not raised), with the code as ``.code``.
    """
    code = code or grpc.StatusCode.UNKNOWN
    text = (details or "").strip() or "no details"
    error = error_for(code)(f"{what} failed with {code.name}: {text}")
    error.code = code
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
