"""``RemoteTrunk``: the async client of a trunk server (``AsyncGRPCComputeServer``).

A :class:`RemoteTrunk` owns one ``grpc.aio`` channel. Each :meth:`RemoteTrunk.open_session`
gives a :class:`RemoteTrunkSession`: one ``Session`` stream whose first message carries the
prompt's hidden states and each next one a decode step; the trunk's KV cache lives on the
server for as long as the stream does.

Faults, in one place:

- Only ``UNAVAILABLE`` is retried (server down, restarting, shutting down), with
  exponential backoff and jitter, until ``ClientConfig.retry_deadline_s`` has passed since
  the first failure; then the caller gets :class:`TrunkUnavailable`.
- A session whose stream broke opens a new stream and replays every message it had sent,
  in order and one by one, so the server rebuilds the same cache with the same kernels
  and the output is identical to an undisturbed run.
- A call that passes ``ClientConfig.step_timeout_s`` is cancelled (the server frees its
  session) and raises :class:`TrunkTimeout`.
- Cancelling the awaiting task cancels the stream; the server frees the session.
- Every ``grpc.aio.AioRpcError`` is translated by :mod:`splitlearn_async.client._errors`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from types import TracebackType
from typing import Any, Awaitable, Callable, TypeVar

import grpc
import torch

from .. import protocol as proto
from ..errors import ClientClosed, ConfigError, TrunkError, TrunkTimeout, TrunkUnavailable, WireError
from ..wire import WIRE_DTYPES
from ._config import ClientConfig
from ._errors import is_retryable, status_error, translate_rpc_error
from ._trunk import TrunkSession

__all__ = ["RemoteTrunk", "RemoteTrunkSession"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _identity(body: bytes) -> bytes:
    return body


class _StreamBroken(Exception):
    """A ``Session`` stream ended with a status; carries the code and details."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _check_address(address: str) -> str:
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"RemoteTrunk needs an address 'host:port', got {address!r}.")
    address = address.strip()
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"RemoteTrunk address {address!r} lacks a valid port; write it as 'host:port', e.g. '127.0.0.1:50051'."
        )
    return address


