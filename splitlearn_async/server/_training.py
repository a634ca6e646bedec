"""Split training on the trunk server: the training methods over the trunk's :class:`TrainingHost`.

:class:`TrainingService` adds ``TrainOpen``, ``TrainForward``, ``Backward``,
``OptimizerStep``, ``TrainSave``, ``TrainClose``, ``LoadAdapter`` and ``DeleteAdapter`` to
the ``splitlearn.Trunk`` service (see ``docs/protocol.md``). Each handler parses its body
(``protocol.training``), asks the host, and builds its reply with a protocol builder; the
rules and the caps are the host's, the same as in ``LocalTrunk``. Every error is answered
through the one status table (``server/_status.py``).

Like the rest of the server, the event loop keeps the books and every torch operation runs
on the server's one worker, interleaved with the inference sessions' steps: a training
forward or backward runs in layer segments, one work item each
(``training_segment_layer_tokens``), so a decode step waits behind at most the segment
running when it arrives. Memory is bounded: at most ``max_pending_steps`` graphs wait for
their backward, each is freed after ``pending_step_ttl_s``, and an idle training session is
closed after ``session_ttl_s``. Adapters stay loaded after their training session closes
(inference sessions may name them) until ``DeleteAdapter`` or shutdown.

Checkpoints travel in chunks (``_checkpoints.py``): ``TrainOpen`` and ``LoadAdapter`` are
client-streaming (a header, then the chunks of the checkpoint it declares), ``TrainSave``
is server-streaming (a header, then the chunks of the state, serialised once on the
worker and sent slice by slice from that one buffer), so a checkpoint of any size
crosses under ``max_message_bytes``; ``max_checkpoint_bytes`` bounds what transfers hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, ClassVar

import grpc
import torch

from splitlearn_async import protocol as proto
from splitlearn_async.training import LoraConfig, OptimizerConfig, TrainingHost, TrainingLimits, bind_adapter
from splitlearn_async.wire import field

from ._checkpoints import CheckpointTransfers
from ._context import ServerContext
from ._sessions import Session
from ._status import cancel_and_wait, guarded, guarded_stream, guarded_upload

__all__ = ["TrainingService"]

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, bytes]


def _identity(body: bytes) -> bytes:
    return body


class TrainingService:
    """The training half of the trunk server (one per model of an :class:`AsyncGRPCComputeServer`).

    Args:
        server: The state the server's services share.
        clock: Monotonic clock in seconds.
    """

    #: The methods, by name: (request streamed, reply streamed). Checkpoints travel in chunks:
    #: ``TrainOpen`` and ``LoadAdapter`` stream them up, ``TrainSave`` streams them down.
    METHODS: ClassVar[dict[str, tuple[bool, bool]]] = {
        "TrainOpen": (True, False),
        "TrainForward": (False, False),
        "Backward": (False, False),
        "OptimizerStep": (False, False),
        "TrainSave": (False, True),
        "TrainClose": (False, False),
        "LoadAdapter": (True, False),
        "DeleteAdapter": (False, False),
    }

    def __init__(self, server: ServerContext, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        c = server.config
        limits = TrainingLimits(
            allow_full_training=c.allow_full_training,
            max_training_sessions=c.max_training_sessions,
            max_pending_steps=c.max_pending_steps,
            pending_step_ttl_s=c.pending_step_ttl_s,
            max_adapters=c.max_adapters,
            session_ttl_s=c.session_ttl_s,
            max_lora_rank=c.max_lora_rank,
            max_lora_targets=c.max_lora_targets,
            max_adapter_elements=c.max_adapter_elements,
            segment_layer_tokens=c.training_segment_layer_tokens,
            batch_tokens=c.training_batch_tokens,
            batch_wait_s=c.training_batch_wait_s,
        )
        steps = functools.partial(server.worker.run_batched, background=True)  # yield to inference steps
        self.host = TrainingHost(server.trunk, server.worker.run, limits, clock, steps)
        self.transfers = CheckpointTransfers(server)
        self._sweeper: asyncio.Task[None] | None = None

    # --- wiring ------------------------------------------------------------------------------

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[bytes, bytes]]:
        """The generic method handlers to add to the ``splitlearn.Trunk`` service."""
        unary = {
            "TrainForward": self._train_forward,
            "Backward": self._backward,
            "OptimizerStep": self._optimizer_step,
            "TrainClose": self._train_close,
            "DeleteAdapter": self._delete_adapter,
        }
        uploads = {"TrainOpen": self._train_open, "LoadAdapter": self._load_adapter}
        io = {"request_deserializer": _identity, "response_serializer": _identity}
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            name: grpc.unary_unary_rpc_method_handler(guarded(fn, f"this {name} call"), **io)
            for name, fn in unary.items()
        }
        drain = self.server.config.max_checkpoint_bytes + self.server.config.max_message_bytes
        for name, upload in uploads.items():
            handler = guarded_upload(upload, f"this {name} call", drain)
            handlers[name] = grpc.stream_unary_rpc_method_handler(handler, **io)
        handlers["TrainSave"] = grpc.unary_stream_rpc_method_handler(self._train_save, **io)
        return handlers

    async def stop(self) -> None:
        """Stop the sweeper and free every graph and session (adapters go with the server)."""
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        self.host.clear()

    def info(self) -> dict[str, Any]:
        """Training fields of ``Info``."""
        return {**self.host.info(), "max_checkpoint_bytes": self.transfers.limit}

    @property
    def pending_steps(self) -> int:
        """Training forwards waiting for their backward."""
        return self.host.pending_steps

    @property
    def pending_bytes(self) -> int:
        """Bytes of activations kept by those forwards' graphs."""
        return self.host.pending_bytes

    def open_session_adapter(self, session: Session, adapter_id: str | None) -> None:
        """Give an inference session the adapter its ``open`` named (None: base weights).

        Sets ``session.adapter_id`` (the batch key includes it) and binds the adapter to
        the session's KV cache, so every trunk call with that cache uses it.

        Raises:
            AdapterNotFound: no adapter of that name is loaded.
        """
        if adapter_id is None:
            return
        adapter = self.host.adapter(adapter_id)
        session.adapter_id = adapter_id
        bind_adapter(session.cache, adapter)

    def sweep(self) -> None:
        """Free graphs older than ``pending_step_ttl_s`` and sessions idle for ``session_ttl_s``."""
        self.host.sweep()

    # --- handlers ------------------------------------------------------------------------------

    async def _train_open(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        """``TrainOpen``: create a training session (and its adapter, for LoRA), maybe from an uploaded checkpoint."""
        self.server.admit(context)
        header = await self.transfers.first(requests)
        req = proto.parse_train_open(header, max_message_bytes=self.server.config.max_message_bytes)
        self.host.check_open(req.mode, req.adapter_id)  # before any byte of the checkpoint
        lora = LoraConfig.from_wire(req.lora) if req.lora is not None else None
        optimizer = OptimizerConfig.from_wire(req.optimizer)
        async with self.transfers.upload(
            requests, req.blobs, req.chunk_bytes, "the checkpoint of this TrainOpen"
        ) as blobs:
            entry = await self.host.open(
                req.mode,
                lora=lora,
                optimizer=optimizer,
                adapter_id=req.adapter_id,
                weights=blobs.get("weights"),
                optimizer_state=blobs.get("optimizer_state"),
            )
        self._ensure_sweeper()
        return proto.build_train_open_result(
            entry.training_id, entry.mode, entry.adapter_id, entry.trainable_parameters
        )

    async def _train_forward(self, body: bytes, context: Context) -> bytes:
        """``TrainForward``: run the trunk keeping its graph; reply with the output and a step id."""
        self.server.admit(context)
        s = self.server
        training_id, inputs, keep_graph = proto.parse_train_forward(
            await s.decode(body), hidden_size=s.hidden_size, max_elements=s.max_elements
        )
        rows, columns = inputs.hidden_states.shape[:2]
        s.store.check_tokens(rows, columns, "a training forward")
        dtype = s.reply_dtype_for(inputs.hidden_states)

        def build(out: torch.Tensor, step_id: int) -> bytes:  # on the worker
            return proto.build_train_forward_result(out, step_id, wire_dtype=dtype)

        reply, _ = await self.host.forward(
            training_id,
            inputs.hidden_states,
            inputs.attention_mask,
            inputs.position_ids,
            keep_graph=keep_graph,
            build=build,
        )
        return reply

    async def _backward(self, body: bytes, context: Context) -> bytes:
        """``Backward``: back-propagate through a kept graph, maybe step the optimizer, reply with grad_input."""
        self.server.admit(context)
        s = self.server
        req = proto.parse_backward(await s.decode(body), hidden_size=s.hidden_size, max_elements=s.max_elements)
        dtype = s.reply_dtype_for(req.grad_output)
        trainer = self.host.entry(req.training_id).trainer

        def build(grad_input: torch.Tensor, optimizer_steps: int) -> bytes:  # on the worker
            return proto.build_backward_result(
                grad_input,
                optimizer_steps=optimizer_steps,
                applied=req.apply,
                grad_norm_sq=trainer.last_grad_norm_sq,
                wire_dtype=dtype,
            )

        return await self.host.backward(req.training_id, req.step_id, req.grad_output, apply=req.apply, build=build)

    async def _optimizer_step(self, body: bytes, context: Context) -> bytes:
        """``OptimizerStep``: apply the gradients accumulated by ``Backward`` with ``apply=false``."""
        training_id, msg = await self._parse_call(body, proto.Kind.STEP, context)
        scale = field(msg, "scale", (int, float), required=False, default=1.0)
        return proto.build_optimizer_step_result(await self.host.optimizer_step(training_id, scale=scale))

    async def _train_save(self, body: bytes, context: Context) -> AsyncGenerator[bytes, None]:
        """``TrainSave`` stream: a header declaring the trained weights (adapter or trunk) and the
        optimizer state as safetensors blobs, then their chunks."""
        replies = guarded_stream(self._save_replies(body, context), context, "this TrainSave call")
        async with contextlib.aclosing(replies):
            async for reply in replies:
                yield reply

    async def _save_replies(self, body: bytes, context: Context) -> AsyncGenerator[bytes, None]:
        training_id, msg = await self._parse_call(body, proto.Kind.SAVE, context)
        with_optimizer = bool(field(msg, "optimizer", bool, required=False, default=True))
        chunk_bytes = self.transfers.reply_chunk_bytes(field(msg, "chunk_bytes", int, required=False))
        with self.transfers.one_save(training_id):
            state = await self.host.save(training_id, optimizer=with_optimizer)  # serialised once, on the worker
            data = state.blobs
            blobs = await asyncio.to_thread(proto.describe_blobs, data)  # SHA-256 off the loop
            with self.transfers.reserve(sum(b.size for b in blobs), f"the state of training session {training_id}"):
                yield proto.build_train_save_header(state.mode, state.adapter_id, blobs, chunk_bytes)
                for chunk in proto.chunk_bodies(blobs, data, chunk_bytes):  # slices of that one buffer
                    yield chunk

    async def _train_close(self, body: bytes, context: Context) -> bytes:
        """``TrainClose``: free the session's graphs and optimizer; its adapter stays loaded."""
        training_id, _ = await self._parse_call(body, proto.Kind.CLOSE, context)
        self.host.entry(training_id)  # unknown: NOT_FOUND
        self.host.close(training_id)
        return proto.build_train_closed(training_id)

    async def _load_adapter(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        """``LoadAdapter``: load an uploaded adapter under a name, for inference sessions or more training."""
        self.server.admit(context)
        header = await self.transfers.first(requests)
        adapter_id, weights, chunk_bytes = proto.parse_load_adapter(
            header, max_message_bytes=self.server.config.max_message_bytes
        )
        self.host.adapters.check_room(adapter_id)  # before any byte of the file
        async with self.transfers.upload(requests, [weights], chunk_bytes, f"adapter {adapter_id!r}") as blobs:
            adapter = await self.host.load_adapter(adapter_id, blobs["weights"])
        return proto.build_adapter_result(adapter_id, trainable_parameters=adapter.num_parameters)

    async def _delete_adapter(self, body: bytes, context: Context) -> bytes:
        """``DeleteAdapter``: unload an adapter (inference sessions already using it keep it)."""
        self.server.admit(context)
        adapter_id = proto.parse_delete_adapter(await self.server.decode(body))
        self.host.delete_adapter(adapter_id)
        return proto.build_adapter_result(adapter_id, closed=True)

    # --- helpers -------------------------------------------------------------------------------

    async def _parse_call(self, body: bytes, kind: proto.Kind, context: Context) -> tuple[str, Mapping[str, Any]]:
        self.server.admit(context)
        return proto.parse_training_call(await self.server.decode(body), kind)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="splitlearn-training-sweeper")

    async def _sweep(self) -> None:
        """Free expired graphs and idle training sessions until cancelled."""
        c = self.server.config
        interval = min(1.0, c.pending_step_ttl_s / 4, c.session_ttl_s / 4)
        while True:
            await asyncio.sleep(interval)
            self.host.sweep()
