"""AsyncGRPCComputeServer: the trunk behind a grpc.aio server, one torch worker thread.

The event loop does gRPC I/O, decodes frames (``splitlearn_async.wire``) and keeps the
books (:class:`SessionStore`); every torch operation -- the trunk itself, dtype casts and
encoding of the reply -- runs on the server's one :class:`StageWorker`.

This module holds the server's life: binding, starting, health, metrics, stopping. The
methods live in two services that share one :class:`ServerContext`: inference
(``_inference.py``: ``Session``, ``Forward``, ``Info``) and training (``_training.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import torch

from splitlearn_async import protocol as proto
from splitlearn_async._version import __version__
from splitlearn_async.errors import ConfigError, StateError
from splitlearn_async.wire import WIRE_DTYPES
from splitlearn_async.worker import StageWorker

from ._config import ServerConfig
from ._context import CheckpointBytes, Lifecycle, ServerContext
from ._inference import InferenceService
from ._metrics import NullMetrics, ServerMetrics
from ._models import DEFAULT_MODEL, ModelSet, ModelSource, requested_model
from ._sessions import SessionStore
from ._status import cancel_and_wait, guarded, guarded_stream, guarded_upload
from ._training import TrainingService

if TYPE_CHECKING:
    from splitlearn_async.models.stages import TrunkStage

__all__ = ["AsyncGRPCComputeServer"]

logger = logging.getLogger(__name__)

#: A session that stepped within this many seconds counts as being in a decode loop.
_ACTIVE_WINDOW_S = 1.0


def _identity(body: bytes) -> bytes:
    return body


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


Context = grpc.aio.ServicerContext[bytes, bytes]


class Model:
    """One loaded model of a server: its context and its inference and training services."""

    def __init__(self, context: ServerContext, info: Callable[[Model], dict[str, Any]]) -> None:
        self.context = context
        self.training = TrainingService(context)  # training methods, kept graphs, LoRA adapters
        self.inference = InferenceService(context, lambda: info(self), self.training.open_session_adapter)
        #: The behaviour of each method of the trunk service for this model, by method name.
        self.handlers: dict[str, Any] = {
            "Session": self.inference.session,
            "Forward": guarded(self.inference.forward, "this forward call"),
            "Info": guarded(self.inference.info, "this Info call"),
        }
        for name, handler in self.training.handlers().items():
            self.handlers[name] = (
                handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
            )

    @property
    def trunk(self) -> Any:
        """The model's trunk stage."""
        return self.context.trunk

    def holds_state(self) -> str | None:
        """Why the model may not be evicted: sessions, training sessions or adapters it holds; or None."""
        sessions = self.context.store.sessions_of(self.context.model)
        host = self.training.host
        held = [
            f"{sessions} session(s)" if sessions else "",
            f"{len(host.sessions)} training session(s)" if host.sessions else "",
            f"{len(host.adapters.adapters)} adapter(s)" if host.adapters.adapters else "",
        ]
        return ", ".join(h for h in held if h) or None

    async def stop(self) -> None:
        """Free the model's training sessions and graphs (its inference sessions are the store's)."""
        await self.training.stop()