class RemoteTrunk:
    """An async client of a trunk server, with the interface of :class:`LocalTrunk`.

    Use it as ``async with RemoteTrunk("127.0.0.1:50051") as trunk:`` and pass it to
    :class:`SplitPipeline`; or call :meth:`open_session`, :meth:`forward` and
    :meth:`info` yourself. The channel is created on first use, inside the running
    event loop.

    Args:
        address: ``"host:port"`` of the server.
        config: Deadlines, retries, TLS, token and wire dtype; ``None`` uses ``ClientConfig()``.

    Raises:
        ConfigError: the address has no valid port, or ``config`` is not a ClientConfig.
    """

    def __init__(self, address: str, config: ClientConfig | None = None) -> None:
        if config is None:
            config = ClientConfig()
        if not isinstance(config, ClientConfig):
            raise ConfigError(f"config must be a ClientConfig, got {type(config).__name__}.")
        self.address = _check_address(address)
        self.config = config
        self._wire_dtype = WIRE_DTYPES[config.wire_dtype] if config.wire_dtype else None
        self._metadata = (("authorization", f"Bearer {config.auth_token}"),) if config.auth_token else None
        self._channel: grpc.aio.Channel | None = None
        self._sessions: set[RemoteTrunkSession] = set()
        self._closed = False
        self.replays = 0  #: completed replays after a broken stream, over all sessions

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._closed

    @property
    def sessions_open(self) -> int:
        """Sessions opened by this client and not yet closed."""
        return len(self._sessions)

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise ClientClosed(f"Cannot {action}, as the RemoteTrunk has been closed.")

    def channel(self) -> grpc.aio.Channel:
        """The client's ``grpc.aio`` channel, created on first use (for extensions such as training).

        Raises:
            ClientClosed: the client has been closed.
        """
        self._check_open("use the channel")
        if self._channel is None:
            self._channel = self._make_channel()
        return self._channel

    def _make_channel(self) -> grpc.aio.Channel:
        c = self.config
        backoff_ms = int(c.initial_backoff_s * 1000)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", c.max_message_bytes),
            # reconnect as often as our own retries ask, not on grpc's 1 s..120 s schedule
            ("grpc.initial_reconnect_backoff_ms", max(backoff_ms, 10)),
            ("grpc.min_reconnect_backoff_ms", max(backoff_ms, 10)),
            ("grpc.max_reconnect_backoff_ms", max(int(c.max_backoff_s * 1000), 10)),
        ]
        if c.tls_server_name:
            options.append(("grpc.ssl_target_name_override", c.tls_server_name))
        if not c.uses_tls:
            return grpc.aio.insecure_channel(self.address, options=options)
        root = None
        if c.tls_root_cert_file is not None:
            with open(c.tls_root_cert_file, "rb") as f:
                root = f.read()
        return grpc.aio.secure_channel(self.address, grpc.ssl_channel_credentials(root_certificates=root), options=options)

    async def aclose(self) -> None:
        """Close every open session and the channel (idempotent)."""
        if self._closed:
            return
        for session in list(self._sessions):
            await session.aclose()
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> RemoteTrunk:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- calls ---------------------------------------------------------------------------

    async def open_session(self, adapter_id: str | None = None) -> RemoteTrunkSession:
        """A new session; its stream opens with the first :meth:`RemoteTrunkSession.forward`.

        Args:
            adapter_id: Run the trunk with this LoRA adapter loaded on the server (trained
                through :meth:`open_training` or loaded with :meth:`load_adapter`); ``None``
                uses the base weights. An unknown name fails the first ``forward`` with
                :class:`SessionNotFound`.

        Raises:
            ClientClosed: the client has been closed.
        """
        self._check_open("open a session")
        session = RemoteTrunkSession(self, adapter_id)
        self._sessions.add(session)
        return session

    async def open_training(self, mode: str = "lora", **kwargs: Any) -> Any:
        """Open a training session on the server (``TrainOpen``); see :class:`SplitTrainer`.

        Args:
            mode: ``"lora"``, ``"full"`` (the server must allow it) or ``"frozen"``.
            **kwargs: ``lora``, ``optimizer``, ``adapter_id``, ``weights``, ``optimizer_state``
                as in :meth:`LocalTrunk.open_training`.

        Returns:
            A ``RemoteTrainingSession`` with ``forward``/``backward``/``optimizer_step``/``state``.

        Raises:
            ClientClosed: the client has been closed.
            TrunkError: the server refused (see the error tree).
        """
        from ._remote_training import open_remote_training

        self._check_open("open a training session")
        return await open_remote_training(self, mode, **kwargs)

    async def load_adapter(self, adapter_id: str, weights: bytes) -> None:
        """Load a saved LoRA adapter (safetensors bytes) on the server under ``adapter_id``.

        Raises:
            ClientClosed: the client has been closed.
            TrunkError: the server refused the adapter (malformed, taken name, wrong shapes).
        """
        from ._remote_training import load_remote_adapter

        self._check_open("load an adapter")
        await load_remote_adapter(self, adapter_id, weights)

    async def delete_adapter(self, adapter_id: str) -> None:
        """Forget the server's adapter ``adapter_id`` (sessions using it keep it).

        Raises:
            ClientClosed: the client has been closed.
            SessionNotFound: no adapter of that name is loaded.
        """
        from ._remote_training import delete_remote_adapter

        self._check_open("delete an adapter")
        await delete_remote_adapter(self, adapter_id)

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stateless trunk call (``Forward``) over ``hidden (B, T, H)``; nothing is cached.

        Args:
            hidden: ``(B, T, H)`` output of the bottom stage.
            attention_mask: ``(B, T)``, non-zero for real tokens (default all ones).
            position_ids: ``(B, T)`` positions (default: counted over the mask).

        Returns:
            ``(B, T, H)`` trunk output in ``hidden``'s dtype.

        Raises:
            TrunkError: the call failed (see the error tree); ``UNAVAILABLE`` is retried first.
        """
        self._check_open("run a forward call")
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if position_ids is None:
            from ..models.positions import prompt_positions

            position_ids = prompt_positions(attention_mask)
        body = proto.build_forward(hidden, attention_mask, position_ids, wire_dtype=self._wire_dtype)
        reply = await self.unary(proto.METHOD_FORWARD, body, what="a Forward call")
        result = _parse(reply, "a Forward call")
        if result.hidden_states is None:
            raise TrunkError("the server answered a Forward call without hidden states.")
        return result.hidden_states.to(hidden.dtype)

    async def info(self) -> dict[str, Any]:
        """The server's description: family, layer range, hidden size, dtype, limits, version.

        Raises:
            TrunkError: the call failed.
        """
        self._check_open("ask for info")
        reply = await self.unary(proto.METHOD_INFO, proto.build_info_request(), what="an Info call")
        try:
            return proto.parse_info(reply)
        except WireError as exc:
            raise TrunkError(f"the server's reply to an Info call is malformed: {exc}") from exc

    async def unary(self, method: str, body: bytes, *, what: str, retry: bool = True) -> bytes:
        """One unary call with the client's deadline, token and retry policy.

        Args:
            method: Full method name, e.g. ``protocol.METHOD_FORWARD``.
            body: The request body.
            what: What the call does, for error messages.
            retry: Retry ``UNAVAILABLE``; pass False for calls that must not run twice.

        Returns:
            The reply body.

        Raises:
            ClientClosed: the client has been closed.
            TrunkError: the call failed (translated from the gRPC status).
        """
        stub = self.channel().unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
        timeout = self.config.step_timeout_s

        async def attempt() -> bytes:
            try:
                reply: bytes = await stub(body, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TrunkTimeout(f"{what} did not finish within step_timeout_s={timeout} s.") from exc
                if retry and is_retryable(exc.code()):
                    raise _StreamBroken(exc.code(), exc.details()) from exc
                raise translate_rpc_error(exc, what) from exc
            return reply

        return await self.retrying(attempt, what)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``attempt()`` until it succeeds, retrying while it raises ``_StreamBroken``.

        Waits between attempts grow by ``backoff_multiplier`` with +-20% jitter; after
        ``retry_deadline_s`` from the first failure the last failure becomes
        :class:`TrunkUnavailable`.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        tries = 0
        while True:
            try:
                return await attempt()
            except _StreamBroken as broken:
                now = loop.time()
                if deadline is None:
                    deadline = now + self.config.retry_deadline_s
                wait = self.config.backoff_s(tries) * random.uniform(0.8, 1.2)
                tries += 1
                if now + wait > deadline:
                    raise TrunkUnavailable(
                        f"{what} failed: the trunk server at {self.address} stayed unreachable for "
                        f"retry_deadline_s={self.config.retry_deadline_s} s ({tries} attempts); last status "
                        f"{broken.code.name if broken.code else 'UNKNOWN'}: {broken.details or 'no details'}. "
                        "Check that the server is running, or raise ClientConfig.retry_deadline_s."
                    ) from broken
                logger.info("%s: server unavailable (%s); retry %d in %.2f s", what, broken.details, tries, wait)
                self._check_open("retry a call")
                await asyncio.sleep(wait)


def _parse(reply: bytes, what: str) -> proto.TrunkResult:
    try:
        return proto.parse_result(reply)
    except WireError as exc:
        raise TrunkError(f"the server's reply to {what} is malformed: {exc}") from exc


class RemoteTrunkSession(TrunkSession):
    """One ``Session`` stream of a :class:`RemoteTrunk`; the trunk's KV cache lives on the server.

    Use as ``async with await trunk.open_session() as session:``; leaving the block sends
    ``close`` (or cancels the stream if it is unhealthy) so the server frees the cache.
    """

    def __init__(self, owner: RemoteTrunk, adapter_id: str | None = None) -> None:
        self._owner = owner
        self.adapter_id = adapter_id
        self.session_id = uuid.uuid4().hex[:16]
        self._call: Any = None  # grpc.aio.StreamStreamCall while a stream is open
        self._sent: list[bytes] = []  # bodies answered so far, for replay (open first)
        self._steps = 0
        self._closed = False
        self.replays = 0  #: completed replays: times this session reopened its stream and rebuilt the cache

    @property
    def steps(self) -> int:
        """Calls answered so far (the prompt counts as one)."""
        return self._steps

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Send the next tokens' hidden states and return the trunk's output.

        Args:
            hidden: ``(B, T, H)`` bottom output of the new tokens (the prompt first, then steps).
            attention_mask: ``(B, T)`` validity of the new tokens.
            position_ids: ``(B, T)`` their positions.

        Returns:
            ``(B, T, H)`` trunk output, in ``hidden``'s dtype.

        Raises:
            ClientClosed: the session or its client has been closed.
            TrunkTimeout: no answer within ``step_timeout_s``.
            TrunkUnavailable: the server stayed unreachable for ``retry_deadline_s``.
            TrunkError: any other failure, by status code (see the error tree).
        """
        if self._closed:
            raise ClientClosed("Cannot run a step on this trunk session, as it has been closed.")
        self._owner._check_open("run a step")
        wire_dtype = self._owner._wire_dtype
        if self._steps == 0:
            body = proto.build_open(
                hidden, attention_mask, position_ids, session_id=self.session_id, wire_dtype=wire_dtype,
                adapter_id=self.adapter_id,
            )
        else:
            body = proto.build_step(hidden, attention_mask, position_ids, wire_dtype=wire_dtype)
        what = f"{'the prompt' if self._steps == 0 else f'step {self._steps}'} of trunk session {self.session_id}"
        reply = await self._owner.retrying(lambda: self._attempt(body, what), what)
        result = _parse(reply, what)
        if result.hidden_states is None or tuple(result.hidden_states.shape) != tuple(hidden.shape):
            got = None if result.hidden_states is None else list(result.hidden_states.shape)
            raise TrunkError(f"the server answered {what} with hidden states of shape {got}, expected {list(hidden.shape)}.")
        if self._owner.config.replay:
            self._sent.append(body)
        self._steps += 1
        return result.hidden_states.to(hidden.dtype)

    async def _attempt(self, body: bytes, what: str) -> bytes:
        """Send ``body`` on the stream (opening it and replaying the history if needed)."""
        if self._call is None:
            if self._steps > 0 and not self._owner.config.replay:
                raise TrunkUnavailable(
                    f"{what} failed: the stream to {self._owner.address} broke and ClientConfig.replay is off, "
                    "so the server's cache cannot be rebuilt; start the generation again."
                )
            self._call = self._owner.channel().stream_stream(
                proto.METHOD_SESSION, request_serializer=_identity, response_deserializer=_identity
            )(metadata=self._owner._metadata)
            if self._sent:
                logger.info("trunk session %s: replaying %d messages on a new stream", self.session_id, len(self._sent))
                for i, old in enumerate(self._sent):
                    await self._exchange(old, f"replay of message {i} of trunk session {self.session_id}")
                self.replays += 1
                self._owner.replays += 1
        return await self._exchange(body, what)

    async def _exchange(self, body: bytes, what: str) -> bytes:
        """Write one message and read its reply within the step deadline."""
        timeout = self._owner.config.step_timeout_s
        try:
            return await asyncio.wait_for(self._write_read(body), timeout)
        except asyncio.TimeoutError:
            self._drop()
            raise TrunkTimeout(
                f"{what} got no answer within step_timeout_s={timeout} s; the session was cancelled "
                "(raise ClientConfig.step_timeout_s for slow servers or long prompts)."
            ) from None
        except _StreamBroken as broken:
            self._drop()
            if is_retryable(broken.code):
                raise
            raise status_error(broken.code, broken.details, what) from None
        except BaseException:  # cancellation: end the stream so the server frees the cache
            self._drop()
            raise

    async def _write_read(self, body: bytes) -> bytes:
        call = self._call
        try:
            await call.write(body)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # The stream ended between two of our messages (every answer of ours was read,
            # so it was no refusal of our input): the server stopped or the connection
            # broke. grpc reports that as a local INTERNAL error; treat it as UNAVAILABLE,
            # so the session reopens and replays (a refusal would then come back as such).
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            raise _StreamBroken(grpc.StatusCode.UNAVAILABLE, f"the stream ended before this message ({detail})") from exc
        try:
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise _StreamBroken(exc.code(), exc.details()) from exc
        if reply is grpc.aio.EOF:
            code = await call.code()
            details = await call.details()
            if code is grpc.StatusCode.OK:  # pragma: no cover (the server never ends a stream early)
                code, details = grpc.StatusCode.UNAVAILABLE, "the server ended the stream without an answer"
            raise _StreamBroken(code, details)
        return bytes(reply)

    def _drop(self) -> None:
        """Cancel and forget the current stream (the server frees the session)."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def aclose(self) -> None:
        """Close the session: send ``close`` on a healthy stream, else cancel it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._sent = []
        self._owner._sessions.discard(self)
        call, self._call = self._call, None
        if call is None:
            return
        try:
            await asyncio.wait_for(self._close_stream(call), timeout=5.0)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError, WireError):
            pass  # the stream is cancelled below; the server frees the session either way
        finally:
            call.cancel()

    @staticmethod
    async def _close_stream(call: Any) -> None:
        await call.write(proto.build_close())
        reply = await call.read()
        if reply is not grpc.aio.EOF:
            proto.parse_result(reply)
        await call.done_writing()
