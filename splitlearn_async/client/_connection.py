"""The gRPC side of :class:`RemoteTrunk`: the address, one channel, unary calls and retries.

A :class:`Connection` owns one ``grpc.aio`` channel, created on first use inside the
running event loop, and applies the client's policy to every call:

- the bearer token (``ClientConfig.auth_token``) as ``authorization`` metadata;
- the deadline ``ClientConfig.step_timeout_s`` (past it: :class:`TrunkTimeout`);
- retries of ``UNAVAILABLE`` only (server down, restarting, shutting down), with
  exponential backoff and jitter, until ``ClientConfig.retry_deadline_s`` has passed since
  the first failure; then the caller gets :class:`TrunkUnavailable`.

Other statuses are translated once, by :mod:`splitlearn_async.client._errors`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import torch

from .. import protocol as proto
from ..errors import ClientClosed, ConfigError, TrunkError, TrunkTimeout, TrunkUnavailable, WireError
from ..wire import WIRE_DTYPES
from ._config import ClientConfig
from ._errors import is_retryable, translate_rpc_error

__all__ = [
    "Connection",
    "SessionCall",
    "StreamBroken",
    "UnaryCaller",
    "check_address",
    "identity",
    "parse_trunk_result",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A ``Session`` stream: bodies written, bodies read.
SessionCall = grpc.aio.StreamStreamCall[bytes, bytes]


def identity(body: bytes) -> bytes:
    """The (de)serializer of every call: bodies are built and parsed by :mod:`..protocol`."""
    return body


class StreamBroken(Exception):
    """A call or ``Session`` stream ended with a status; carries the code and details.

    Raised inside an attempt; :meth:`Connection.retrying` retries it when the code is
    ``UNAVAILABLE``. It never reaches the user.
    """

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class UnaryCaller(Protocol):
    """What the training calls need of a client: its calls, its settings, the closed flag."""

    @property
    def config(self) -> ClientConfig:
        """The client's settings (deadlines, chunk size)."""
        ...

    @property
    def closed(self) -> bool:
        """True once the client has been closed."""
        ...

    @property
    def wire_dtype(self) -> torch.dtype | None:
        """The dtype hidden states travel in; None for their own dtype."""
        ...

    async def unary(self, method: str, body: bytes, *, what: str, retry: bool = True) -> bytes:
        """One unary call with the client's deadline, token and retry policy."""
        ...

    async def upload(self, method: str, bodies: Iterable[bytes], *, what: str) -> bytes:
        """A client-streaming call (never retried): ``bodies`` up, one reply back."""
        ...

    def download(self, method: str, body: bytes, *, what: str) -> AsyncGenerator[bytes, None]:
        """A server-streaming call (never retried): one body up, the replies as they arrive."""
        ...


def _check_host_port(address: str, whole: object) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"RemoteTrunk address {whole!r} lacks a valid port; write it as 'host:port', e.g. '127.0.0.1:50051'."
        )
    return host, port


def check_address(address: object) -> str:
    """The gRPC target for ``address``: one server, or several replicas balanced by gRPC.

    ``address`` is ``"host:port"`` (an optional ``scheme://`` allowed), a gRPC target that
    resolves to several servers (``"dns:///trunk.svc:50051"``, ``"ipv4:10.0.0.1:50051,10.0.0.2:50051"``),
    or a list of ``"host:port"`` strings, which becomes an ``ipv4:`` (or ``ipv6:``) target.

    Raises:
        ConfigError: it is empty, a list mixes IPv4 and IPv6 or names a host name, or an
            address lacks a valid port.
    """
    if isinstance(address, (list, tuple)):
        return _list_target(address)
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"RemoteTrunk needs an address 'host:port', got {address!r}.")
    address = address.strip()
    for scheme in ("ipv4:", "ipv6:"):
        if address.startswith(scheme):
            for part in address[len(scheme) :].split(","):
                _check_host_port(part, address)
            return address
    _check_host_port(address.split("://", 1)[-1], address)
    return address


def _list_target(addresses: list[object] | tuple[object, ...]) -> str:
    """``["10.0.0.1:5001", "10.0.0.2:5002"]`` as the gRPC target ``"ipv4:10.0.0.1:5001,10.0.0.2:5002"``."""
    if not addresses:
        raise ConfigError("RemoteTrunk needs at least one address; got an empty list.")
    families = set()
    for item in addresses:
        if not isinstance(item, str):
            raise ConfigError(f"RemoteTrunk addresses must be 'host:port' strings, got {item!r}.")
        host, _ = _check_host_port(item.strip(), item)
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
        except ValueError:
            raise ConfigError(
                f"a list of RemoteTrunk addresses takes IP addresses, got the host name in {item!r}; give one "
                "name that resolves to every replica instead, e.g. 'dns:///trunk.svc.cluster.local:50051'."
            ) from None
    if len(families) > 1:
        raise ConfigError(f"a list of RemoteTrunk addresses must be all IPv4 or all IPv6, got {list(addresses)}.")
    return f"ipv{families.pop()}:" + ",".join(str(a).strip() for a in addresses)


