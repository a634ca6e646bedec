"""The trunk server: :class:`AsyncGRPCComputeServer`, its :class:`ServerConfig` and :class:`SessionStore`.

Importing this package imports grpc and torch (unlike the top-level package).
"""

from __future__ import annotations

from splitlearn_async.server._config import ServerConfig
from splitlearn_async.server._service import AsyncGRPCComputeServer
from splitlearn_async.server._sessions import Session, SessionStore, SessionTooLong, StoreFull

__all__ = ["AsyncGRPCComputeServer", "ServerConfig", "Session", "SessionStore", "SessionTooLong", "StoreFull"]
