"""The inference methods of the trunk server: ``Session`` (stream), ``Forward`` and ``Info``.

The event loop decodes frames and keeps the books (:class:`SessionStore`); every torch
operation -- the trunk itself, dtype casts, encoding of the reply -- runs on the server's
one worker. Each session's steps go to the worker as batched work (:mod:`._steps`), so
waiting steps of many sessions run as one trunk call.

Every failure ends only its own call or stream, answered through the one status table
(``_status.py``); a stream that ends for any reason (close, error, cancel, disconnect)
frees its session's cache in a ``finally``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
import torch

from splitlearn_async import protocol as proto
from splitlearn_async.errors import ArgumentError, SessionNotFound, TrunkRejected, TrunkUnavailable
from splitlearn_async.wire import Kind, check_keys

from ._context import ServerContext
from ._sessions import Session
from ._steps import StepWork, chunk_bounds, compute_batch

__all__ = ["InferenceService"]

Context = grpc.aio.ServicerContext[bytes, bytes]


class InferenceService:
    """The inference half of the trunk server.

    Args:
        server: The state the server's services share.
        info: What ``Info`` answers.
        bind_adapter: Gives a new session the adapter its ``open`` named (raises
            ``AdapterNotFound`` for an unknown name).
    """

    def __init__(
        self,
        server: ServerContext,
        info: Callable[[], dict[str, Any]],
        bind_adapter: Callable[[Session, str | None], None],
    ) -> None:
        self.server = server
        self._info_fields = info
        self._bind_adapter = bind_adapter
        #: Runs one batch of steps on the worker (an attribute, so that tests can watch it).
        self.compute_batch = compute_batch

    # --- handlers ------------------------------------------------------------------------

    async def session(self, requests: AsyncIterator[bytes], context: Context) -> AsyncGenerator[bytes, None]:
        """``Session`` stream: open -> result, step -> result ..., close -> closed result.

        Errors are raised, not answered: the server's handler answers them (``_status.py``).
        """
        s = self.server
        s.admit(context)
        session: Session | None = None
        try:
            async for body in requests:
                if s.stopping and session is None:  # draining: open sessions finish, new ones go elsewhere
                    raise TrunkUnavailable(
                        "the server is shutting down; open a new session on another server or retry later."
                    )
                if session is not None and session.expired:
                    raise SessionNotFound(
                        f"session {session.session_id} expired after {s.config.session_ttl_s} s idle "
                        "and its cache was freed; open a new session and replay the prompt."
                    )
                expected = (Kind.OPEN,) if session is None else (Kind.STEP, Kind.CLOSE)
                inputs = proto.parse_inputs(
                    await s.decode(body), hidden_size=s.hidden_size, expected=expected, max_elements=s.max_elements
                )
                if inputs is Kind.CLOSE and session is not None:  # close is only expected after open
                    sid = session.session_id
                    s.store.close(session)
                    session = None
                    yield proto.build_closed(sid)
                    return
                if not isinstance(inputs, proto.TrunkInputs):  # pragma: no cover (kinds are checked above)
                    raise TrunkRejected("a 'close' message arrived before 'open'.")
                if session is None:
                    session = self._open(inputs)
                else:
                    self._extend(session, inputs)
                yield await self._step(session, inputs)
        finally:
            if session is not None:
                s.store.close(session)

    def _open(self, inputs: proto.TrunkInputs) -> Session:
        rows, columns = inputs.hidden_states.shape[:2]
        if inputs.attention_mask.shape[1] != columns:
            raise TrunkRejected(
                f"attention_mask of an open message has shape {list(inputs.attention_mask.shape)} but "
                f"hidden_states has {columns} tokens; send a ({rows}, {columns}) mask."
            )
        session = self.server.store.open(rows, columns, inputs.session_id)
        session.model = self.server.model
        try:
            # a cache is a slot table, no tensor work: made here rather than queued behind
            # whatever the worker runs (a burst of prompts would otherwise open one by one)
            session.cache = self.server.trunk.new_cache(rows)
            self._bind_adapter(session, inputs.adapter_id)
        except BaseException:
            self.server.store.close(session)
            raise
        return session

    def _extend(self, session: Session, inputs: proto.TrunkInputs) -> None:
        rows, columns = inputs.hidden_states.shape[:2]
        if rows != session.rows:
            raise TrunkRejected(
                f"this session has {session.rows} rows but the step's hidden_states has {rows}; "
                "every step of a session must keep the batch of its open message."
            )
        mask_columns = inputs.attention_mask.shape[1]
        if mask_columns not in (columns, session.columns + columns):
            raise TrunkRejected(
                f"attention_mask has {mask_columns} columns but must have {columns} (the new tokens) "
                f"or {session.columns + columns} (past + new tokens)."
            )
        self.server.store.extend(session, columns)

    async def _step(self, session: Session, inputs: proto.TrunkInputs) -> bytes:
        """Run one open/step message through the trunk, batched with other sessions' steps.

        The message goes to the worker as :class:`StepWork` under the batch key
        ``("step", model, 1 or "prompt")``: waiting steps of other sessions of the same
        model run in the same trunk call, whatever their LoRA adapters (each row gets its
        own session's adapter: ``training._lora.RowAdapters``), decode steps with decode steps and prompt
        chunks of any length with prompt chunks (left-padded to the longest). A message
        longer than ``prefill_chunk_tokens`` is cut into chunks, each queued after the
        previous one finished, so other sessions' decode steps run between them. A step's
        ``beam_idx`` reorders the session's cache on the worker, in the first chunk's
        work, before its batched call (:mod:`._steps`).
        """
        s = self.server
        session.busy = True
        start = time.perf_counter()
        try:
            hidden = inputs.hidden_states  # (B, T, H), wire dtype
            length = int(hidden.shape[1])
            new_mask = inputs.attention_mask[:, -length:]  # (B, T): the new tokens
            reply_dtype = s.reply_dtype_for(hidden)
            earlier: list[torch.Tensor] = []
            body: bytes | torch.Tensor = b""
            for a, b in chunk_bounds(length, s.config.prefill_chunk_tokens):
                work = StepWork(
                    hidden[:, a:b],
                    new_mask[:, a:b],
                    inputs.position_ids[:, a:b],
                    session,
                    session.cache,
                    reply_dtype,
                    earlier,
                    last=b == length,
                    beam_idx=inputs.beam_idx if a == 0 else None,  # reordered once, before the first chunk
                )
                # decode steps batch with decode steps; prompt chunks of any length with each other
                key = ("step", s.model, 1 if b - a == 1 else "prompt")
                body = await self._run_step(key, work)
                if b != length and isinstance(body, torch.Tensor):
                    earlier.append(body)  # (B, chunk, H), model dtype
        finally:
            session.busy = False
            s.store.touch(session)
        s.metrics.observe_latency(time.perf_counter() - start)
        if not isinstance(body, bytes):  # pragma: no cover (the last chunk's result is the encoded reply)
            raise ArgumentError("the last chunk of a step did not produce a reply")
        return body

    async def _run_step(self, key: tuple[Any, ...], work: StepWork) -> bytes | torch.Tensor:
        """Queue ``work`` for a batched trunk call; raise this session's own failure."""
        s = self.server

        def batch(works: list[StepWork]) -> list[bytes | torch.Tensor | Exception]:
            return self.compute_batch(s.trunk, works, s.metrics)

        result = await s.worker.run_batched(key, work, batch)
        if isinstance(result, Exception):  # this session's rows failed, the batch did not
            raise result
        return result

    async def forward(self, body: bytes, context: Context) -> bytes:
        """``Forward``: stateless trunk call, no cache kept."""
        s = self.server
        s.admit(context)
        inputs = proto.parse_inputs(
            await s.decode(body), hidden_size=s.hidden_size, expected=Kind.FORWARD, max_elements=s.max_elements
        )
        if not isinstance(inputs, proto.TrunkInputs):  # pragma: no cover (only 'forward' is expected)
            raise TrunkRejected("a Forward body must be a 'forward' message with hidden states.")
        rows, columns = inputs.hidden_states.shape[:2]
        s.store.check_tokens(rows, columns, "a forward call")
        start = time.perf_counter()
        reply = await s.worker.run(_forward, s.trunk, inputs, s.reply_dtype_for(inputs.hidden_states))
        s.metrics.observe_step(int(rows), time.perf_counter() - start)
        return reply

    async def info(self, body: bytes, context: Context) -> bytes:
        """``Info``: a description of the model and the limits."""
        self.server.admit(context)
        if body:
            check_keys(await self.server.decode(body), frozenset({"kind"}), "an Info request")
        return proto.build_info(self._info_fields())


def _forward(trunk: Any, inputs: proto.TrunkInputs, reply_dtype: torch.dtype) -> bytes:
    """(worker) Run the trunk without a cache and encode the reply."""
    with torch.no_grad():
        x = inputs.hidden_states.to(device=trunk.device, dtype=trunk.dtype)
        out = trunk(x, inputs.attention_mask, inputs.position_ids, cache=None)  # (B, T, H)
        if not bool(torch.isfinite(out).all()):
            raise TrunkRejected(
                "the trunk's output holds NaN or infinite values for this input; check the hidden states sent."
            )
    return proto.build_result(out, wire_dtype=reply_dtype)
