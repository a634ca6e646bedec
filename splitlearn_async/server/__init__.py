"""The trunk server: :class:`AsyncGRPCComputeServer`, its :class:`ServerConfig` and :class:`SessionStore`.

Names load on first use (PEP 562), so ``splitlearn --help`` and :class:`ServerProcess`
do not import grpc or torch; :class:`AsyncGRPCComputeServer` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AsyncGRPCComputeServer": "splitlearn_async.server._service",
    "ServerConfig": "splitlearn_async.server._config",
    "ServerProcess": "splitlearn_async.server._process",
    "Session": "splitlearn_async.server._sessions",
    "SessionStore": "splitlearn_async.server._sessions",
    "SessionTooLong": "splitlearn_async.server._sessions",
    "StoreFull": "splitlearn_async.server._sessions",
    "add_serve_arguments": "splitlearn_async.server._cli",
    "serve_main": "splitlearn_async.server._cli",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazy names, listed once above)

if TYPE_CHECKING:
    from ._cli import add_serve_arguments as add_serve_arguments
    from ._cli import serve_main as serve_main
    from ._config import ServerConfig as ServerConfig
    from ._process import ServerProcess as ServerProcess
    from ._service import AsyncGRPCComputeServer as AsyncGRPCComputeServer
    from ._sessions import Session as Session
    from ._sessions import SessionStore as SessionStore
    from ._sessions import SessionTooLong as SessionTooLong
    from ._sessions import StoreFull as StoreFull


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitlearn_async.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
