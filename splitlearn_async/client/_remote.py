"""``RemoteTrunk``: the async client of a trunk server (``AsyncGRPCComputeServer``).

A :class:`RemoteTrunk` owns one :class:`~._connection.Connection` (a ``grpc.aio``
channel with the client's deadline, token and retry policy). Each :meth:`RemoteTrunk.open_session`
gives a :class:`~._remote_session.RemoteTrunkSession`: one ``Session`` stream that keeps
the trunk's KV cache on the server and is replayed if the stream breaks.

Faults, in one place each:

- Retries of ``UNAVAILABLE`` with backoff, and deadlines: :mod:`._connection`.
- Replay of a broken stream, cancellation of a session: :mod:`._remote_session`.
- Every ``grpc.aio.AioRpcError`` is translated by :mod:`._errors`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import torch

from .. import protocol as proto
from ..errors import ConfigError, TrunkError, WireError
from ..models.positions import prompt_positions
from ..training import LoraConfig, OptimizerConfig
from ._checkpoints import download, upload
from ._config import ClientConfig
from ._connection import Connection, parse_trunk_result
from ._remote_session import RemoteTrunkSession
from ._remote_training import RemoteTrainingSession, delete_remote_adapter, load_remote_adapter, open_remote_training

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["RemoteTrunk", "RemoteTrunkSession"]

T = TypeVar("T")


class RemoteTrunk:
    """An async client of a trunk server, with the interface of :class:`LocalTrunk`.

    Use it as ``async with RemoteTrunk("127.0.0.1:50051") as trunk:`` and pass it to
    :class:`SplitPipeline` or :class:`SplitTrainer`; or call :meth:`open_session`,
    :meth:`forward` and :meth:`info` yourself. The channel is created on first use, inside
    the running event loop.

    Several replicas of one trunk: give a target that resolves to all of them
    (``"dns:///trunk.svc.cluster.local:50051"``, e.g. a Kubernetes headless Service) or a
    list of addresses (``["10.0.0.1:50051", "10.0.0.2:50051"]``). gRPC balances new
    sessions round-robin over the replicas whose health service says SERVING; each
    session's stream stays on one replica. When a replica dies, its sessions replay their
    messages on another one (``ClientConfig.replay``); a draining replica (SIGTERM) turns
    NOT_SERVING and gets no new session while it finishes its open ones.

    Args:
        address: ``"host:port"`` of the server, a gRPC target naming several, or a list of
            ``"host:port"``.
        config: Deadlines, retries, TLS, token and wire dtype; ``None`` uses ``ClientConfig()``.
        model: On a server of several models, the one to run on (every call names it in
            the metadata ``splitlearn-model``); None runs on the server's default (first)
            model. A name the server does not serve gets :class:`ModelNotFound` with the
            names it does. (The balancer keeps asking each replica's health for the
            service as a whole, so that such a call gets that sentence, not UNAVAILABLE.)

    Raises:
        ConfigError: an address has no valid port, ``config`` is not a ClientConfig, or
            ``model`` is not a valid model name.
    """

    def __init__(
        self, address: str | Sequence[str], config: ClientConfig | None = None, *, model: str | None = None
    ) -> None:
        if config is None:
            config = ClientConfig()
        if not isinstance(config, ClientConfig):
            raise ConfigError(f"config must be a ClientConfig, got {type(config).__name__}.")
        self._connection = Connection(address, config, model)
        self.address = self._connection.address
        self.model = self._connection.model
        self.config = config
        self._sessions: set[RemoteTrunkSession] = set()

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._connection.closed

    @property
    def sessions_open(self) -> int:
        """Sessions opened by this client and not yet closed."""
        return len(self._sessions)

    @property
    def replays(self) -> int:
        """Completed replays after a broken stream, over all sessions of this client."""
        return self._connection.replays

    @property
    def wire_dtype(self) -> torch.dtype | None:
        """The dtype hidden states travel in (``ClientConfig.wire_dtype``); None for their own."""
        return self._connection.wire_dtype

    def channel(self) -> grpc.aio.Channel:
        """The client's ``grpc.aio`` channel, created on first use (for extensions such as training).

        Raises:
            ClientClosed: the client has been closed.
        """
        return self._connection.channel()

    async def aclose(self) -> None:
        """Close every open session and the channel (idempotent)."""
        if self.closed:
            return
        for session in list(self._sessions):
            await session.aclose()
        await self._connection.aclose()

    async def __aenter__(self) -> Self:
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
        self._connection.check_open("open a session")
        session = RemoteTrunkSession(self._connection, adapter_id, on_close=self._sessions.discard)
        self._sessions.add(session)
        return session

    async def open_training(
        self,
        mode: str = "lora",
        *,
        lora: LoraConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        adapter_id: str | None = None,
        weights: bytes | None = None,
        optimizer_state: bytes | None = None,
    ) -> RemoteTrainingSession:
        """Open a training session on the server (``TrainOpen``); see :class:`SplitTrainer`.

        Args:
            mode: ``"lora"``, ``"full"`` (the server must allow it) or ``"frozen"``.
            lora: Settings of a new adapter (``mode="lora"``).
            optimizer: The server-side optimizer's settings; default ``OptimizerConfig()``.
            adapter_id: Train the loaded adapter of this name, or create it under this name.
            weights: Safetensors bytes to start from (an adapter, or trunk weights for ``"full"``);
                they and ``optimizer_state`` travel in chunks (``ClientConfig.chunk_bytes``), so
                a checkpoint of any size fits under the message limits.
            optimizer_state: Safetensors bytes of a saved optimizer state to resume.

        Returns:
            A ``RemoteTrainingSession`` with ``forward``/``backward``/``optimizer_step``/``state``.

        Raises:
            ClientClosed: the client has been closed.
            ConfigError: a malformed adapter id.
            TrunkError: the server refused (see the error tree).
        """
        self._connection.check_open("open a training session")
        return await open_remote_training(
            self,
            mode,
            lora=lora,
            optimizer=optimizer,
            adapter_id=adapter_id,
            weights=weights,
            optimizer_state=optimizer_state,
        )

    async def load_adapter(self, adapter_id: str, weights: bytes) -> None:
        """Load a saved LoRA adapter (safetensors bytes, sent in chunks) on the server under ``adapter_id``.

        Raises:
            ClientClosed: the client has been closed.
            ConfigError: a malformed adapter id.
            AlreadyExists: an adapter of that name is loaded.
            TrunkRejected: the file does not fit the server's trunk.
            TrunkError: any other failure.
        """
        self._connection.check_open("load an adapter")
        await load_remote_adapter(self, adapter_id, weights)

    async def delete_adapter(self, adapter_id: str) -> None:
        """Forget the server's adapter ``adapter_id`` (sessions using it keep it).

        Raises:
            ClientClosed: the client has been closed.
            SessionNotFound: no adapter of that name is loaded.
            PreconditionFailed: a training session trains it.
        """
        self._connection.check_open("delete an adapter")
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
            ClientClosed: the client has been closed.
            TrunkError: the call failed (see the error tree); ``UNAVAILABLE`` is retried first.
        """
        self._connection.check_open("run a forward call")
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if position_ids is None:
            position_ids = prompt_positions(attention_mask)
        body = proto.build_forward(hidden, attention_mask, position_ids, wire_dtype=self.wire_dtype)
        reply = await self.unary(proto.METHOD_FORWARD, body, what="a Forward call")
        out = parse_trunk_result(reply, "a Forward call").hidden_states  # (B, T, H)
        if out is None:
            raise TrunkError("the server answered a Forward call without hidden states.")
        return out.to(hidden.dtype)

    async def info(self) -> dict[str, Any]:
        """The server's description: family, layer range, hidden size, dtype, limits, version.

        Raises:
            ClientClosed: the client has been closed.
            TrunkError: the call failed.
        """
        self._connection.check_open("ask for info")
        reply = await self.unary(proto.METHOD_INFO, proto.build_info_request(), what="an Info call")
        try:
            return proto.parse_info(reply)
        except WireError as exc:
            raise TrunkError(f"the server's reply to an Info call is malformed: {exc}") from exc

    async def unary(self, method: str, body: bytes, *, what: str, retry: bool = True) -> bytes:
        """One unary call with the client's deadline, token and retry policy (see ``Connection.unary``)."""
        return await self._connection.unary(method, body, what=what, retry=retry)

    async def upload(self, method: str, bodies: Iterable[bytes], *, what: str) -> bytes:
        """A client-streaming call (checkpoints up): ``bodies`` written one at a time, one reply.

        Never retried; no overall deadline, but each message within ``step_timeout_s``.
        """
        self._connection.check_open(f"send {what}")
        return await upload(self._connection, method, bodies, what=what)

    def download(self, method: str, body: bytes, *, what: str) -> AsyncGenerator[bytes, None]:
        """A server-streaming call (checkpoints down): the replies as they arrive.

        Never retried; no overall deadline, but each reply within ``step_timeout_s``.
        """
        self._connection.check_open(f"receive {what}")
        return download(self._connection, method, body, what=what)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``attempt()`` with the client's retry policy (see :meth:`Connection.retrying`).

        ``attempt`` signals a retryable failure by raising ``_connection.StreamBroken``.

        Raises:
            TrunkUnavailable: the server stayed unreachable for ``retry_deadline_s``.
        """
        return await self._connection.retrying(attempt, what)
