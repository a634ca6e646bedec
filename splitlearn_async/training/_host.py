"""The one home of split training's rules on the trunk's side, for the server and LocalTrunk.

A :class:`TrainingHost` owns a trunk's training sessions, the graphs they keep between a
forward and its backward, and the trunk's LoRA adapters. It decides, in one place, what
may open (modes, full-trunk exclusivity, an adapter trained by one session at a time),
what a forward, backward, optimizer step, save or close needs first, and every cap
(:class:`TrainingLimits`). It raises errors of our tree only, so the gRPC server answers
them through the one status table and ``LocalTrunk`` raises them as they are.

Torch work goes through ``run``, which runs a function on the trunk's torch worker
thread (``StageWorker.run``); the books (sessions, kept graphs, adapters) are kept on
the event loop, between those calls. Replies can be built on the worker too: pass
``build``, e.g. a protocol builder that encodes the output for the wire.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch

from ..errors import PreconditionFailed, SessionNotFound, SplitLearnError, TrunkRejected
from ._adapters import AdapterRegistry, check_lora_cost, create_adapter
from ._batching import BatchMates, forward_key
from ._config import LoraConfig, OptimizerConfig
from ._engine import NonFiniteGradient, TrunkTrainer, serialize_state
from ._lora import LoraAdapter, lora_config_from_metadata
from ._pending import PendingSteps
from ._safetensors import from_safetensors, safetensors_metadata
from ._segments import Member
from ._state import TrunkState
from ._types import (
    BatchedRunner,
    Runner,
    TrainingEntry,
    TrainingLimits,
    apply_blocked,
    busy,
    check_can_open,
    check_open_settings,
    one_by_one,
)
from ._work import adapter_from_bytes, backward_steps, forward_steps, output

__all__ = ["Runner", "TrainingEntry", "TrainingHost", "TrainingLimits", "output"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class TrainingHost:
    """Training sessions, kept graphs and adapters of one trunk, under one set of rules.

    Args:
        trunk: The :class:`~splitlearn_async.models.stages.TrunkStage` (shared with inference).
        run: Runs a function on the trunk's torch worker thread (``StageWorker.run``).
        limits: The caps.
        clock: Monotonic clock in seconds.
        run_batched: Runs items on that worker batched by key (``StageWorker.run_batched``),
            so that training forwards and backwards of different sessions that wait together
            run as one batch (``limits.batch_tokens``); None runs each alone.
    """

    def __init__(
        self,
        trunk: Any,
        run: Runner,
        limits: TrainingLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        run_batched: BatchedRunner | None = None,
    ) -> None:
        self.trunk = trunk
        self.limits = limits or TrainingLimits()
        self._run = run
        self._batched = run_batched or one_by_one(run)
        self._clock = clock
        self.adapters = AdapterRegistry(self.limits.max_adapters)
        self.pending = PendingSteps(self.limits.max_pending_steps, self.limits.pending_step_ttl_s, clock)
        self.sessions: dict[str, TrainingEntry] = {}
        self.mates = BatchMates(self.limits, self.pending)  # backwards of batched forwards, meeting

    # --- opening and closing -----------------------------------------------------------------

    async def open(
        self,
        mode: str = "lora",
        *,
        lora: LoraConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        adapter_id: str | None = None,
        weights: bytes | None = None,
        optimizer_state: bytes | None = None,
    ) -> TrainingEntry:
        """Open a training session (and create its adapter, for a new LoRA one).

        Args:
            mode: ``"lora"``, ``"full"`` or ``"frozen"``.
            lora: Settings of a new adapter; default ``LoraConfig()``.
            optimizer: The trunk optimizer's settings; default ``OptimizerConfig()``.
            adapter_id: Train the loaded adapter of this name, or create it under this name.
            weights: Safetensors bytes to start from (an adapter, or trunk weights for ``"full"``).
            optimizer_state: Safetensors bytes of a saved optimizer state to resume.

        Returns:
            The session's :class:`TrainingEntry`.

        Raises:
            ConfigError: an unknown mode, a malformed adapter name, or a name with a mode other than LoRA.
            PreconditionFailed: full training is not allowed, or would run beside other sessions,
                or the adapter is being trained by another session.
            TrunkBusy: too many sessions or adapters.
            CheckpointError: ``weights`` or ``optimizer_state`` do not fit this trunk.
        """
        self.check_open(mode, adapter_id)
        adapter, created = await self._adapter_for(mode, adapter_id, lora or LoraConfig(), weights)
        try:
            trainer = await self._call(TrunkTrainer, self.trunk, mode, optimizer or OptimizerConfig(), adapter)
            if weights and not created:  # a new adapter was built from them already
                tensors, _ = await self._call(from_safetensors, weights)
                await self._call(trainer.load_weights, tensors)
            if optimizer_state:
                tensors, meta = await self._call(from_safetensors, optimizer_state)
                await self._call(trainer.load_optimizer_state, tensors, meta)
            self._check_can_open(mode, adapter_id if created else None)  # others may have opened meanwhile
        except BaseException:
            if created and adapter is not None:
                self.adapters.adapters.pop(adapter.adapter_id, None)
            raise
        entry = TrainingEntry(
            secrets.token_hex(12), trainer, mode, adapter.adapter_id if adapter else None, self._clock()
        )
        self.sessions[entry.training_id] = entry
        logger.info("training session %s opened (%s, %d trainable)", entry.training_id, mode, trainer.num_trainable)
        return entry

    def check_open(self, mode: str, adapter_id: str | None) -> None:
        """The rules of :meth:`open` that need no checkpoint: a server checks them before any byte arrives.

        Raises:
            ConfigError: an unknown mode, a malformed adapter name, or a name with a mode other than LoRA.
            PreconditionFailed: full training is not allowed, or would run beside other sessions,
                or the adapter is being trained by another session.
            TrunkBusy: too many sessions.
        """
        check_open_settings(mode, adapter_id)
        self._check_can_open(mode, adapter_id)

    def _check_can_open(self, mode: str, adapter_id: str | None) -> None:
        check_can_open(self.limits, list(self.sessions.values()), mode, adapter_id)

    async def _adapter_for(
        self, mode: str, adapter_id: str | None, lora: LoraConfig, weights: bytes | None
    ) -> tuple[LoraAdapter | None, bool]:
        """The adapter a LoRA session trains: the loaded one of that name, or a new one (from ``weights``)."""
        if mode != "lora":
            return None, False
        if adapter_id is not None and adapter_id in self.adapters.adapters:
            return self.adapters.adapters[adapter_id], False
        adapter_id = adapter_id or self.adapters.new_id()
        self.adapters.check_room(adapter_id)
        check_lora_cost(
            self.trunk, self.limits, lora_config_from_metadata(safetensors_metadata(weights)) if weights else lora
        )
        adapter = await self._call(create_adapter, self.trunk, lora, adapter_id, weights)
        self.adapters.check_room(adapter_id)  # a concurrent call may have taken the name
        self.adapters.adapters[adapter_id] = adapter
        return adapter, True

    def close(self, training_id: str) -> bool:
        """Close a session: free its kept graphs and optimizer; its adapter stays loaded.

        Returns:
            False if the session was not open (closing is idempotent).
        """
        if self.sessions.pop(training_id, None) is None:
            return False
        freed = self.pending.drop_owner(training_id)
        self.mates.graphs_changed()
        logger.info("training session %s closed (%d kept graphs freed)", training_id, freed)
        return True

    def entry(self, training_id: str) -> TrainingEntry:
        """The open session ``training_id``.

        Raises:
            SessionNotFound: it was never opened, was closed, or expired.
        """
        entry = self.sessions.get(training_id)
        if entry is None:
            ttl = self.limits.session_ttl_s
            expiry = f", or expired after {ttl} s idle" if math.isfinite(ttl) else ""
            raise SessionNotFound(
                f"training session {training_id[:64]} is unknown: it was never opened, was closed{expiry}; "
                "open a new one."
            )
        return entry

    # --- steps -------------------------------------------------------------------------------

    async def forward(
        self,
        training_id: str,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        *,
        build: Callable[[torch.Tensor, int], R],
        keep_graph: bool = True,
    ) -> tuple[R, int]:
        """Run the trunk on ``hidden (B, T, H)`` as the session trains it.

        Args:
            training_id: The session.
            hidden: ``(B, T, H)`` bottom output.
            attention_mask: ``(B, T)`` validity of the tokens, or None.
            position_ids: ``(B, T)`` positions, or None.
            keep_graph: Keep the autograd graph for a backward; False evaluates (step id 0).
            build: Called on the worker with ``(output (B, T, H), step_id)``; its result is
                returned (e.g. the encoded reply; :func:`output` returns the output itself).

        Returns:
            ``(build(output, step_id), step_id)``.

        Raises:
            SessionNotFound: the session is unknown, or was closed during the forward.
            TrunkBusy: ``max_pending_steps`` graphs are kept already.
            TrunkRejected: the trunk refused the input (shapes, NaN or infinite output).
        """
        entry = self.entry(training_id)
        check = functools.partial(self._check_still_open, entry, "forward")
        step_id = 0
        if keep_graph:
            if self.pending.expire():
                self.mates.graphs_changed()
            self.pending.check_room()
            step_id = self.pending.reserve()
        member = Member(entry.trainer, hidden, attention_mask, position_ids, build, step_id, training_id)
        with busy(entry, self._clock):
            result, graph = await self._rejecting(
                forward_steps(
                    self._batched,
                    forward_key(self.trunk, self.limits, entry, hidden, attention_mask, position_ids, keep_graph),
                    member,
                    trunk=self.trunk,
                    layer_tokens=self.limits.segment_layer_tokens,
                    batch_tokens=self.limits.batch_tokens,
                    keep_graph=keep_graph,
                    check=check,
                )
            )
        if graph is None:
            return result, 0
        try:
            check()  # closed during the forward
            self.pending.add(training_id, graph, step_id)
        except SplitLearnError:
            graph.release()
            raise
        return result, step_id

    async def backward(
        self,
        training_id: str,
        step_id: int,
        grad_output: torch.Tensor,
        *,
        build: Callable[[torch.Tensor, int], R],
        apply: bool = True,
    ) -> R:
        """Back-propagate ``grad_output (B, T, H)`` through step ``step_id``'s kept graph.

        Args:
            training_id: The session.
            step_id: From :meth:`forward`; each step takes one backward.
            grad_output: Gradient of the loss w.r.t. that step's trunk output.
            apply: Step the optimizer afterwards; False only accumulates.
            build: Called on the worker with ``(grad_input (B, T, H), optimizer_steps)``; its
                result is returned (:func:`output` returns the gradient itself).

        Raises:
            SessionNotFound: the session is unknown.
            StepNotFound: the step is unknown, used or expired.
            TrunkRejected: the gradient's shape differs from the output's, or its values are not finite.
            PreconditionFailed: ``apply`` while other steps of the session wait for their backward.
        """
        entry = self.entry(training_id)
        graph = self.pending.get(training_id, step_id)
        if tuple(grad_output.shape) != graph.shape:
            raise TrunkRejected(
                f"grad_output has shape {list(grad_output.shape)} but the trunk output of step {step_id} has "
                f"shape {list(graph.shape)}; send the gradient of the loss w.r.t. that output."
            )
        others = len(self.pending.of_owner(training_id)) - 1
        if apply and others:
            raise PreconditionFailed(apply_blocked(others, "other "))
        self.pending.pop(training_id, step_id)
        self.mates.graphs_changed()
        check = functools.partial(self._check_still_open, entry, "backward")
        try:
            with busy(entry, self._clock):
                await self.mates.wait(training_id, graph)
                return await self._rejecting(
                    backward_steps(self._batched, entry.trainer, graph, grad_output, apply, build, check)
                )
        except NonFiniteGradient:
            if self.sessions.get(training_id) is entry:  # the graph is intact: the step may be sent again
                self.pending.add(training_id, graph, step_id)
            else:
                graph.release()
            raise
        except BaseException:  # the step is spent: its session closed, the call was cancelled or failed
            graph.release()
            raise

    async def optimizer_step(self, training_id: str, *, scale: float = 1.0) -> int:
        """Apply the gradients accumulated by ``backward(apply=False)``, times ``scale``; returns optimizer steps.

        ``scale`` is a global-norm clip's factor across the cut (``max_grad_norm / total``, at
        most 1); the total includes :meth:`grad_norm_sq`, which ``Backward`` reports.

        Raises:
            SessionNotFound: the session is unknown.
            PreconditionFailed: steps of the session still wait for their backward.
            TrunkRejected: ``scale`` is not in (0, 1].
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            raise TrunkRejected(f"an optimizer step's scale must be a number in (0, 1], got {scale!r}.")
        entry = self.entry(training_id)
        waiting = len(self.pending.of_owner(training_id))
        if waiting:
            raise PreconditionFailed(apply_blocked(waiting, ""))
        with busy(entry, self._clock):
            return await self._call(entry.trainer.optimizer_step, float(scale))

    def grad_norm_sq(self, training_id: str) -> float:
        """The squared norm of the session's accumulated gradients after its last backward.

        Raises:
            SessionNotFound: the session is unknown.
        """
        return self.entry(training_id).trainer.last_grad_norm_sq

    async def save(self, training_id: str, *, optimizer: bool = True) -> TrunkState:
        """The session's trained weights (and optimizer state) as safetensors bytes.

        Raises:
            SessionNotFound: the session is unknown.
        """
        entry = self.entry(training_id)
        with busy(entry, self._clock):
            weights, opt = await self._call(serialize_state, entry.trainer, optimizer)
        return TrunkState(entry.mode, weights, opt, entry.adapter_id)

    # --- adapters ----------------------------------------------------------------------------

    def adapter(self, adapter_id: str) -> LoraAdapter:
        """The loaded adapter ``adapter_id``.

        Raises:
            AdapterNotFound: no adapter of that name is loaded.
        """
        return self.adapters.get(adapter_id)

    async def load_adapter(self, adapter_id: str, weights: bytes) -> LoraAdapter:
        """Load a saved adapter (safetensors bytes) under ``adapter_id``.

        Raises:
            ConfigError: the name is malformed.
            AlreadyExists: an adapter of that name is loaded.
            TrunkBusy: ``max_adapters`` adapters are loaded.
            CheckpointError: the bytes are not an adapter that fits this trunk.
        """
        self.adapters.check_room(adapter_id)
        check_lora_cost(self.trunk, self.limits, lora_config_from_metadata(safetensors_metadata(weights)))
        adapter = await self._call(adapter_from_bytes, self.trunk, weights, adapter_id)
        self.adapters.check_room(adapter_id)  # a concurrent call may have loaded the name meanwhile
        self.adapters.adapters[adapter_id] = adapter
        return adapter

    def delete_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (inference sessions already using it keep it).

        Raises:
            AdapterNotFound: no adapter of that name is loaded.
            PreconditionFailed: a training session is training it.
        """
        self.adapters.get(adapter_id)
        if self._trained_by(adapter_id):
            raise PreconditionFailed(f"adapter {adapter_id!r} is being trained; close its training session first.")
        del self.adapters.adapters[adapter_id]

    def _trained_by(self, adapter_id: str) -> TrainingEntry | None:
        return next((e for e in self.sessions.values() if e.adapter_id == adapter_id), None)

    # --- upkeep ------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Free graphs older than ``pending_step_ttl_s`` and sessions idle for ``session_ttl_s``."""
        if self.pending.expire():
            self.mates.graphs_changed()
        now = self._clock()
        for entry in list(self.sessions.values()):
            if entry.busy == 0 and now - entry.last_used_s > self.limits.session_ttl_s:
                logger.info("training session %s expired after %.1f s idle", entry.training_id, now - entry.last_used_s)
                self.close(entry.training_id)

    def clear(self) -> None:
        """Close every session and free every kept graph (adapters stay)."""
        self.pending.clear()
        self.sessions.clear()
        self.mates.graphs_changed()

    @property
    def pending_steps(self) -> int:
        """Forwards waiting for their backward, over all sessions."""
        return len(self.pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes of activations kept by those forwards' graphs."""
        return self.pending.nbytes

    def info(self) -> dict[str, Any]:
        """The training fields of the server's ``Info``."""
        return {
            "training": True,
            "allow_full_training": self.limits.allow_full_training,
            "max_pending_steps": self.limits.max_pending_steps,
            "pending_step_ttl_s": float(self.limits.pending_step_ttl_s),
            "segment_layer_tokens": self.limits.segment_layer_tokens,
            "batch_tokens": self.limits.batch_tokens,
            "batch_wait_s": float(self.limits.batch_wait_s),
            "adapters": sorted(self.adapters.adapters),
        }

    # --- helpers -----------------------------------------------------------------------------

    async def _rejecting(self, work: Awaitable[T]) -> T:
        """Await ``work``; an input the trunk refuses (a torch ``ValueError``) becomes :class:`TrunkRejected`."""
        try:
            return await work
        except SplitLearnError:
            raise
        except ValueError as exc:  # torch-level refusal: shapes, NaN or infinite values
            raise TrunkRejected(str(exc).rstrip(".") + ".") from exc

    def _check_still_open(self, entry: TrainingEntry, what: str) -> None:
        """Raise :class:`SessionNotFound` if ``entry``'s session closed while a ``what`` of it ran."""
        if self.sessions.get(entry.training_id) is not entry:
            raise SessionNotFound(f"training session {entry.training_id} was closed during this {what}.")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the worker; an input the trunk refuses becomes :class:`TrunkRejected`."""
        return await self._rejecting(self._run(fn, *args))
