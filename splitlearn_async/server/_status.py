"""How the server's handlers end a failed call: the status table, a sentence, and a log line for bugs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from splitlearn_async.errors import StateError, WorkerDied, WorkerStopped
from splitlearn_async.protocol.status import status_for

__all__ = ["abort", "abort_for", "cancel_and_wait", "guarded", "guarded_stream", "guarded_upload", "sentence"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Q = TypeVar("Q")
#: A unary-reply handler: its request (a body, or a stream of bodies) and context in, a reply body out.
Handler = Callable[[Q, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


async def abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code`` and ``details`` (a whole sentence); never returns."""
    await context.abort(code, details)
    raise StateError("context.abort returned instead of raising")  # pragma: no cover


def sentence(exc: BaseException) -> str:
    """The exception's message as a sentence ending with a full stop."""
    text = str(exc).strip() or type(exc).__name__
    return text if text.endswith((".", "?", "!")) else text + "."


async def abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, what: str) -> NoReturn:
    """End the call for ``exc``: its code from the status table and its sentence.

    An error that matches no row of the table is a bug on this side: it is logged with
    its traceback and answered with ``INTERNAL``, naming ``what`` failed.
    """
    code = status_for(exc)
    if code is None:
        logger.error("%s failed", what, exc_info=exc)
        await abort(context, grpc.StatusCode.INTERNAL, f"the trunk failed on {what}: {type(exc).__name__}: {exc}.")
    if isinstance(exc, (WorkerStopped, WorkerDied)):
        await abort(context, code, f"the trunk worker is not running ({exc}); retry on another server.")
    await abort(context, code, sentence(exc))


def guarded(handler: Handler[Q], what: str) -> Handler[Q]:
    """``handler`` with every error it raises answered by :func:`abort_for`."""

    async def call(request: Q, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            return await handler(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_for(context, exc, what)

    return call


#: How long :func:`guarded_upload` waits for each further message of a refused upload.
DRAIN_IDLE_S = 1.0


def guarded_upload(
    handler: Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]],
    what: str,
    drain_bytes: int,
) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]:
    """A client-streaming ``handler`` with every error answered by :func:`abort_for`, after a drain.

    A call refused while the client is still writing (a taken name, after the header) must
    not end before the client has finished: gRPC would then sometimes end it with INTERNAL
    ("Internal error from Core") instead of our status. So the rest of the stream is read
    and dropped first -- at most ``drain_bytes``, each message within ``DRAIN_IDLE_S`` --
    and only then is the call ended with the error's status and sentence. Nothing read is
    kept or decoded.
    """

    async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            return await handler(requests, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _drain(requests, drain_bytes)
            await abort_for(context, exc, what)

    return call


async def _drain(requests: AsyncIterator[bytes], limit: int) -> None:
    """Read and drop the rest of ``requests``: until its end, ``limit`` bytes, or an idle second."""
    seen = 0
    with contextlib.suppress(Exception):  # a broken or cancelled stream: nothing more to drain
        while seen <= limit:
            body = await asyncio.wait_for(anext(requests, None), DRAIN_IDLE_S)
            if body is None:
                return
            seen += len(body)


async def guarded_stream(
    replies: AsyncGenerator[T, None], context: grpc.aio.ServicerContext[Any, Any], what: str
) -> AsyncGenerator[T, None]:
    """The replies of a streaming handler, with every error it raises answered by :func:`abort_for`.

    ``replies`` is closed when the stream ends for any reason, so its ``finally`` runs at once.
    """
    try:
        async for reply in replies:
            yield reply
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await abort_for(context, exc, what)
    finally:
        await replies.aclose()


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
