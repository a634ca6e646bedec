"""Checkpoints in chunks on the client: the streaming calls, and sending and receiving blobs.

A checkpoint crosses as a header that declares its blobs (size, SHA-256) and chunk
messages (``protocol.checkpoints``), so one of any size fits under the message limits:

- :func:`send_checkpoint` -- ``TrainOpen`` and ``LoadAdapter``: hash the blobs (off the
  event loop), send the header, then the chunks, sliced from the caller's bytes one at a
  time.
- :func:`receive_state`, :func:`receive_files` -- ``TrainSave``: reassemble the blobs in
  memory, or stream them into files without holding a whole blob; either way every
  chunk's place and size and every blob's SHA-256 are checked, and a mismatch is a
  :class:`TrunkError`.

:func:`upload` and :func:`download` are the two streaming calls under them. Neither is
retried (a ``TrainOpen`` or ``LoadAdapter`` may have taken effect), and neither has an
overall deadline (a checkpoint's size has no bound): each message must make progress
within ``ClientConfig.step_timeout_s`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, TypeVar

import grpc

from .. import protocol as proto
from ..errors import TrunkError, TrunkTimeout, WireError
from ..training import TrunkState, state_files
from ..wire import unpack
from ._connection import Connection, UnaryCaller, identity
from ._errors import translate_rpc_error

__all__ = ["download", "receive_files", "receive_state", "send_checkpoint", "upload"]

T = TypeVar("T")

#: Replies larger than this are decoded and hashed on a thread, not on the event loop.
_OFF_LOOP_BYTES = 1 << 20


async def _within(step: Awaitable[T], timeout: float | None, what: str) -> T:
    try:
        return await asyncio.wait_for(step, timeout)
    except asyncio.TimeoutError:
        raise TrunkTimeout(f"{what} made no progress within step_timeout_s={timeout} s.") from None


async def upload(connection: Connection, method: str, bodies: Iterable[bytes], *, what: str) -> bytes:
    """A client-streaming call: write ``bodies`` (made one at a time), then read the one reply.

    Raises:
        TrunkTimeout: a message or the reply took longer than ``step_timeout_s``.
        TrunkError: the call failed (translated from the gRPC status).
    """
    stub = connection.channel().stream_unary(method, request_serializer=identity, response_deserializer=identity)
    call = stub(metadata=connection.metadata)
    timeout = connection.config.step_timeout_s
    try:
        with contextlib.suppress(asyncio.InvalidStateError):  # the server ended the call early: its status follows
            for body in bodies:
                await _within(call.write(body), timeout, what)
            await _within(call.done_writing(), timeout, what)
        return await _within(call, timeout, what)
    except grpc.aio.AioRpcError as exc:
        raise translate_rpc_error(exc, what) from exc
    finally:
        if not call.done():
            call.cancel()


async def download(connection: Connection, method: str, body: bytes, *, what: str) -> AsyncGenerator[bytes, None]:
    """A server-streaming call: the reply bodies, as they arrive.

    Raises:
        TrunkTimeout: a reply took longer than ``step_timeout_s``.
        TrunkError: the call failed (translated from the gRPC status).
    """
    stub = connection.channel().unary_stream(method, request_serializer=identity, response_deserializer=identity)
    call = stub(body, metadata=connection.metadata)
    timeout = connection.config.step_timeout_s
    try:
        while True:
            reply = await _within(call.read(), timeout, what)
            if reply is grpc.aio.EOF:
                return
            yield reply  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        raise translate_rpc_error(exc, what) from exc
    finally:
        if not call.done():
            call.cancel()


async def send_checkpoint(
    remote: UnaryCaller,
    method: str,
    header: Callable[[list[proto.Blob], int], bytes],
    data: Mapping[str, bytes | None],
    *,
    what: str,
) -> bytes:
    """Send ``header(blobs, chunk_bytes)`` and the chunks of ``data``'s blobs; returns the reply.

    Args:
        remote: The client (its ``upload`` call and ``config.effective_chunk_bytes``).
        method: ``TrainOpen`` or ``LoadAdapter``.
        header: Builds the first message from the blobs' declarations and the chunk size.
        data: ``{"weights": ..., "optimizer_state": ...}``; None or empty blobs are not sent.
        what: What the call does, for error messages.
    """
    blobs = await asyncio.to_thread(proto.describe_blobs, data) if any(data.values()) else []
    chunk_bytes = remote.config.effective_chunk_bytes
    bodies = itertools.chain([header(blobs, chunk_bytes)], proto.chunk_bodies(blobs, data, chunk_bytes))
    return await remote.upload(method, bodies, what=what)


class _Files:
    """The blobs of a state written to ``<name>.partial`` files, renamed once all are whole."""

    def __init__(self, directory: Path, mode: str) -> None:
        self.directory = directory
        self.names = state_files(mode)
        self.files: dict[str, tuple[Path, IO[bytes]]] = {}

    def write(self, blob: str, data: bytes) -> None:
        if blob not in self.files:
            if blob not in self.names:
                raise WireError(f"a state of this mode has no blob {blob!r}.")
            final = self.directory / self.names[blob]
            partial = final.with_name(final.name + ".partial")
            self.files[blob] = (final, partial.open("wb"))
        self.files[blob][1].write(data)

    def commit(self) -> list[Path]:
        written = []
        for final, f in self.files.values():
            f.close()
            os.replace(f.name, final)
            written.append(final)
        return written

    def discard(self) -> None:
        for _, f in self.files.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)


def _accept(assembler: proto.BlobAssembler, body: bytes, files: _Files | None) -> None:
    """Check one chunk reply (and write it to its file); a thread runs it for large bodies."""
    chunk = proto.parse_chunk(unpack(body))
    assembler.add(chunk)
    if files is not None:
        files.write(chunk.blob, chunk.data)


async def _receive(
    replies: AsyncIterator[bytes], what: str, directory: Path | None
) -> tuple[proto.SaveHeader, proto.BlobAssembler, list[Path]]:
    """Read a ``TrainSave`` stream to its end: its header, the checked blobs, and the files written (if any)."""
    first = await anext(replies, None)
    if first is None:
        raise TrunkError(f"the server ended {what} before its header; is it a splitlearn-async server?")
    files: _Files | None = None
    try:
        header = proto.parse_train_save_header(first)
        keep = directory is None
        assembler = proto.BlobAssembler(header.blobs, header.chunk_bytes or proto.MIN_CHUNK_BYTES, keep=keep)
        if directory is not None:
            await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
            files = _Files(directory, header.mode)
        async for body in replies:
            if len(body) > _OFF_LOOP_BYTES:
                await asyncio.to_thread(_accept, assembler, body, files)
            else:
                _accept(assembler, body, files)
        assembler.check_complete()
        written = await asyncio.to_thread(files.commit) if files is not None else []
        files = None
        return header, assembler, written
    except WireError as exc:
        raise TrunkError(f"the server's reply to {what} is corrupt: {exc}") from exc
    finally:
        if files is not None:
            await asyncio.to_thread(files.discard)


async def receive_state(replies: AsyncIterator[bytes], adapter_id: str | None, *, what: str) -> TrunkState:
    """Reassemble a ``TrainSave`` stream in memory.

    Raises:
        TrunkError: the stream is malformed, cut short, or a blob differs from its SHA-256.
    """
    header, assembler, _ = await _receive(replies, what, None)
    blobs = await asyncio.to_thread(assembler.take)
    weights = blobs.get("weights", b"")
    return TrunkState(header.mode, weights, blobs.get("optimizer_state"), header.adapter_id or adapter_id)


async def receive_files(replies: AsyncIterator[bytes], directory: Path, *, what: str) -> list[Path]:
    """Stream a ``TrainSave`` into files under ``directory``; returns the files written.

    No whole blob is held in memory: each chunk is written as it arrives to
    ``<file>.partial``, renamed once every blob has arrived and matched its SHA-256 (a
    failed save removes the partial files and leaves earlier ones as they were).

    Raises:
        TrunkError: the stream is malformed, cut short, or a blob differs from its SHA-256.
    """
    _, _, written = await _receive(replies, what, directory)
    return written
