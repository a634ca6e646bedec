"""What the server's services share: the trunk, its worker, the books, the limits, admission.

:class:`ServerContext` is the one object the inference and training services reach the
server through; neither reaches into the other, nor into :class:`AsyncGRPCComputeServer`.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from splitlearn_async.errors import TrunkUnavailable, Unauthenticated, WireError
from splitlearn_async.wire import unpack
from splitlearn_async.worker import StageWorker

from ._config import ServerConfig
from ._metrics import NullMetrics
from ._sessions import SessionStore

__all__ = ["OFF_LOOP_BYTES", "CheckpointBytes", "Lifecycle", "ServerContext"]

#: Bodies larger than this are decoded on a thread, not on the event loop.
OFF_LOOP_BYTES = 1 << 20


@dataclass
class Lifecycle:
    """Where the server is in its life, shared by the contexts of all its models."""

    stopping: bool = False


@dataclass
class CheckpointBytes:
    """Bytes of checkpoints being transferred now, over all the server's models (``max_checkpoint_bytes``)."""

    in_flight: int = 0


@dataclass
class ServerContext:
    """The state one model's services share with each other and with the server.

    A server holds one context per loaded model (``_models.py``): the trunk, its hidden
    size and its name are the model's; the worker, the session store, the config, the
    lifecycle and the metrics' registry are the server's, the same object in every context.

    Attributes:
        trunk: The :class:`~splitlearn_async.models.stages.TrunkStage` served.
        config: The server's limits and options.
        worker: The one torch worker thread.
        store: The inference sessions' books.
        hidden_size: The trunk's hidden size ``H``: every tensor on the wire is ``(B, T, H)``.
        reply_dtype: The dtype of hidden states in replies; None answers in the request's dtype.
        max_elements: Largest element count of a tensor in a request (None: the body limit only).
        metrics: Where the services report latencies and batch sizes (Prometheus when on),
            labelled with this model's name.
        model: The model's name (``Info``, batch keys, metrics labels, sessions).
        lifecycle: The server's lifecycle (:attr:`stopping`).
        checkpoints: The server's count of checkpoint bytes in transfer, shared by its models.
    """

    trunk: Any
    config: ServerConfig
    worker: StageWorker
    store: SessionStore
    hidden_size: int
    reply_dtype: torch.dtype | None = None
    max_elements: int | None = None
    metrics: NullMetrics = field(default_factory=NullMetrics)
    model: str = "default"
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    checkpoints: CheckpointBytes = field(default_factory=CheckpointBytes)

    @property
    def stopping(self) -> bool:
        """True once the server began to stop."""
        return self.lifecycle.stopping

    def admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Check that a call may start: the bearer token (if one is configured), and not stopping.

        Raises:
            Unauthenticated: the call lacks the configured bearer token, or carries a wrong one.
            TrunkUnavailable: the server is shutting down.
        """
        token = self.config.auth_token
        if token is not None:
            given = _authorization(context.invocation_metadata() or ())
            scheme, _, presented = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
                reason = (
                    "lacks the metadata 'authorization: Bearer <token>'"
                    if not given
                    else "carries a wrong bearer token"
                )
                raise Unauthenticated(f"this server requires a bearer token and the call {reason}.")
        if self.stopping:
            raise TrunkUnavailable("the server is shutting down; retry on another server or later.")

    async def decode(self, body: bytes) -> Mapping[str, Any]:
        """A request body as a map, decoded within the config's limits; a large one off the loop.

        Raises:
            WireError: the body is over ``max_message_bytes``, is not msgpack, or holds more
                (or longer) strings, arrays, maps or bytes than a message of the protocol.
        """
        size = len(body)
        limit = self.config.max_message_bytes
        if size > limit:
            raise WireError(
                f"the message has {size} bytes, over this server's max_message_bytes={limit}; send fewer "
                "tokens per message, or start the server with a larger --max-message-bytes "
                "(ServerConfig.max_message_bytes)."
            )
        limits = self.config.decode_limits
        if size > OFF_LOOP_BYTES:
            return await asyncio.to_thread(unpack, body, max_bytes=limit, limits=limits)
        return unpack(body, max_bytes=limit, limits=limits)

    def reply_dtype_for(self, request: torch.Tensor) -> torch.dtype:
        """The dtype of the reply to a request carrying ``request``."""
        return self.reply_dtype or request.dtype


def _authorization(metadata: Any) -> str:
    for key, value in metadata:
        if key.lower() == "authorization":
            return value if isinstance(value, str) else bytes(value).decode("latin-1")
    return ""
