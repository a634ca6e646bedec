"""AsyncGRPCComputeServer: the trunk behind a grpc.aio server, one torch worker thread.

The event loop does gRPC I/O, decodes frames (``splitlearn_async.wire``) and keeps the
books (:class:`SessionStore`); every torch operation -- cache creation, the trunk itself,
dtype casts and encoding of the reply -- runs on the server's one :class:`StageWorker`.

Each failure is answered with ``await context.abort(code, sentence)`` and ends only its
own call or stream; a stream that ends for any reason (close, error, cancel, disconnect)
frees its session's cache in a ``finally``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import torch

from splitlearn_async import __version__
from splitlearn_async import protocol as proto
from splitlearn_async.errors import ConfigError, WireError
from splitlearn_async.server._config import ServerConfig
from splitlearn_async.server._metrics import NullMetrics, ServerMetrics
from splitlearn_async.server._status import abort as _abort
from splitlearn_async.server._status import cancel_and_wait
from splitlearn_async.server._status import sentence as _sentence
from splitlearn_async.server._sessions import Session, SessionStore, SessionTooLong, StoreFull
from splitlearn_async.server._training import TrainingService
from splitlearn_async.wire import WIRE_DTYPES, Kind, unpack
from splitlearn_async.worker import StageWorker, WorkerDied, WorkerStopped

if TYPE_CHECKING:
    from splitlearn_async.models.stages import TrunkStage

__all__ = ["AsyncGRPCComputeServer"]

logger = logging.getLogger(__name__)

_Code = grpc.StatusCode
#: A session that stepped within this many seconds counts as being in a decode loop.
_ACTIVE_WINDOW_S = 1.0


def _identity(body: bytes) -> bytes:
    return body


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class AsyncGRPCComputeServer:
    """A gRPC server running a :class:`TrunkStage` for many clients (service ``splitlearn.Trunk``).

    Use ``async with AsyncGRPCComputeServer(trunk) as server: ... server.port``, or call
    :meth:`start` and :meth:`stop` yourself. Methods: ``Session`` (stream), ``Forward``
    and ``Info`` (unary), plus the standard ``grpc.health.v1.Health`` service.

    Args:
        trunk: The trunk stage to serve (its parameters are not changed).
        host: Address to bind, e.g. ``"127.0.0.1"`` or ``"0.0.0.0"``.
        port: Port to bind; 0 picks a free one (read :attr:`port` after :meth:`start`).
        config: Limits and options; ``None`` uses ``ServerConfig()``.

    Raises:
        ConfigError: ``config`` is not a :class:`ServerConfig`.
    """

    def __init__(self, trunk: TrunkStage, host: str = "127.0.0.1", port: int = 0, config: ServerConfig | None = None) -> None:
        if config is None:
            config = ServerConfig()
        if not isinstance(config, ServerConfig):
            raise ConfigError(f"config must be a ServerConfig, got {type(config).__name__}.")
        self.trunk = trunk
        self.host = host
        self.requested_port = port
        self.config = config
        self.store = SessionStore(
            config.max_sessions, config.max_tokens_total, config.max_session_tokens, config.session_ttl_s
        )
        self.worker = StageWorker(
            "splitlearn-trunk",
            torch_threads=config.torch_threads,
            max_batch_size=config.max_batch_size,
            max_batch_delay_s=config.max_batch_delay_s,
            batching=config.batching,
            max_gather_wait_s=config.max_gather_wait_s,
        )
        # sessions in a decode loop send their next step within milliseconds: wait for them
        self.worker.expect(lambda: self.store.active(_ACTIVE_WINDOW_S))
        self._hidden_size = int(trunk.hidden_size)
        self._model_dtype = trunk.dtype
        self._reply_dtype = WIRE_DTYPES[config.wire_dtype] if config.wire_dtype else None
        # the body size is capped by max_message_bytes; token limits answer RESOURCE_EXHAUSTED
        self._max_elements: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._metrics: NullMetrics = NullMetrics()
        self._port: int | None = None
        self._stopping = False
        self._stopped = False
        self.training = TrainingService(self)  # training methods, kept graphs, LoRA adapters

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the port, start the worker, the sweeper, metrics and the gRPC server.

        Raises:
            OSError: the port (or the metrics port) cannot be bound, or the TLS files cannot be read.
            RuntimeError: the server was already started or stopped.
        """
        if self._server is not None or self._stopped:
            raise RuntimeError("AsyncGRPCComputeServer can be started once; create a new one to serve again.")
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        limit = self.config.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ])
        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(
                self._session, request_deserializer=_identity, response_serializer=_identity),
            "Forward": grpc.unary_unary_rpc_method_handler(
                self._forward, request_deserializer=_identity, response_serializer=_identity),
            "Info": grpc.unary_unary_rpc_method_handler(
                self._info, request_deserializer=_identity, response_serializer=_identity),
        }
        handlers.update(self.training.handlers())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proto.SERVICE_NAME, handlers),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        if self.config.tls:
            with open(self.config.tls_cert_file, "rb") as f:  # type: ignore[arg-type]
                cert = f.read()
            with open(self.config.tls_key_file, "rb") as f:  # type: ignore[arg-type]
                key = f.read()
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(address)
        if not port:
            raise OSError(f"could not bind the trunk server to {address}; is the port in use?")
        self._server = server
        self._port = port
        if self.config.metrics_port is not None:
            self._metrics = ServerMetrics(
                self.host, self.config.metrics_port,
                sessions_open=lambda: self.store.sessions_open, queue_depth=lambda: self.worker.queue_depth,
            )
        await self.worker.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="splitlearn-session-sweeper")
        await server.start()
        for service in ("", proto.SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "trunk server on %s:%d (layers %s, %s, tls=%s, auth=%s)", self.host, port,
            self.trunk.layer_range, _dtype_name(self._model_dtype), self.config.tls, self.config.auth_token is not None,
        )

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving: refuse new work with UNAVAILABLE, let running calls finish, free everything.

        Health turns NOT_SERVING at once; calls in flight get up to ``grace`` seconds, then
        are cancelled; the worker thread is stopped and joined; every session is freed. A
        second call does nothing.

        Args:
            grace: Seconds to let calls in flight finish; ``None`` waits for all of them.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await cancel_and_wait(self._sweeper)
        await self.training.stop()
        await self.worker.stop(grace)
        for session in self.store.sessions():
            self.store.close(session)
        self._metrics.stop()
        logger.info("trunk server stopped")

    async def __aenter__(self) -> AsyncGRPCComputeServer:
        """Start the server (see :meth:`start`) and return it."""
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the server with the default grace period (see :meth:`stop`)."""
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: the server has not been started.
        """
        if self._port is None:
            raise RuntimeError("the server has no port yet; call `await server.start()` first.")
        return self._port

    @property
    def metrics_port(self) -> int | None:
        """The bound Prometheus port, or None when metrics are off."""
        return self._metrics.port

    @property
    def sessions_open(self) -> int:
        """Sessions currently open."""
        return self.store.sessions_open

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the open sessions' KV caches."""
        return self.store.cache_bytes

    def info(self) -> dict[str, Any]:
        """What ``Info`` answers: model, layers, dtypes, limits and version (see docs/protocol.md)."""
        c = self.config
        return {
            "family": self.trunk.family.name,
            "model_type": str(getattr(self.trunk.config, "model_type", "")),
            "layer_range": list(self.trunk.layer_range),
            "hidden_size": self._hidden_size,
            "dtype": _dtype_name(self._model_dtype),
            "wire_dtypes": list(proto.HIDDEN_DTYPES),
            "reply_dtype": c.wire_dtype,
            "max_sessions": c.max_sessions,
            "max_tokens_total": c.max_tokens_total,
            "max_session_tokens": c.max_session_tokens,
            "session_ttl_s": float(c.session_ttl_s),
            "max_message_bytes": c.max_message_bytes,
            "auth": c.auth_token is not None,
            "version": __version__,
            **self.training.info(),
        }

    # --- handlers ------------------------------------------------------------------------

    async def _session(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """``Session`` stream: open -> result, step -> result ..., close -> closed result."""
        await self._admit(context)
        session: Session | None = None
        try:
            async for body in requests:
                if self._stopping:
                    await _abort(context, _Code.UNAVAILABLE, "the server is shutting down; open a new session on another server or retry later.")
                if session is not None and session.expired:
                    await _abort(context, _Code.NOT_FOUND, (
                        f"session {session.session_id} expired after {self.config.session_ttl_s} s idle "
                        "and its cache was freed; open a new session and replay the prompt."))
                expected = (Kind.OPEN,) if session is None else (Kind.STEP, Kind.CLOSE)
                try:
                    inputs = proto.parse_inputs(
                        body, hidden_size=self._hidden_size, expected=expected,
                        max_bytes=self.config.max_message_bytes, max_elements=self._max_elements,
                    )
                except WireError as exc:
                    await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
                if inputs is Kind.CLOSE and session is not None:  # close is only expected after open
                    sid = session.session_id
                    self.store.close(session)
                    session = None
                    yield proto.build_closed(sid)
                    return
                if not isinstance(inputs, proto.TrunkInputs):  # pragma: no cover (kinds are checked above)
                    await _abort(context, _Code.INVALID_ARGUMENT, "a 'close' message arrived before 'open'.")
                if session is None:
                    session = await self._open(inputs, context)
                else:
                    await self._extend(session, inputs, context)
                yield await self._step(session, inputs, context)
        finally:
            if session is not None:
                self.store.close(session)

    async def _open(self, inputs: proto.TrunkInputs, context: grpc.aio.ServicerContext) -> Session:
        rows, columns = inputs.hidden_states.shape[:2]
        if inputs.attention_mask.shape[1] != columns:
            await _abort(context, _Code.INVALID_ARGUMENT, (
                f"attention_mask of an open message has shape {list(inputs.attention_mask.shape)} but "
                f"hidden_states has {columns} tokens; send a ({rows}, {columns}) mask."))
        try:
            session = self.store.open(rows, columns, inputs.session_id)
        except (StoreFull, SessionTooLong) as exc:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))
        session.busy = True
        try:
            # a cache is a slot table, no tensor work: made here rather than queued behind
            # whatever the worker runs (a burst of prompts would otherwise open one by one)
            session.cache = self.trunk.new_cache(rows)
            await self.training.open_session_adapter(session, inputs.adapter_id, context)
        except BaseException:
            self.store.close(session)
            raise
        finally:
            session.busy = False
        return session

    async def _extend(self, session: Session, inputs: proto.TrunkInputs, context: grpc.aio.ServicerContext) -> None:
        rows, columns = inputs.hidden_states.shape[:2]
        if rows != session.rows:
            await _abort(context, _Code.INVALID_ARGUMENT, (
                f"this session has {session.rows} rows but the step's hidden_states has {rows}; "
                "every step of a session must keep the batch of its open message."))
        mask_columns = inputs.attention_mask.shape[1]
        if mask_columns not in (columns, session.columns + columns):
            await _abort(context, _Code.INVALID_ARGUMENT, (
                f"attention_mask has {mask_columns} columns but must have {columns} (the new tokens) "
                f"or {session.columns + columns} (past + new tokens)."))
        try:
            self.store.extend(session, columns)
        except (StoreFull, SessionTooLong) as exc:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))

    async def _step(self, session: Session, inputs: proto.TrunkInputs, context: grpc.aio.ServicerContext) -> bytes:
        """Run one open/step message through the trunk, batched with other sessions' steps.

        The message goes to the worker as :class:`_StepWork` under the batch key
        ``("step", adapter_id, 1 or "prompt")``: waiting steps of other sessions with the
        same adapter run in the same trunk call, decode steps with decode steps and prompt
        chunks of any length with prompt chunks (left-padded to the longest). A message
        longer than ``prefill_chunk_tokens`` is cut into chunks, each queued after the
        previous one finished, so other sessions' decode steps run between them.
        """
        session.busy = True
        start = time.perf_counter()
        try:
            hidden = inputs.hidden_states  # (B, T, H), wire dtype
            length = int(hidden.shape[1])
            new_mask = inputs.attention_mask[:, -length:]  # (B, T): the new tokens
            reply_dtype = self._reply_dtype or hidden.dtype
            adapter = getattr(session, "adapter_id", None)
            earlier: list[torch.Tensor] = []
            body: Any = None
            bounds = _chunk_bounds(length, self.config.prefill_chunk_tokens)
            for a, b in bounds:
                work = _StepWork(
                    hidden[:, a:b], new_mask[:, a:b], inputs.position_ids[:, a:b], session, session.cache,
                    reply_dtype, earlier, last=b == length,
                )
                # decode steps batch with decode steps; prompt chunks of any length with each other
                body = await self._run_step(context, ("step", adapter, 1 if b - a == 1 else "prompt"), work)
                if b != length:
                    earlier.append(body)  # (B, chunk, H), model dtype
        finally:
            session.busy = False
            self.store.touch(session)
        self._metrics.observe_latency(time.perf_counter() - start)
        reply: bytes = body  # the last chunk's result is the encoded reply
        return reply

    async def _run_step(self, context: grpc.aio.ServicerContext, key: tuple[Any, ...], work: _StepWork) -> Any:
        """Queue ``work`` for a batched trunk call; map its failure to a status code."""
        try:
            result = await self.worker.run_batched(key, work, self._compute_batch)
            if isinstance(result, Exception):  # this session's rows failed, the batch did not
                raise result
        except (WireError, ValueError) as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        except (WorkerStopped, WorkerDied) as exc:
            await _abort(context, _Code.UNAVAILABLE, f"the trunk worker is not running ({exc}); retry on another server.")
        except Exception as exc:  # one bad call must not take the server down
            logger.exception("trunk step failed")
            await _abort(context, _Code.INTERNAL, f"the trunk failed on this input: {type(exc).__name__}: {exc}.")
        return result

    async def _forward(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``Forward``: stateless trunk call, no cache kept."""
        await self._admit(context)
        if self._stopping:
            await _abort(context, _Code.UNAVAILABLE, "the server is shutting down; retry on another server or later.")
        try:
            inputs = proto.parse_inputs(
                body, hidden_size=self._hidden_size, expected=Kind.FORWARD,
                max_bytes=self.config.max_message_bytes, max_elements=self._max_elements,
            )
            rows, columns = inputs.hidden_states.shape[:2]  # type: ignore[union-attr]
            self.store.check_tokens(rows, columns, "a forward call")
        except WireError as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        except SessionTooLong as exc:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))
        result: bytes = await self._run(context, self._compute, inputs, None, None)
        return result

    async def _info(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``Info``: a description of the model and the limits."""
        await self._admit(context)
        if body:
            try:
                unpack(body, max_bytes=65536)
            except WireError as exc:
                await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        return proto.build_info(self.info())

    # --- helpers -------------------------------------------------------------------------

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """Abort with UNAUTHENTICATED unless the call carries the configured bearer token."""
        token = self.config.auth_token
        if token is None:
            return
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
                break
        scheme, _, presented = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
            reason = "lacks the metadata 'authorization: Bearer <token>'" if not given else "carries a wrong bearer token"
            await _abort(context, _Code.UNAUTHENTICATED, f"this server requires a bearer token and the call {reason}.")

    async def _run(self, context: grpc.aio.ServicerContext, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the worker, mapping its failures to status codes."""
        start = time.perf_counter()
        try:
            result = await self.worker.run(fn, *args)
        except (WireError, ValueError) as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        except (WorkerStopped, WorkerDied) as exc:
            await _abort(context, _Code.UNAVAILABLE, f"the trunk worker is not running ({exc}); retry on another server.")
        except Exception as exc:  # one bad call must not take the server down
            logger.exception("trunk call failed")
            await _abort(context, _Code.INTERNAL, f"the trunk failed on this input: {type(exc).__name__}: {exc}.")
        self._metrics.observe_step(int(args[0].hidden_states.shape[0]), time.perf_counter() - start)
        return result

    def _compute(self, inputs: proto.TrunkInputs, cache: Any, session: Session | None) -> bytes:
        """(worker) Run the trunk and encode the reply; the cache advances only on success."""
        hidden = inputs.hidden_states  # (B, T, H), wire dtype
        reply_dtype = self._reply_dtype or hidden.dtype
        with torch.no_grad():
            x = hidden.to(device=self.trunk.device, dtype=self._model_dtype)
            out = self.trunk(x, inputs.attention_mask, inputs.position_ids, cache=cache)  # (B, T, H)
            if not bool(torch.isfinite(out).all()):
                raise ValueError("the trunk's output holds NaN or infinite values for this input; check the hidden states sent")
        if session is None:
            return proto.build_result(out, wire_dtype=reply_dtype)
        session.cache_bytes = cache.nbytes()
        return proto.build_result(out, session_id=session.session_id, length=cache.length, wire_dtype=reply_dtype)

    def _compute_batch(self, works: list[_StepWork]) -> list[bytes | torch.Tensor | Exception]:
        """(worker) One trunk call for the steps of several sessions; one result per step.

        Linear layers and MLPs run over all rows at once, attention per session on its own
        cache (``run_stage_batched``). A step whose output is not finite, or whose reply
        cannot be encoded, gets its exception as its result; the others their reply: a
        bytes body for a message's last chunk, the ``(B, T, H)`` output otherwise. Raises
        only if the trunk call itself failed, and then no cache has advanced.
        """
        from splitlearn_async.models.stages import run_stage_batched

        calls = [(w.hidden, w.mask, w.positions, w.cache) for w in works]
        outs = run_stage_batched(self.trunk, calls)  # each (B_i, T, H), model dtype, CPU
        self._metrics.observe_batch(sum(int(w.hidden.shape[0]) for w in works))
        # from here on nothing may raise: the caches have advanced, a retry would advance them twice
        results: list[bytes | torch.Tensor | Exception] = []
        for work, out in zip(works, outs):
            try:
                results.append(self._finish_step(work, out))
            except Exception as exc:
                results.append(exc)
        return results

    def _finish_step(self, work: _StepWork, out: torch.Tensor) -> bytes | torch.Tensor:
        """(worker) One session's part of a batched call: the reply body, or the chunk's output.

        Raises:
            ValueError: the output holds NaN or infinite values.
            WireError: the reply cannot be encoded.
        """
        # the cache captured at submission: the stream may close the session meanwhile
        work.session.cache_bytes = work.cache.nbytes()
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                "the trunk's output holds NaN or infinite values for this input; check the hidden states sent")
        if not work.last:
            return out
        full = torch.cat([*work.earlier, out], dim=1) if work.earlier else out  # (B, T, H)
        return proto.build_result(
            full, session_id=work.session.session_id, length=work.cache.length, wire_dtype=work.reply_dtype)

    async def _sweep(self) -> None:
        """Expire idle sessions every ``sweep_interval_s`` until cancelled."""
        interval = self.config.effective_sweep_interval_s
        while True:
            await asyncio.sleep(interval)
            self.store.expire_idle()


@dataclass
class _StepWork:
    """One session's message (or chunk of it) waiting for a batched trunk call.

    Attributes:
        hidden: ``(B, T, H)`` hidden states of the new tokens, wire dtype.
        mask: ``(B, T)`` validity of the new tokens.
        positions: ``(B, T)`` their position ids.
        session: The session.
        cache: The session's KV cache, taken when the work was queued; it advances by ``T`` columns.
        reply_dtype: dtype of the hidden states in the reply.
        earlier: Outputs ``(B, t, H)`` of the message's earlier chunks, joined into the reply.
        last: True for a message's last chunk: the result is the encoded reply.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    session: Session
    cache: Any
    reply_dtype: torch.dtype
    earlier: list[torch.Tensor] = field(default_factory=list)
    last: bool = True


def _chunk_bounds(length: int, chunk: int | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` cutting ``length`` tokens into chunks of at most ``chunk`` (None: one)."""
    if chunk is None or length <= chunk:
        return [(0, length)]
    return [(a, min(length, a + chunk)) for a in range(0, length, chunk)]
