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
import logging
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
from ._context import ServerContext
from ._inference import InferenceService
from ._metrics import ServerMetrics
from ._sessions import SessionStore
from ._status import cancel_and_wait, guarded
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

    def __init__(
        self, trunk: TrunkStage, host: str = "127.0.0.1", port: int = 0, config: ServerConfig | None = None
    ) -> None:
        if config is None:
            config = ServerConfig()
        if not isinstance(config, ServerConfig):
            raise ConfigError(f"config must be a ServerConfig, got {type(config).__name__}.")
        self.trunk = trunk
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
        # the body size is capped by max_message_bytes; token limits answer RESOURCE_EXHAUSTED
        self.context = ServerContext(
            trunk=trunk,
            config=config,
            worker=worker,
            store=store,
            hidden_size=int(trunk.hidden_size),
            reply_dtype=WIRE_DTYPES[config.wire_dtype] if config.wire_dtype else None,
        )
        self.store = store
        self.worker = worker
        self._model_dtype = trunk.dtype
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._port: int | None = None
        self._stopped = False
        self.training = TrainingService(self.context)  # training methods, kept graphs, LoRA adapters
        self.inference = InferenceService(self.context, self.info, self.training.open_session_adapter)

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
        handlers = {
            "Session": grpc.stream_stream_rpc_method_handler(
                self.inference.session, request_deserializer=_identity, response_serializer=_identity
            ),
            "Forward": grpc.unary_unary_rpc_method_handler(
                guarded(self.inference.forward, "this forward call"),
                request_deserializer=_identity,
                response_serializer=_identity,
            ),
            "Info": grpc.unary_unary_rpc_method_handler(
                guarded(self.inference.info, "this Info call"),
                request_deserializer=_identity,
                response_serializer=_identity,
            ),
        }
        handlers.update(self.training.handlers())
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proto.SERVICE_NAME, handlers),))
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
            self.context.metrics = ServerMetrics(
                self.host,
                self.config.metrics_port,
                {
                    "sessions_open": lambda: self.store.sessions_open,
                    "queue_depth": lambda: self.worker.queue_depth,
                    "cache_bytes": lambda: self.store.cache_bytes,
                    "training_sessions": lambda: len(self.training.host.sessions),
                    "pending_steps": lambda: self.training.pending_steps,
                },
            )
        await self.worker.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="splitlearn-session-sweeper")
        await server.start()
        for service in ("", proto.SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "trunk server on %s:%d (layers %s, %s, tls=%s, auth=%s)",
            self.host,
            port,
            self.trunk.layer_range,
            _dtype_name(self._model_dtype),
            self.config.tls,
            self.config.auth_token is not None,
        )

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
        self.context.stopping = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        await cancel_and_wait(self._sweeper)
        await self.training.stop()
        await self.worker.stop(grace)
        for session in self.store.sessions():
            self.store.close(session)
        self.context.metrics.stop()
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
        return self.context.metrics.port

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
            "hidden_size": self.context.hidden_size,
            "dtype": _dtype_name(self._model_dtype),
            "wire_dtypes": list(proto.HIDDEN_DTYPES),
            "reply_dtype": c.wire_dtype,
            "max_sessions": c.max_sessions,
            "sessions_open": self.store.sessions_open,
            "sessions_opened": self.store.sessions_opened,
            "max_tokens_total": c.max_tokens_total,
            "max_session_tokens": c.max_session_tokens,
            "session_ttl_s": float(c.session_ttl_s),
            "max_message_bytes": c.max_message_bytes,
            "auth": c.auth_token is not None,
            "version": __version__,
            **self.training.info(),
        }

    async def _sweep(self) -> None:
        """Expire idle sessions every ``sweep_interval_s`` until cancelled."""
        interval = self.config.effective_sweep_interval_s
        while True:
            await asyncio.sleep(interval)
            self.store.expire_idle()
