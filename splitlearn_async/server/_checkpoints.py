"""Checkpoints in chunks on the server: uploads (``TrainOpen``, ``LoadAdapter``) and ``TrainSave``'s stream.

A checkpoint travels as a header that declares its blobs (size, SHA-256) and the chunk
size, then ``chunk`` messages (``protocol.checkpoints``). An upload is checked message by
message, before it costs anything:

1. the header: decoded within ``max_message_bytes``, its fields, the declared sizes, and
   a chunk size that fits a message;
2. the host's rules that need no bytes (by the caller: the mode may open, the adapter's
   name is free);
3. the budget (:meth:`CheckpointTransfers.reserve`): the declared total against
   ``max_checkpoint_bytes``, alone (``INVALID_ARGUMENT``) and beside the transfers in
   progress (``RESOURCE_EXHAUSTED``);
4. each chunk: its place (blob, offset: no gap, no repeat), its size, then each blob's
   SHA-256 when it is complete; a message after the last chunk is refused;
5. then the host builds tensors, after its own checks (the LoRA cost from the file's
   header, every tensor's name and shape).

A stream with no message for ``session_ttl_s`` ends with ``DEADLINE_EXCEEDED``. Whatever
ends a transfer (success, refusal, cancel, disconnect), its bytes and its share of the
budget are freed at once. Chunks are hashed off the event loop when they are large.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from splitlearn_async import protocol as proto
from splitlearn_async.errors import PreconditionFailed, TrunkBusy, TrunkRejected, TrunkTimeout, WireError

from ._context import OFF_LOOP_BYTES, ServerContext

__all__ = ["CheckpointTransfers"]


class CheckpointTransfers:
    """The server's checkpoint transfers: their budget, uploads received, one save per session.

    Args:
        server: The state the server's services share (its config and decoder).
    """

    def __init__(self, server: ServerContext) -> None:
        self.server = server
        self.limit = server.config.max_checkpoint_bytes
        self._saving: set[str] = set()

    @property
    def in_flight(self) -> int:
        """Bytes of checkpoints being transferred now, over all the server's models."""
        return self.server.checkpoints.in_flight

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for a transfer while the block runs.

        Raises:
            TrunkRejected: ``nbytes`` is over ``max_checkpoint_bytes`` by itself.
            TrunkBusy: it would pass the budget beside the transfers in progress.
        """
        if nbytes > self.limit:
            raise TrunkRejected(
                f"{what} is {nbytes} bytes, over this server's max_checkpoint_bytes={self.limit}; start the "
                "server with a larger --max-checkpoint-bytes (ServerConfig.max_checkpoint_bytes), or transfer "
                "a smaller checkpoint (a save without the optimizer state, say)."
            )
        books = self.server.checkpoints
        if books.in_flight + nbytes > self.limit:
            raise TrunkBusy(
                f"{what} ({nbytes} bytes) does not fit beside the {books.in_flight} bytes of checkpoints being "
                f"transferred now (max_checkpoint_bytes={self.limit}); try again when they are done."
            )
        books.in_flight += nbytes
        try:
            yield
        finally:
            books.in_flight -= nbytes

    async def first(self, requests: AsyncIterator[bytes]) -> Mapping[str, Any]:
        """The first message of an upload, decoded within the server's limits.

        Raises:
            WireError: the stream ended before it, or it is malformed or too large.
            TrunkTimeout: none arrived within ``session_ttl_s``.
        """
        body = await self._next(requests)
        if body is None:
            raise WireError("the stream ended before its first message; send the header, then the chunks.")
        return await self.server.decode(body)

    @contextlib.asynccontextmanager
    async def upload(
        self, requests: AsyncIterator[bytes], blobs: Sequence[proto.Blob], chunk_bytes: int | None, what: str
    ) -> AsyncIterator[dict[str, bytes]]:
        """Receive the declared ``blobs`` from the rest of ``requests``; the block gets them whole.

        Holds their bytes of the budget from before the first chunk until the block ends.
        With no blob declared, only checks that the stream ends after its header.

        Raises:
            TrunkRejected, TrunkBusy: the budget refuses the declared total.
            WireError: a chunk is out of place or of the wrong size, a blob's SHA-256
                differs, the stream ends early, or a message follows the last chunk.
            TrunkTimeout: the stream was idle for ``session_ttl_s``.
        """
        total = sum(b.size for b in blobs)
        with self.reserve(total, what):
            received = await self._receive(requests, blobs, chunk_bytes or proto.MIN_CHUNK_BYTES)
            try:
                yield received
            finally:
                received.clear()

    async def _receive(
        self, requests: AsyncIterator[bytes], blobs: Sequence[proto.Blob], chunk_bytes: int
    ) -> dict[str, bytes]:
        assembler = proto.BlobAssembler(blobs, chunk_bytes)
        while not assembler.complete:
            body = await self._next(requests)
            if body is None:
                assembler.check_complete()  # raises: the stream was cut short
                break
            chunk = proto.parse_chunk(await self.server.decode(body))
            if len(chunk.data) > OFF_LOOP_BYTES:
                await asyncio.to_thread(assembler.add, chunk)  # hashing: about 1 ms per MiB
            else:
                assembler.add(chunk)
        if await self._next(requests) is not None:
            raise WireError("a message followed the last chunk of the checkpoint; end the stream after it.")
        if not blobs:
            return {}
        return await asyncio.to_thread(assembler.take)

    async def _next(self, requests: AsyncIterator[bytes]) -> bytes | None:
        """The next message of ``requests``, None at its end.

        Raises:
            TrunkTimeout: none arrived within ``session_ttl_s``.
        """
        ttl = self.server.config.session_ttl_s
        try:
            return await asyncio.wait_for(anext(requests, None), ttl)
        except asyncio.TimeoutError:
            raise TrunkTimeout(
                f"no message of this upload arrived for session_ttl_s={ttl} s, so it was dropped; send the "
                "chunks one after another without pausing."
            ) from None

    def reply_chunk_bytes(self, requested: int | None) -> int:
        """The chunk size of a ``TrainSave`` stream: the one asked for, at most what a message may carry.

        Raises:
            WireError: ``requested`` is below the protocol's minimum.
        """
        limit = self.server.config.max_message_bytes
        if requested is None:
            return proto.default_chunk_bytes(limit)
        proto.check_chunk_bytes(requested, None)
        return max(proto.MIN_CHUNK_BYTES, min(requested, limit - proto.CHUNK_OVERHEAD))

    @contextlib.contextmanager
    def one_save(self, training_id: str) -> Iterator[None]:
        """Mark a save of ``training_id`` as streaming; a second one meanwhile is refused.

        A save holds the session's serialised state until its stream ends, so one at a
        time per session bounds what saves can hold.

        Raises:
            PreconditionFailed: a save of this session is still streaming.
        """
        if training_id in self._saving:
            raise PreconditionFailed(
                f"a TrainSave of training session {training_id} is still streaming; read it to its end "
                "(or cancel it) before asking again."
            )
        self._saving.add(training_id)
        try:
            yield
        finally:
            self._saving.discard(training_id)