class AsyncGRPCComputeServer:
    """A gRPC server running trunk stages for many clients (service ``splitlearn.Trunk``).

    Use ``async with AsyncGRPCComputeServer(trunk) as server: ... server.port``, or call
    :meth:`start` and :meth:`stop` yourself. Methods: ``Session`` (stream), ``Forward``
    and ``Info`` (unary), the training methods, plus the standard ``grpc.health.v1.Health``
    service.

    One server may serve several models, by name: give a mapping of names to trunks or
    :class:`ModelSource` loaders. A call names its model in the metadata
    ``splitlearn-model`` (``RemoteTrunk(..., model=...)``); a call that names none runs
    on the first. Loaders run on a model's first use; idle models are evicted
    least-recently-used under ``config.max_model_bytes`` (``_models.py``). All models
    share the one worker thread, the session store and the limits.

    Args:
        trunk: The trunk stage to serve (its parameters are not changed), served as the
            model ``"default"``; or a mapping of model names to trunk stages or
            :class:`ModelSource` loaders, the first being the default.
        host: Address to bind, e.g. ``"127.0.0.1"`` or ``"0.0.0.0"``.
        port: Port to bind; 0 picks a free one (read :attr:`port` after :meth:`start`).
        config: Limits and options; ``None`` uses ``ServerConfig()``.

    Raises:
        ConfigError: ``config`` is not a :class:`ServerConfig`, or a model name is not valid.
    """

    def __init__(
        self,
        trunk: TrunkStage | Mapping[str, TrunkStage | ModelSource],
        host: str = "127.0.0.1",
        port: int = 0,
        config: ServerConfig | None = None,
    ) -> None:
        if config is None:
            config = ServerConfig()
        if not isinstance(config, ServerConfig):
            raise ConfigError(f"config must be a ServerConfig, got {type(config).__name__}.")
        given = dict(trunk) if isinstance(trunk, Mapping) else {DEFAULT_MODEL: trunk}
        sources = {
            name: value if isinstance(value, ModelSource) else ModelSource.loaded(value)
            for name, value in given.items()
        }
        self.host = host
        self.requested_port = port
        self.config = config
        store = SessionStore(
            config.max_sessions, config.max_tokens_total, config.max_session_tokens, config.session_ttl_s
        )
        worker = StageWorker(
            "splitlearn-trunk",
            torch_threads=config.torch_threads,
            max_batch_size=config.max_batch_size,
            max_batch_delay_s=config.max_batch_delay_s,
            batching=config.batching,
            max_gather_wait_s=config.max_gather_wait_s,
        )
        # sessions in a decode loop send their next step within milliseconds: wait for them
        worker.expect(lambda: store.active(_ACTIVE_WINDOW_S))
        self.store = store
        self.worker = worker
        self._lifecycle = Lifecycle()
        self._checkpoints = CheckpointBytes()  # one max_checkpoint_bytes budget for all models
        self._metrics: NullMetrics = NullMetrics()
        self.models = ModelSet(sources, self._build_model, config.max_model_bytes, self._set_health)
        for name, value in given.items():  # trunks given in memory are loaded already
            if not isinstance(value, ModelSource):
                self.models.add_loaded(name, self._build_model(name, value))
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._port: int | None = None
        self._stopped = False

    def _build_model(self, name: str, trunk: Any) -> Model:
        # the body size is capped by max_message_bytes; token limits answer RESOURCE_EXHAUSTED
        context = ServerContext(
            trunk=trunk,
            config=self.config,
            worker=self.worker,
            store=self.store,
            hidden_size=int(trunk.hidden_size),
            reply_dtype=WIRE_DTYPES[self.config.wire_dtype] if self.config.wire_dtype else None,
            metrics=self._metrics.for_model(name),
            model=name,
            lifecycle=self._lifecycle,
            checkpoints=self._checkpoints,
        )
        return Model(context, self._info_of)

    def _default(self) -> Model:
        model: Model | None = self.models.slot(None).services
        if model is None:
            raise StateError(
                f"the default model {self.models.default!r} is not loaded yet; it loads on its first call."
            )
        return model

    @property
    def trunk(self) -> Any:
        """The default model's trunk (see :attr:`models` for the others)."""
        return self._default().trunk

    @property
    def context(self) -> ServerContext:
        """The default model's :class:`ServerContext`."""
        return self._default().context

    @property
    def inference(self) -> InferenceService:
        """The default model's inference service."""
        return self._default().inference

    @property
    def training(self) -> TrainingService:
        """The default model's training service (kept graphs, adapters)."""
        return self._default().training

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the port, start the worker, the sweeper, metrics and the gRPC server.

        Raises:
            OSError: the port (or the metrics port) cannot be bound, or the TLS files cannot be read.
            RuntimeError: the server was already started or stopped.
        """
        if self._server is not None or self._stopped:
            raise StateError("AsyncGRPCComputeServer can be started once; create a new one to serve again.")
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        # gRPC takes bodies up to twice our limit, so that one over it gets our sentence
        # (naming the limit and the option) from ServerContext.decode, not gRPC's text
        limit = min(2 * self.config.max_message_bytes, 2**31 - 1)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proto.SERVICE_NAME, self._handlers()),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"[{self.host}]:{self.requested_port}" if ":" in self.host else f"{self.host}:{self.requested_port}"
        if self.config.tls_cert_file and self.config.tls_key_file:
            cert = await asyncio.to_thread(Path(self.config.tls_cert_file).read_bytes)
            key = await asyncio.to_thread(Path(self.config.tls_key_file).read_bytes)
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(address)
        if not port:
            raise OSError(f"could not bind the trunk server to {address}; is the port in use?")
        self._server = server
        self._port = port
        if self.config.metrics_port is not None:
            self._start_metrics(self.config.metrics_port)
        await self.worker.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="splitlearn-session-sweeper")
        await server.start()
        for service in ("", proto.SERVICE_NAME, *self.models.names):  # a model's name asks for that model
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "trunk server on %s:%d (models %s, tls=%s, auth=%s)",
            self.host,
            port,
            ", ".join(f"{s.name} ({'loaded' if s.loaded else 'on first use'})" for s in self.models.slots.values()),
            self.config.tls,
            self.config.auth_token is not None,
        )

    def _start_metrics(self, port: int) -> None:
        def training(what: Callable[[Model], int]) -> Callable[[], float]:
            return lambda: sum(what(s.services) for s in self.models.slots.values() if s.services is not None)

        def per_model(name: str) -> dict[str, Callable[[], float]]:
            slot = self.models.slots[name]
            return {
                "loaded": lambda: float(slot.loaded),
                "bytes": lambda: float(slot.nbytes if slot.loaded else 0),
                "sessions_open": lambda: float(self.store.sessions_of(name)),
            }

        metrics = ServerMetrics(
            self.host,
            port,
            {
                "sessions_open": lambda: self.store.sessions_open,
                "queue_depth": lambda: self.worker.queue_depth,
                "cache_bytes": lambda: self.store.cache_bytes,
                "training_sessions": training(lambda m: len(m.training.host.sessions)),
                "pending_steps": training(lambda m: m.training.pending_steps),
            },
            {name: per_model(name) for name in self.models.names},
        )
        self._metrics = metrics
        for slot in self.models.slots.values():
            if slot.services is not None:
                slot.services.context.metrics = metrics.for_model(slot.name)

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        """The trunk service's methods, each routed to the model its call names (metadata ``splitlearn-model``)."""
        kinds = {"Session": (True, True), "Forward": (False, False), "Info": (False, False), **TrainingService.METHODS}
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        for name, (request_streaming, reply_streaming) in kinds.items():
            what = "this session step" if name == "Session" else f"this {name} call"
            if reply_streaming:
                factory: Any = (
                    grpc.stream_stream_rpc_method_handler if request_streaming else grpc.unary_stream_rpc_method_handler
                )
                behaviour: Any = self._routed_stream(name, what)
            else:
                factory = (
                    grpc.stream_unary_rpc_method_handler if request_streaming else grpc.unary_unary_rpc_method_handler
                )
                routed = self._routed_unary(name)
                drain = self.config.max_checkpoint_bytes + self.config.max_message_bytes
                behaviour = guarded_upload(routed, what, drain) if request_streaming else guarded(routed, what)
            handlers[name] = factory(behaviour, request_deserializer=_identity, response_serializer=_identity)
        return handlers

    def _routed_unary(self, name: str) -> Callable[[Any, Context], Awaitable[bytes]]:
        """A method with one reply, run by the model the call names (a request body, or a stream of them)."""

        async def call(request: Any, context: Context) -> bytes:
            async with self.models.use(requested_model(context.invocation_metadata() or ())) as model:
                reply: bytes = await model.handlers[name](request, context)
                return reply

        return call

    def _routed_stream(self, name: str, what: str) -> Callable[[Any, Context], AsyncIterator[bytes]]:
        """A method with a stream of replies, run by the model the call names; errors answered by status."""

        async def replies(request: Any, context: Context) -> AsyncGenerator[bytes, None]:
            async with self.models.use(requested_model(context.invocation_metadata() or ())) as model:
                inner = model.handlers[name](request, context)
                async with contextlib.aclosing(inner):
                    async for reply in inner:
                        yield reply

        async def call(request: Any, context: Context) -> AsyncIterator[bytes]:
            guarded_replies: AsyncGenerator[bytes, None] = guarded_stream(replies(request, context), context, what)
            async with contextlib.aclosing(guarded_replies):
                async for reply in guarded_replies:
                    yield reply

        return call

    async def _set_health(self, model: str, serving: bool) -> None:
        if self._health is not None and not self._stopped:
            from grpc_health.v1 import health_pb2

            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self._health.set(model, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop serving: refuse new work with UNAVAILABLE, let running calls finish, free everything.

        Health turns NOT_SERVING at once and new calls and new sessions are refused (a
        balanced client sends them to another replica); calls in flight, and the steps of
        sessions already open, get up to ``grace`` seconds (a drain), then are cancelled;
        the worker thread is stopped and joined; every session is freed. A second call does
        nothing.

        Args:
            grace: Seconds to let calls in flight finish; ``None`` waits for all of them.
        """
        if self._stopped:
            return
        self._stopped = True
        self._lifecycle.stopping = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await cancel_and_wait(self._sweeper)
        await self.models.stop()
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
            raise StateError("the server has no port yet; call `await server.start()` first.")
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

    def info(self, model: str | None = None) -> dict[str, Any]:
        """What ``Info`` answers for ``model`` (None: the default): the model, layers, dtypes,
        limits, version and the server's models (see docs/protocol.md).

        Raises:
            ModelNotFound: no model of that name.
            StateError: that model is not loaded (``Info`` over the wire loads it).
        """
        services: Model | None = self.models.slot(model).services
        if services is None:
            raise StateError(f"model {model!r} is not loaded yet; it loads on its first call.")
        return self._info_of(services)

    def _info_of(self, model: Model) -> dict[str, Any]:
        c = self.config
        trunk = model.trunk
        return {
            "model": model.context.model,
            "models": self.models.info(),
            "family": trunk.family.name,
            "model_type": str(getattr(trunk.config, "model_type", "")),
            "layer_range": list(trunk.layer_range),
            "hidden_size": model.context.hidden_size,
            "dtype": _dtype_name(trunk.dtype),
            "wire_dtypes": list(proto.HIDDEN_DTYPES),
            "reply_dtype": c.wire_dtype,
            "max_sessions": c.max_sessions,
            "sessions_open": self.store.sessions_open,
            "sessions_opened": self.store.sessions_opened,
            "max_tokens_total": c.max_tokens_total,
            "max_session_tokens": c.max_session_tokens,
            "session_ttl_s": float(c.session_ttl_s),
            "max_message_bytes": c.max_message_bytes,
            "max_model_bytes": c.max_model_bytes,
            "auth": c.auth_token is not None,
            "version": __version__,
            **model.training.info(),
        }

    async def _sweep(self) -> None:
        """Expire idle sessions every ``sweep_interval_s`` until cancelled."""
        interval = self.config.effective_sweep_interval_s
        while True:
            await asyncio.sleep(interval)
            self.store.expire_idle()
