"""How server handlers end a call: a status code with a whole sentence."""

from __future__ import annotations

from typing import NoReturn

import grpc

__all__ = ["abort", "sentence"]


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code`` and ``details`` (a whole sentence); never returns."""
    await context.abort(code, details)
    raise RuntimeError("context.abort returned instead of raising")  # pragma: no cover


def sentence(exc: BaseException) -> str:
    """The exception's message as a sentence ending with a full stop."""
    text = str(exc).strip() or type(exc).__name__
    return text if text.endswith((".", "?", "!")) else text + "."
