"""Split training on the trunk server: training sessions, kept step graphs, LoRA adapters.

:class:`TrainingService` adds the training methods to :class:`AsyncGRPCComputeServer`
(``TrainOpen``, ``TrainForward``, ``Backward``, ``OptimizerStep``, ``TrainSave``,
``TrainClose``, ``LoadAdapter``, ``DeleteAdapter``; see ``docs/protocol.md``). Like the
rest of the server, the event loop keeps the books and every torch operation runs on
the server's one :class:`StageWorker`, interleaved with the inference sessions' steps:
a training forward or backward is one work item, so a decode step waits behind at most
the item running when it arrives.

Memory is bounded: at most ``max_pending_steps`` graphs wait for their backward, each is
freed after ``pending_step_ttl_s`` (a client that vanished mid-step), and an idle training
session is closed after ``session_ttl_s``. Adapters stay loaded after their training
session closes (inference sessions may name them) until ``DeleteAdapter`` or shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import grpc

from splitlearn_async import protocol as proto
from splitlearn_async.errors import CheckpointError, ConfigError, WireError
from splitlearn_async.server._status import abort as _abort
from splitlearn_async.server._status import cancel_and_wait
from splitlearn_async.server._status import sentence as _sentence
from splitlearn_async.server._sessions import Session, SessionTooLong
from splitlearn_async.training._config import TRUNK_MODES, LoraConfig, OptimizerConfig
from splitlearn_async.training._engine import (
    AdapterRegistry,
    PendingFull,
    PendingSteps,
    StepNotFound,
    TrunkTrainer,
    create_adapter,
    from_safetensors,
    serialize_state,
)
from splitlearn_async.training._lora import LoraAdapter, bind_adapter
from splitlearn_async.wire import encode_tensor, field, pack
from splitlearn_async.worker import WorkerDied, WorkerStopped

if TYPE_CHECKING:
    from splitlearn_async.server._service import AsyncGRPCComputeServer

__all__ = ["TrainingService", "TrainingEntry"]

logger = logging.getLogger(__name__)

_Code = grpc.StatusCode


def _identity(body: bytes) -> bytes:
    return body


@dataclass(eq=False)
class TrainingEntry:
    """One open training session on the server.

    Attributes:
        training_id: Its id (random, so other clients cannot guess it).
        trainer: The :class:`TrunkTrainer` (used on the worker only).
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        adapter_id: The trained adapter's name (LoRA only).
        last_used_s: Clock time of the last call.
        busy: Calls of this session in progress (the sweeper leaves it alone while > 0).
    """

    training_id: str
    trainer: TrunkTrainer
    mode: str
    adapter_id: str | None
    last_used_s: float
    busy: int = 0


class TrainingService:
    """The training half of the trunk server (one per :class:`AsyncGRPCComputeServer`).

    Args:
        server: The server whose trunk, worker, store and config it uses.
        clock: Monotonic clock in seconds.
    """

    def __init__(self, server: AsyncGRPCComputeServer, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.config = server.config
        self._clock = clock
        self.adapters = AdapterRegistry(self.config.max_adapters)
        self.pending = PendingSteps(self.config.max_pending_steps, self.config.pending_step_ttl_s, clock)
        self.sessions: dict[str, TrainingEntry] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # --- wiring ------------------------------------------------------------------------------

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The generic method handlers to add to the ``splitlearn.Trunk`` service."""
        methods = {
            "TrainOpen": self._train_open, "TrainForward": self._train_forward, "Backward": self._backward,
            "OptimizerStep": self._optimizer_step, "TrainSave": self._train_save, "TrainClose": self._train_close,
            "LoadAdapter": self._load_adapter, "DeleteAdapter": self._delete_adapter,
        }
        return {
            name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=_identity, response_serializer=_identity)
            for name, fn in methods.items()
        }

    async def stop(self) -> None:
        """Stop the sweeper and free every graph and session (adapters go with the server)."""
        await cancel_and_wait(self._sweeper)
        self._sweeper = None
        self.pending.clear()
        self.sessions.clear()

    def info(self) -> dict[str, Any]:
        """Training fields of ``Info``."""
        return {
            "training": True,
            "allow_full_training": self.config.allow_full_training,
            "max_pending_steps": self.config.max_pending_steps,
            "pending_step_ttl_s": float(self.config.pending_step_ttl_s),
            "adapters": sorted(self.adapters.adapters),
        }

    @property
    def pending_steps(self) -> int:
        """Training forwards waiting for their backward."""
        return len(self.pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes of activations kept by those forwards' graphs."""
        return self.pending.nbytes

    async def open_session_adapter(self, session: Session, adapter_id: str | None, context: grpc.aio.ServicerContext) -> None:
        """Give an inference session the adapter its ``open`` named (None: base weights).

        Sets ``session.adapter_id`` (the batch key includes it) and binds the adapter to
        the session's KV cache, so every trunk call with that cache uses it.
        Aborts with ``NOT_FOUND`` if no adapter of that name is loaded.
        """
        if adapter_id is None:
            return
        try:
            adapter = self.adapters.get(adapter_id)
        except StepNotFound as exc:
            await _abort(context, _Code.NOT_FOUND, f"{exc} Load it with LoadAdapter or train it with TrainOpen first.")
        session.adapter_id = adapter_id
        bind_adapter(session.cache, adapter)

    # --- handlers ------------------------------------------------------------------------------

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        await self.server._admit(context)
        if self.server._stopping:
            await _abort(context, _Code.UNAVAILABLE, "the server is shutting down; retry on another server or later.")

    async def _train_open(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``TrainOpen``: create a training session (and its adapter, for LoRA)."""
        await self._enter(context)
        try:
            req = proto.parse_train_open(body, max_bytes=self.config.max_message_bytes)
            if req.mode not in TRUNK_MODES:
                raise ConfigError(f"mode must be one of {', '.join(TRUNK_MODES)}, got {req.mode!r}")
            optimizer = OptimizerConfig.from_wire(req.optimizer)
            lora = LoraConfig.from_wire(req.lora) if req.lora is not None else LoraConfig()
            if req.mode != "lora" and req.adapter_id is not None:
                raise ConfigError(f"adapter_id is only meaningful for mode 'lora', not {req.mode!r}")
        except (WireError, ConfigError) as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        await self._check_can_open(req.mode, context)
        adapter, created = await self._adapter_for_training(req.adapter_id, lora, req.mode, req.weights, context)
        try:
            trainer = await self._run(context, TrunkTrainer, self.server.trunk, req.mode, optimizer, adapter)
            if req.weights and not created:  # a new adapter was built from them already
                tensors, _ = await self._run(context, from_safetensors, req.weights)
                await self._run(context, trainer.load_weights, tensors)
            if req.optimizer_state:
                tensors, meta = await self._run(context, from_safetensors, req.optimizer_state)
                await self._run(context, trainer.load_optimizer_state, tensors, meta)
        except BaseException:
            if created and adapter is not None:
                self.adapters.adapters.pop(adapter.adapter_id, None)
            raise
        entry = TrainingEntry(secrets.token_hex(12), trainer, req.mode, adapter.adapter_id if adapter else None, self._clock())
        self.sessions[entry.training_id] = entry
        self._ensure_sweeper()
        logger.info("training session %s opened (%s, %d trainable)", entry.training_id, req.mode, trainer.num_trainable)
        return proto.build_reply(
            training_id=entry.training_id, mode=entry.mode, adapter_id=entry.adapter_id,
            trainable_parameters=trainer.num_trainable,
        )

    async def _check_can_open(self, mode: str, context: grpc.aio.ServicerContext) -> None:
        if mode == "full" and not self.config.allow_full_training:
            await _abort(context, _Code.FAILED_PRECONDITION, (
                "this server does not allow full-trunk training (it would change the weights every session "
                "is served with); train LoRA adapters instead, or start the server with allow_full_training=True."))
        if len(self.sessions) >= self.config.max_training_sessions:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, (
                f"{len(self.sessions)} training sessions are open (max_training_sessions="
                f"{self.config.max_training_sessions}); close one or try again later."))
        full_open = any(e.mode == "full" for e in self.sessions.values())
        if full_open or (mode == "full" and self.sessions):
            await _abort(context, _Code.FAILED_PRECONDITION, (
                "a full-trunk training session cannot run beside other training sessions (its optimizer "
                "changes the weights their kept graphs hold); close the other sessions first."))

    async def _adapter_for_training(
        self, adapter_id: str | None, lora: LoraConfig, mode: str, weights: bytes | None, context: grpc.aio.ServicerContext
    ) -> tuple[LoraAdapter | None, bool]:
        """The adapter a LoRA session trains: the loaded one of that name, or a new one (from ``weights`` if given)."""
        if mode != "lora":
            return None, False
        if adapter_id is not None and adapter_id in self.adapters.adapters:
            if any(e.adapter_id == adapter_id for e in self.sessions.values()):
                await _abort(context, _Code.FAILED_PRECONDITION, (
                    f"adapter {adapter_id!r} is being trained by another training session; close it first."))
            return self.adapters.adapters[adapter_id], False
        adapter_id = adapter_id or self.adapters.new_id()
        try:
            self.adapters.check_room(adapter_id)
        except PendingFull as exc:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))
        adapter = await self._run(context, create_adapter, self.server.trunk, lora, adapter_id, weights)
        self.adapters.adapters[adapter_id] = adapter
        return adapter, True

    async def _train_forward(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``TrainForward``: run the trunk keeping its graph; reply with the output and a step id."""
        await self._enter(context)
        try:
            training_id, inputs, keep_graph = proto.parse_train_forward(
                body, hidden_size=self.server._hidden_size, max_bytes=self.config.max_message_bytes,
                max_elements=self.server._max_elements,
            )
            rows, columns = inputs.hidden_states.shape[:2]
            self.server.store.check_tokens(rows, columns, "a training forward")
        except WireError as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        except SessionTooLong as exc:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))
        entry = await self._entry(training_id, context)
        reply_dtype = self.server._reply_dtype or inputs.hidden_states.dtype
        if not keep_graph:  # evaluation: the trained trunk's output, nothing kept
            entry.busy += 1
            try:
                frame = await self._run(context, _evaluate_frame, entry.trainer, inputs, reply_dtype)
            finally:
                entry.busy -= 1
                entry.last_used_s = self._clock()
            return pack({"kind": "result", "hidden_states": frame, "step_id": 0})
        self.pending.expire()
        try:
            self.pending.check_room()
        except PendingFull as exc:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))
        entry.busy += 1
        try:
            frame, graph = await self._run(context, _forward_frame, entry.trainer, inputs, reply_dtype)
        finally:
            entry.busy -= 1
            entry.last_used_s = self._clock()
        if self.sessions.get(training_id) is not entry:
            graph.release()
            await _abort(context, _Code.NOT_FOUND, f"training session {training_id} was closed during this forward.")
        try:
            step_id = self.pending.add(training_id, graph)
        except PendingFull as exc:
            graph.release()
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))
        return pack({"kind": "result", "hidden_states": frame, "step_id": step_id})

    async def _backward(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``Backward``: back-propagate through a kept graph, maybe step the optimizer, reply with grad_input."""
        await self._enter(context)
        try:
            req = proto.parse_backward(
                body, hidden_size=self.server._hidden_size, max_bytes=self.config.max_message_bytes,
                max_elements=self.server._max_elements,
            )
        except WireError as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        entry = await self._entry(req.training_id, context)
        try:
            graph = self.pending.get(req.training_id, req.step_id)
        except StepNotFound as exc:
            await _abort(context, _Code.NOT_FOUND, str(exc))
        if tuple(req.grad_output.shape) != graph.shape:
            await _abort(context, _Code.INVALID_ARGUMENT, (
                f"grad_output has shape {list(req.grad_output.shape)} but the trunk output of step {req.step_id} "
                f"has shape {list(graph.shape)}; send the gradient of the loss w.r.t. that output."))
        others = len(self.pending.of_owner(req.training_id)) - 1
        if req.apply and others:
            await _abort(context, _Code.FAILED_PRECONDITION, (
                f"the optimizer cannot step while {others} other step(s) of this training session wait for their "
                "backward (their graphs hold the current weights); send those with apply=false first."))
        self.pending.pop(req.training_id, req.step_id)
        reply_dtype = self.server._reply_dtype or req.grad_output.dtype
        entry.busy += 1
        try:
            frame, steps = await self._run(context, _backward_frame, entry.trainer, graph, req.grad_output, req.apply, reply_dtype)
        finally:
            entry.busy -= 1
            entry.last_used_s = self._clock()
        return pack({"kind": "result", "grad_input": frame, "optimizer_steps": steps, "applied": req.apply})

    async def _optimizer_step(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``OptimizerStep``: apply the gradients accumulated by ``Backward`` with ``apply=false``."""
        training_id, _ = await self._parse_call(body, proto.Kind.STEP, context)
        entry = await self._entry(training_id, context)
        others = len(self.pending.of_owner(training_id))
        if others:
            await _abort(context, _Code.FAILED_PRECONDITION, (
                f"the optimizer cannot step while {others} step(s) of this training session wait for their backward; "
                "send their Backward (apply=false) first."))
        entry.busy += 1
        try:
            steps = await self._run(context, entry.trainer.optimizer_step)
        finally:
            entry.busy -= 1
            entry.last_used_s = self._clock()
        return proto.build_reply(optimizer_steps=steps)

    async def _train_save(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``TrainSave``: the trained weights (adapter or trunk) and the optimizer state, as safetensors."""
        training_id, msg = await self._parse_call(body, proto.Kind.SAVE, context)
        try:
            with_optimizer = bool(field(msg, "optimizer", bool, required=False, default=True))
        except WireError as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        entry = await self._entry(training_id, context)
        entry.busy += 1
        try:
            weights, opt = await self._run(context, serialize_state, entry.trainer, with_optimizer)
        finally:
            entry.busy -= 1
            entry.last_used_s = self._clock()
        return proto.build_reply(mode=entry.mode, adapter_id=entry.adapter_id, weights=weights, optimizer_state=opt)

    async def _train_close(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``TrainClose``: free the session's graphs and optimizer; its adapter stays loaded."""
        training_id, _ = await self._parse_call(body, proto.Kind.CLOSE, context)
        entry = await self._entry(training_id, context)
        self._close(entry)
        return proto.build_reply(training_id=training_id, closed=True)

    async def _load_adapter(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``LoadAdapter``: load a saved adapter under a name, for inference sessions or more training."""
        await self._enter(context)
        try:
            adapter_id, weights = proto.parse_load_adapter(body, max_bytes=self.config.max_message_bytes)
            self.adapters.check_room(adapter_id)
        except WireError as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        except PendingFull as exc:
            await _abort(context, _Code.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:
            await _abort(context, _Code.ALREADY_EXISTS, _sentence(exc))
        adapter = await self._run(context, _adapter_from_bytes, self.server.trunk, weights, adapter_id)
        if adapter_id in self.adapters.adapters:  # loaded by a concurrent call meanwhile
            await _abort(context, _Code.ALREADY_EXISTS, f"an adapter named {adapter_id!r} was loaded meanwhile.")
        self.adapters.adapters[adapter_id] = adapter
        return proto.build_reply(adapter_id=adapter_id, trainable_parameters=adapter.num_parameters)

    async def _delete_adapter(self, body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """``DeleteAdapter``: unload an adapter (inference sessions already using it keep it)."""
        await self._enter(context)
        try:
            adapter_id = proto.parse_delete_adapter(body, max_bytes=self.config.max_message_bytes)
        except WireError as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        if adapter_id not in self.adapters.adapters:
            await _abort(context, _Code.NOT_FOUND, f"no adapter named {adapter_id!r} is loaded on this server.")
        if any(e.adapter_id == adapter_id for e in self.sessions.values()):
            await _abort(context, _Code.FAILED_PRECONDITION, (
                f"adapter {adapter_id!r} is being trained; close its training session (TrainClose) first."))
        del self.adapters.adapters[adapter_id]
        return proto.build_reply(adapter_id=adapter_id, closed=True)

    # --- helpers -------------------------------------------------------------------------------

    async def _parse_call(self, body: bytes, kind: proto.Kind, context: grpc.aio.ServicerContext) -> tuple[str, dict[str, Any]]:
        await self._enter(context)
        try:
            return proto.parse_training_call(body, kind, max_bytes=self.config.max_message_bytes)
        except WireError as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))

    async def _entry(self, training_id: str, context: grpc.aio.ServicerContext) -> TrainingEntry:
        entry = self.sessions.get(training_id)
        if entry is None:
            await _abort(context, _Code.NOT_FOUND, (
                f"training session {training_id[:64]} is unknown: it was never opened, was closed, or expired after "
                f"{self.config.session_ttl_s} s idle; open a new one with TrainOpen."))
        return entry

    def _close(self, entry: TrainingEntry) -> None:
        if self.sessions.pop(entry.training_id, None) is not None:
            freed = self.pending.drop_owner(entry.training_id)
            logger.info("training session %s closed (%d kept graphs freed)", entry.training_id, freed)

    async def _run(self, context: grpc.aio.ServicerContext, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the worker, mapping its failures to status codes."""
        try:
            return await self.server.worker.run(fn, *args)
        except (WireError, ValueError, CheckpointError) as exc:
            await _abort(context, _Code.INVALID_ARGUMENT, _sentence(exc))
        except (WorkerStopped, WorkerDied) as exc:
            await _abort(context, _Code.UNAVAILABLE, f"the trunk worker is not running ({exc}); retry on another server.")
        except Exception as exc:  # one bad call must not take the server down
            logger.exception("training call failed")
            await _abort(context, _Code.INTERNAL, f"the trunk failed on this training call: {type(exc).__name__}: {exc}.")

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="splitlearn-training-sweeper")

    async def _sweep(self) -> None:
        """Free expired graphs and idle training sessions until cancelled."""
        interval = min(1.0, self.config.pending_step_ttl_s / 4, self.config.session_ttl_s / 4)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        """Free graphs older than ``pending_step_ttl_s`` and sessions idle for ``session_ttl_s``."""
        self.pending.expire()
        now = self._clock()
        for entry in list(self.sessions.values()):
            if entry.busy == 0 and now - entry.last_used_s > self.config.session_ttl_s:
                logger.info("training session %s expired after %.1f s idle", entry.training_id, now - entry.last_used_s)
                self._close(entry)


def _forward_frame(trainer: TrunkTrainer, inputs: proto.TrunkInputs, reply_dtype: Any) -> tuple[dict[str, Any], Any]:
    """(worker) Training forward; the output encoded as a wire frame."""
    out, graph = trainer.forward(inputs.hidden_states, inputs.attention_mask, inputs.position_ids)  # (B, T, H)
    return encode_tensor(out, reply_dtype), graph


def _evaluate_frame(trainer: TrunkTrainer, inputs: proto.TrunkInputs, reply_dtype: Any) -> dict[str, Any]:
    """(worker) Evaluation forward (no graph); the output encoded as a wire frame."""
    out = trainer.evaluate(inputs.hidden_states, inputs.attention_mask, inputs.position_ids)  # (B, T, H)
    return encode_tensor(out, reply_dtype)


def _backward_frame(trainer: TrunkTrainer, graph: Any, grad: Any, apply: bool, reply_dtype: Any) -> tuple[dict[str, Any], int]:
    """(worker) Backward (and optimizer step); grad_input encoded as a wire frame."""
    grad_in = trainer.backward(graph, grad, apply)  # (B, T, H)
    return encode_tensor(grad_in, reply_dtype), trainer.optimizer_steps


def _adapter_from_bytes(trunk: Any, weights: bytes, adapter_id: str) -> LoraAdapter:
    """(worker) Build an adapter for ``trunk`` from safetensors bytes."""
    tensors, meta = from_safetensors(weights)
    return LoraAdapter.from_tensors(trunk, tensors, meta, adapter_id)
