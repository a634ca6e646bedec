"""Servers for tests, and a raw session client over grpc.aio (the real client is RemoteTrunk)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from splitlearn_async import protocol as proto
from splitlearn_async.server import AsyncGRPCComputeServer, ServerConfig


@contextlib.asynccontextmanager
async def served(trunk: Any, config: ServerConfig | None = None, **fields: Any) -> AsyncIterator[AsyncGRPCComputeServer]:
    """A started server for ``trunk`` on ``127.0.0.1`` and a free port; stopped on exit.

    Args:
        trunk: The trunk stage to serve.
        config: The server's config; or give its ``fields`` as keywords instead.
    """
    if config is None:
        config = ServerConfig(**fields)
    elif fields:
        raise TypeError("give either a ServerConfig or its fields, not both")
    server = AsyncGRPCComputeServer(trunk, "127.0.0.1", 0, config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


def _identity(body: bytes) -> bytes:
    return body


def channel(port: int, *, root_cert: bytes | None = None) -> grpc.aio.Channel:
    """An insecure (or TLS, with ``root_cert``) channel to ``localhost``/127.0.0.1:port."""
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    if root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
        return grpc.aio.secure_channel(f"localhost:{port}", creds, options=options)
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)


def metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


class RawSession:
    """One ``Session`` stream: ``await s.send(body)`` returns the reply body."""

    def __init__(self, chan: grpc.aio.Channel, token: str | None = None) -> None:
        method = chan.stream_stream(proto.METHOD_SESSION, request_serializer=_identity, response_deserializer=_identity)
        self.call = method(metadata=metadata(token))

    async def send(self, body: bytes) -> bytes:
        await self.call.write(body)
        reply = await self.call.read()
        if reply is grpc.aio.EOF:
            code = await self.call.code()
            empty = grpc.aio.Metadata()
            raise grpc.aio.AioRpcError(code, empty, empty, await self.call.details())
        return reply

    async def open(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, **kw: Any) -> proto.TrunkResult:
        return proto.parse_result(await self.send(proto.build_open(hidden, mask, positions, **kw)))

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, **kw: Any) -> proto.TrunkResult:
        return proto.parse_result(await self.send(proto.build_step(hidden, mask, positions, **kw)))

    async def close(self) -> proto.TrunkResult:
        result = proto.parse_result(await self.send(proto.build_close()))
        await self.call.done_writing()
        return result

    def cancel(self) -> None:
        self.call.cancel()


async def unary(chan: grpc.aio.Channel, method: str, body: bytes, token: str | None = None) -> bytes:
    call = chan.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
    reply: bytes = await call(body, metadata=metadata(token))
    return reply


async def upload(chan: grpc.aio.Channel, method: str, bodies: list[bytes], token: str | None = None) -> bytes:
    """A client-streaming call (``TrainOpen``, ``LoadAdapter``): ``bodies`` up, the reply back."""
    call = chan.stream_unary(method, request_serializer=_identity, response_deserializer=_identity)
    reply: bytes = await call(iter(bodies), metadata=metadata(token))
    return reply


def load_adapter_bodies(adapter_id: str, weights: bytes, chunk_bytes: int = 4096) -> list[bytes]:
    """A whole ``LoadAdapter`` stream: the header declaring ``weights``, then its chunks."""
    blobs = proto.describe_blobs({"weights": weights})
    data = {"weights": weights}
    return [proto.build_load_adapter(adapter_id, blobs[0], chunk_bytes), *proto.chunk_bodies(blobs, data, chunk_bytes)]


def make_case(batch: int, prompt: int, steps: int, hidden_size: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Messages of one session: a left-padded prefill, then ``steps`` one-token steps.

    Each item is ``(hidden (B,T,H), mask (B,T), positions (B,T))``.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = [prompt - (row % prompt) for row in range(batch)]  # row 0 full, others left-padded
    mask = torch.zeros(batch, prompt, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, prompt - n :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = [(torch.randn(batch, prompt, hidden_size, generator=g), mask, positions)]
    last = positions[:, -1:]
    for i in range(steps):
        out.append((torch.randn(batch, 1, hidden_size, generator=g), torch.ones(batch, 1, dtype=torch.long), last + 1 + i))
    return out


def reference(trunk: Any, case: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """The trunk's outputs for ``case`` run in-process with its own KVCache."""
    cache = trunk.new_cache(case[0][0].shape[0])
    with torch.no_grad():
        return [trunk(h, m, p, cache=cache) for h, m, p in case]


async def run_session(chan: grpc.aio.Channel, case: list[tuple[torch.Tensor, ...]], token: str | None = None, **kw: Any) -> list[torch.Tensor]:
    """Send ``case`` over one session (open, steps, close); return the hidden states received."""
    s = RawSession(chan, token)
    results = [await s.open(*case[0], **kw)]
    for msg in case[1:]:
        results.append(await s.step(*msg, **kw))
    closed = await s.close()
    assert closed.closed
    return [r.hidden_states for r in results]
