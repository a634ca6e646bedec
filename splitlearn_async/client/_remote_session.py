"""``RemoteTrunkSession``: one ``Session`` stream to a trunk server, replayed if it breaks.

The stream's first message carries the prompt's hidden states and each next one a decode
step; the trunk's KV cache lives on the server for as long as the stream does.

- A session whose stream broke (``UNAVAILABLE``) opens a new stream and replays every
  message it had sent, in order and one by one, so the server rebuilds the same cache
  with the same kernels and the output is identical to an undisturbed run.
- A message unanswered within ``ClientConfig.step_timeout_s`` cancels the stream (the
  server frees its session) and raises :class:`TrunkTimeout`.
- Cancelling the awaiting task cancels the stream; the server frees the session.

The deadlines are ``asyncio.wait_for``, not anyio cancel scopes: anyio tells its own
cancellation from a foreign one by the ``CancelledError``'s message, and grpc.aio drops
that message when the cancellation lands while a stream starts (its first message), so a
scope's deadline there would let a bare ``CancelledError`` out instead of timing out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import grpc
import torch

from .. import protocol as proto
from ..errors import ClientClosed, ConfigError, TrunkError, TrunkTimeout, TrunkUnavailable, WireError
from ._connection import Connection, SessionCall, StreamBroken, parse_trunk_result
from ._errors import is_retryable, status_error
from ._trunk import TrunkSession

__all__ = ["RemoteTrunkSession"]

logger = logging.getLogger(__name__)

#: Longest wait, in seconds, for the server to answer ``close`` before the stream is cancelled.
CLOSE_TIMEOUT_S = 5.0


class RemoteTrunkSession(TrunkSession):
    """One ``Session`` stream of a :class:`RemoteTrunk`; the trunk's KV cache lives on the server.

    Use as ``async with await trunk.open_session() as session:``; leaving the block sends
    ``close`` (or cancels the stream if it is unhealthy) so the server frees the cache.

    Args:
        connection: The client's connection (channel, deadlines, retries).
        adapter_id: The server's LoRA adapter to run with; ``None`` uses the base weights.
        on_close: Called with the session when it closes (the client forgets it).
    """

    def __init__(
        self,
        connection: Connection,
        adapter_id: str | None = None,
        on_close: Callable[[RemoteTrunkSession], None] | None = None,
    ) -> None:
        self._connection = connection
        self._on_close = on_close
        self.adapter_id = adapter_id
        self.session_id = uuid.uuid4().hex[:16]
        self._call: SessionCall | None = None  # while a stream is open
        self._sent: list[bytes] = []  # bodies answered so far, for replay (open first)
        self._steps = 0
        self._closed = False
        self.replays = 0  #: completed replays: times this session reopened its stream and rebuilt the cache
        self.bytes_sent = 0  #: message bytes this session sent (replays not counted)
        self.bytes_received = 0  #: reply bytes it received

    @property
    def steps(self) -> int:
        """Calls answered so far (the prompt counts as one)."""
        return self._steps

    async def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        beam_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Send the next tokens' hidden states and return the trunk's output.

        Args:
            hidden: ``(B, T, H)`` bottom output of the new tokens (the prompt first, then steps).
            attention_mask: ``(B, T)`` validity of the new tokens.
            position_ids: ``(B, T)`` their positions.
            beam_idx: ``(B,)`` parent rows (beam search): the server reorders the session's
                cache by them before this step. It travels in the ``step`` message, which the
                session keeps for replay, so a replayed stream rebuilds the same cache.

        Returns:
            ``(B, T, H)`` trunk output, in ``hidden``'s dtype.

        Raises:
            ConfigError: ``beam_idx`` comes with the prompt (there is no cache to reorder yet).
            ClientClosed: the session or its client has been closed.
            TrunkTimeout: no answer within ``step_timeout_s``.
            TrunkUnavailable: the server stayed unreachable for ``retry_deadline_s``.
            TrunkError: any other failure, by status code (see the error tree).
        """
        if self._closed:
            raise ClientClosed("Cannot run a step on this trunk session, as it has been closed.")
        connection = self._connection
        connection.check_open("run a step")
        if self._steps == 0:
            if beam_idx is not None:
                raise ConfigError(
                    "beam_idx reorders the trunk's cache, so the prompt (the first forward) cannot carry it."
                )
            body = proto.build_open(
                hidden,
                attention_mask,
                position_ids,
                session_id=self.session_id,
                wire_dtype=connection.wire_dtype,
                adapter_id=self.adapter_id,
            )
            what = f"the prompt of trunk session {self.session_id}"
        else:
            body = proto.build_step(
                hidden, attention_mask, position_ids, wire_dtype=connection.wire_dtype, beam_idx=beam_idx
            )
            what = f"step {self._steps} of trunk session {self.session_id}"
        reply = await connection.retrying(lambda: self._attempt(body, what), what)
        self.bytes_sent += len(body)
        self.bytes_received += len(reply)
        result = parse_trunk_result(reply, what)
        out = result.hidden_states  # (B, T, H)
        if out is None or tuple(out.shape) != tuple(hidden.shape):
            got = None if out is None else list(out.shape)
            raise TrunkError(
                f"the server answered {what} with hidden states of shape {got}, expected {list(hidden.shape)}."
            )
        if connection.config.replay:
            self._sent.append(body)
        self._steps += 1
        return out.to(hidden.dtype)

    async def _attempt(self, body: bytes, what: str) -> bytes:
        """Send ``body`` on the stream (opening it and replaying the history if needed)."""
        call = self._call
        if call is None:
            if self._steps > 0 and not self._connection.config.replay:
                raise TrunkUnavailable(
                    f"{what} failed: the stream to {self._connection.address} broke and ClientConfig.replay is off, "
                    "so the server's cache cannot be rebuilt; start the generation again."
                )
            call = self._call = self._connection.open_stream()
            if self._sent:
                logger.info("trunk session %s: replaying %d messages on a new stream", self.session_id, len(self._sent))
                for i, old in enumerate(self._sent):
                    await self._exchange(call, old, f"replay of message {i} of trunk session {self.session_id}")
                self.replays += 1
                self._connection.replays += 1
        return await self._exchange(call, body, what)

    async def _exchange(self, call: SessionCall, body: bytes, what: str) -> bytes:
        """Write one message and read its reply within the step deadline.

        Raises:
            TrunkTimeout: no reply within ``step_timeout_s`` (the stream is cancelled).
            StreamBroken: the stream ended with ``UNAVAILABLE`` (the caller retries).
            TrunkError: the stream ended with another status.
        """
        timeout = self._connection.config.step_timeout_s
        try:
            return await asyncio.wait_for(_write_read(call, body), timeout)
        except asyncio.TimeoutError:
            self._drop()
            raise TrunkTimeout(
                f"{what} got no answer within step_timeout_s={timeout} s; the session was cancelled "
                "(raise ClientConfig.step_timeout_s for slow servers or long prompts)."
            ) from None
        except StreamBroken as broken:
            self._drop()
            if is_retryable(broken.code):
                raise
            raise status_error(broken.code, broken.details, what) from None
        except BaseException:  # cancellation: end the stream so the server frees the cache
            self._drop()
            raise

    def _drop(self) -> None:
        """Cancel and forget the current stream (the server frees the session)."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def aclose(self) -> None:
        """Close the session: send ``close`` on a healthy stream, else cancel it (idempotent).

        Waits at most :data:`CLOSE_TIMEOUT_S` for the server's answer; the stream is
        cancelled afterwards either way, so the server frees the session.
        """
        if self._closed:
            return
        self._closed = True
        self._sent = []
        if self._on_close is not None:
            self._on_close(self)
        call, self._call = self._call, None
        if call is None:
            return
        try:
            await asyncio.wait_for(_close_stream(call), CLOSE_TIMEOUT_S)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError, WireError):
            pass  # the stream is cancelled below; the server frees the session either way
        finally:
            call.cancel()


async def _write_read(call: SessionCall, body: bytes) -> bytes:
    """Write one message on ``call`` and read its reply.

    Raises:
        StreamBroken: the stream ended (with ``UNAVAILABLE`` if it ended between two messages).
    """
    try:
        await call.write(body)
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
        # The stream ended between two of our messages (every answer of ours was read,
        # so it was no refusal of our input): the server stopped or the connection
        # broke. grpc reports that as a local INTERNAL error; treat it as UNAVAILABLE,
        # so the session reopens and replays (a refusal would then come back as such).
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        raise StreamBroken(grpc.StatusCode.UNAVAILABLE, f"the stream ended before this message ({detail})") from exc
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise StreamBroken(exc.code(), exc.details()) from exc
    if not isinstance(reply, bytes):  # grpc.aio.EOF: the stream ended with a status
        code = await call.code()
        details = await call.details()
        if code is grpc.StatusCode.OK:  # pragma: no cover (the server never ends a stream early)
            code, details = grpc.StatusCode.UNAVAILABLE, "the server ended the stream without an answer"
        raise StreamBroken(code, details)
    return reply


async def _close_stream(call: SessionCall) -> None:
    """Send ``close`` and read the server's last answer."""
    await call.write(proto.build_close())
    reply = await call.read()
    if isinstance(reply, bytes):  # else grpc.aio.EOF: the stream ended already
        proto.parse_result(reply)
    await call.done_writing()
