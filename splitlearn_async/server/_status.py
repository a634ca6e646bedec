"""Helpers shared by the server's services: ending a call with a sentence, stopping a task."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import grpc

__all__ = ["abort", "sentence", "cancel_and_wait"]


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code`` and ``details`` (a whole sentence); never returns."""
    await context.abort(code, details)
    raise RuntimeError("context.abort returned instead of raising")  # pragma: no cover


def sentence(exc: BaseException) -> str:
    """The exception's message as a sentence ending with a full stop."""
    text = str(exc).strip() or type(exc).__name__
    return text if text.endswith((".", "?", "!")) else text + "."


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