#: The service config of every channel: round-robin over the resolved servers, and only
#: over those whose health service says SERVING for ``splitlearn.Trunk`` (a draining
#: replica says NOT_SERVING and gets no new stream).
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": proto.SERVICE_NAME},
    }
)


def parse_trunk_result(reply: bytes, what: str) -> proto.TrunkResult:
    """Parse a ``result`` reply of the server.

    Raises:
        TrunkError: the reply is malformed.
    """
    try:
        return proto.parse_result(reply)
    except WireError as exc:
        raise TrunkError(f"the server's reply to {what} is malformed: {exc}") from exc


class Connection:
    """One ``grpc.aio`` channel to a trunk server and the client's policy for calls on it.

    Args:
        address: ``"host:port"`` of the server.
        config: Deadlines, retries, TLS, token and wire dtype.
        model: The server's model every call names (metadata ``splitlearn-model``); None
            for the server's default model.

    Raises:
        ConfigError: the address has no valid port, or the model name is not valid.
    """

    def __init__(self, address: str | Sequence[str], config: ClientConfig, model: str | None = None) -> None:
        self.address = check_address(address)
        self.config = config
        self.model = None if model is None else proto.check_model_name(model)
        self.wire_dtype: torch.dtype | None = WIRE_DTYPES[config.wire_dtype] if config.wire_dtype else None
        metadata: list[tuple[str, str]] = []
        if config.auth_token:
            metadata.append(("authorization", f"Bearer {config.auth_token}"))
        if self.model is not None:
            metadata.append((proto.MODEL_METADATA, self.model))
        self.metadata = tuple(metadata) or None
        self.replays = 0  #: completed replays after a broken stream, over all sessions
        self._channel: grpc.aio.Channel | None = None
        self._closed = False
        #: How the retry loop waits between attempts (an attribute, so that tests can watch it).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._closed

    def check_open(self, action: str) -> None:
        """Raise :class:`ClientClosed` ("Cannot <action>, ...") once the connection is closed."""
        if self._closed:
            raise ClientClosed(f"Cannot {action}, as the RemoteTrunk has been closed.")

    def channel(self) -> grpc.aio.Channel:
        """The ``grpc.aio`` channel, created on first use.

        Raises:
            ClientClosed: the connection has been closed.
        """
        self.check_open("use the channel")
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
            # several replicas behind one target: gRPC's round robin over the healthy ones
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.enable_retries", 0),  # our own retry loop replays sessions; gRPC's must not resend
        ]
        if c.tls_server_name:
            options.append(("grpc.ssl_target_name_override", c.tls_server_name))
        if not c.uses_tls:
            return grpc.aio.insecure_channel(self.address, options=options)
        root = None
        if c.tls_root_cert_file is not None:
            with open(c.tls_root_cert_file, "rb") as f:
                root = f.read()
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
        return grpc.aio.secure_channel(self.address, credentials, options=options)

    def open_stream(self) -> SessionCall:
        """Start a ``Session`` stream (with the token; no deadline: each message has its own).

        Raises:
            ClientClosed: the connection has been closed.
        """
        stub = self.channel().stream_stream(
            proto.METHOD_SESSION, request_serializer=identity, response_deserializer=identity
        )
        return stub(metadata=self.metadata)

    async def aclose(self) -> None:
        """Close the channel (idempotent); every later call raises :class:`ClientClosed`."""
        self._closed = True
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

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
            ClientClosed: the connection has been closed.
            TrunkTimeout: no answer within ``step_timeout_s``.
            TrunkUnavailable: the server stayed unreachable for ``retry_deadline_s``.
            TrunkError: the call failed (translated from the gRPC status).
        """
        stub = self.channel().unary_unary(method, request_serializer=identity, response_deserializer=identity)
        timeout = self.config.step_timeout_s

        async def attempt() -> bytes:
            try:
                return await stub(body, timeout=timeout, metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TrunkTimeout(f"{what} did not finish within step_timeout_s={timeout} s.") from exc
                if retry and is_retryable(exc.code()):
                    raise StreamBroken(exc.code(), exc.details()) from exc
                raise translate_rpc_error(exc, what) from exc

        return await self.retrying(attempt, what)

    async def retrying(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``attempt()`` until it succeeds, retrying while it raises :class:`StreamBroken`.

        Waits between attempts grow by ``backoff_multiplier`` with +-20% jitter. A wait
        that would end past ``retry_deadline_s`` from the first failure is not taken: the
        last failure becomes :class:`TrunkUnavailable` instead. The deadline bounds the
        waits, not the attempts (each has its own ``step_timeout_s``), so it is checked
        between attempts rather than kept by a cancel scope around them.

        Raises:
            TrunkUnavailable: the server stayed unreachable for ``retry_deadline_s``.
            ClientClosed: the connection was closed while waiting to retry.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        tries = 0
        while True:
            try:
                return await attempt()
            except StreamBroken as broken:
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
                self.check_open("retry a call")
                await self.sleep(wait)
