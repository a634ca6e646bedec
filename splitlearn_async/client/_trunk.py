"""The trunk interface seen by the client, and its in-process implementation.

A trunk is anything with ``open_session()``: a session keeps the trunk's KV cache and
takes ``forward(hidden (B, T, H), attention_mask (B, T), position_ids (B, T))`` calls,
the first one with the prompt and each next one with a decode step. ``LocalTrunk`` runs a
:class:`~splitlearn_async.models.stages.TrunkStage` in-process on its own
:class:`~splitlearn_async.worker.StageWorker`; ``RemoteTrunk`` talks to a server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch

from ..errors import ClientClosed, ConfigError, SessionNotFound
from ..models.positions import prompt_positions
from ..models.stages import run_stage
from ..training import LoraConfig, OptimizerConfig, TrainingHost, TrainingLimits, bind_adapter
from ..worker import StageWorker
from ._training import LocalTrainingSession

__all__ = ["LocalTrunk", "LocalTrunkSession", "TrunkSession"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class TrunkSession:
    """One generation's conversation with the trunk; the trunk's KV cache lives with it.

    Use as ``async with await trunk.open_session() as session:``; leaving the block closes
    it and frees the cache.
    """

    async def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        beam_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the trunk on ``hidden (B, T, H)`` with the new tokens' mask and positions ``(B, T)``.

        ``beam_idx`` ``(B,)`` (beam search, steps after the prompt): first reorder the
        trunk's cache so that row ``i`` continues row ``beam_idx[i]``.
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the session and free its cache (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> TrunkSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LocalTrunk:
    """A trunk stage run in-process, with the same interface as ``RemoteTrunk``.

    Args:
        trunk: The :class:`TrunkStage`.
        worker: The worker thread to run it on; by default the trunk gets its own, started
            on first use and stopped by :meth:`aclose`.
        max_pending_steps: Most training steps kept waiting for their backward.
        pending_step_ttl_s: Seconds a training step's graph is kept without a backward.
        training: All the caps of training on this trunk; when given, it replaces the two
            arguments above. By default full-trunk training is allowed in-process.
    """

    def __init__(
        self,
        trunk: Any,
        worker: StageWorker | None = None,
        *,
        max_pending_steps: int = 8,
        pending_step_ttl_s: float = 300.0,
        training: TrainingLimits | None = None,
    ) -> None:
        self.trunk = trunk
        self._worker = worker
        self._owns_worker = worker is None
        self._closed = False
        self._sessions: set[LocalTrunkSession] = set()
        self._training: set[LocalTrainingSession] = set()
        limits = training or TrainingLimits(max_pending_steps=max_pending_steps, pending_step_ttl_s=pending_step_ttl_s)
        self.training = TrainingHost(trunk, self._run, limits, run_batched=self._run_batched)

    @property
    def sessions_open(self) -> int:
        """Sessions opened and not yet closed."""
        return len(self._sessions)

    async def _ensure_worker(self) -> StageWorker:
        if self._closed:
            raise ClientClosed("Cannot use the LocalTrunk, as it has been closed.")
        if self._worker is None:
            self._worker = StageWorker(name="splitlearn-local-trunk")
        if not self._worker.is_running:
            await self._worker.start()
        return self._worker

    async def _run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """Run ``fn(*args)`` on the trunk's worker thread (started on first use)."""
        worker = await self._ensure_worker()
        return await worker.run(fn, *args)

    async def _run_batched(self, key: Hashable, item: Any, batch_fn: Callable[[list[Any]], Sequence[Any]]) -> Any:
        """Run ``item`` through ``batch_fn`` on the trunk's worker, batched with items of equal ``key``.

        Training steps are background work: inference steps waiting meanwhile go first.
        """
        worker = await self._ensure_worker()
        return await worker.run_batched(key, item, batch_fn, background=True)

    async def open_session(self, adapter_id: str | None = None) -> LocalTrunkSession:
        """Open a session; its KV cache is created by the first ``forward``.

        Args:
            adapter_id: Run the trunk with this loaded LoRA adapter (see :meth:`open_training`
                and :meth:`load_adapter`); ``None`` uses the base weights.

        Raises:
            AdapterNotFound: no adapter of that name is loaded.
        """
        worker = await self._ensure_worker()
        adapter = self.training.adapter(adapter_id) if adapter_id is not None else None
        session = LocalTrunkSession(self, worker, adapter)
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
    ) -> LocalTrainingSession:
        """Open a training session on this trunk (see ``splitlearn_async.client._training``).

        Args:
            mode: ``"lora"`` (train adapters), ``"full"`` (train every trunk weight; they are
                shared with this trunk's inference) or ``"frozen"`` (only pass gradients through).
            lora: Adapter settings for a new adapter (``mode="lora"``).
            optimizer: The trunk optimizer's settings; default ``OptimizerConfig()``.
            adapter_id: Train the loaded adapter of this name, or create it under this name.
            weights: Safetensors bytes to start from (an adapter, or trunk weights for ``"full"``).
            optimizer_state: Safetensors bytes of a saved optimizer state to resume.

        Returns:
            A :class:`~splitlearn_async.client._training.LocalTrainingSession`.

        Raises:
            ConfigError: bad settings.
            PreconditionFailed: the adapter is being trained by another session, or a
                full-trunk session would run beside others.
            TrunkBusy: too many training sessions or adapters.
            CheckpointError: ``weights`` or ``optimizer_state`` do not fit this trunk.
        """
        if self._closed:
            raise ClientClosed("Cannot open a training session, as the LocalTrunk has been closed.")
        entry = await self.training.open(
            mode,
            lora=lora,
            optimizer=optimizer,
            adapter_id=adapter_id,
            weights=weights,
            optimizer_state=optimizer_state,
        )
        session = LocalTrainingSession(self.training, entry.training_id, self._training.discard)
        self._training.add(session)
        return session

    async def load_adapter(self, adapter_id: str, weights: bytes) -> None:
        """Load a saved adapter (safetensors bytes) under ``adapter_id`` for inference or more training.

        Raises:
            ConfigError: the name is malformed.
            AlreadyExists: an adapter of that name is loaded.
            TrunkBusy: too many adapters are loaded.
            CheckpointError: the file does not fit this trunk.
        """
        if self._closed:
            raise ClientClosed("Cannot load an adapter, as the LocalTrunk has been closed.")
        await self.training.load_adapter(adapter_id, weights)

    async def delete_adapter(self, adapter_id: str) -> None:
        """Forget the adapter ``adapter_id`` (sessions already using it keep it).

        Raises:
            AdapterNotFound: no adapter of that name is loaded.
            PreconditionFailed: a training session is training it.
        """
        self.training.delete_adapter(adapter_id)

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        return sorted(self.training.adapters.adapters)

    @property
    def pending_steps(self) -> int:
        """Training steps waiting for their backward (all training sessions)."""
        return self.training.pending_steps

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stateless trunk forward over ``hidden (B, T, H)`` (no cache).

        ``attention_mask`` defaults to all ones and ``position_ids`` to positions counted
        over the mask, as in :meth:`RemoteTrunk.forward`.
        """
        worker = await self._ensure_worker()
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long)
        if position_ids is None:
            position_ids = prompt_positions(attention_mask)
        return await worker.run(_run_trunk, self.trunk, hidden, attention_mask, position_ids, None)

    async def info(self) -> dict[str, Any]:
        """Family, layer range, hidden size and dtype of the trunk."""
        stage = self.trunk
        return {
            "family": stage.family.name,
            "model_type": stage.config.model_type,
            "layer_range": list(stage.layer_range),
            "hidden_size": stage.hidden_size,
            "dtype": str(stage.dtype).removeprefix("torch."),
        }

    async def aclose(self) -> None:
        """Close every session and stop the trunk's own worker (idempotent)."""
        if self._closed:
            return
        for session in list(self._sessions):
            await session.aclose()
        for training in list(self._training):
            await training.aclose()
        self._closed = True
        if self._owns_worker and self._worker is not None:
            await self._worker.stop()

    async def __aenter__(self) -> LocalTrunk:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _run_trunk(
    trunk: Any, hidden: torch.Tensor, mask: Any, positions: Any, cache: Any, beam_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """(worker) The trunk on ``hidden (B, T, H)``, after reordering ``cache`` by ``beam_idx`` if given."""
    if beam_idx is not None:
        cache.reorder(beam_idx)
    return run_stage(trunk, hidden, mask, positions, cache).to(hidden.dtype)  # reply in the caller's dtype


class LocalTrunkSession(TrunkSession):
    """A session of a :class:`LocalTrunk`: a KV cache used on the trunk's worker thread."""

    def __init__(self, owner: LocalTrunk, worker: StageWorker, adapter: Any = None) -> None:
        self._owner = owner
        self._worker = worker
        self._adapter = adapter  # a LoraAdapter, or None for the base weights
        self._cache: Any = None
        self._closed = False

    @property
    def cache(self) -> Any:
        return self._cache

    async def forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        beam_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`TrunkSession.forward`; the reorder runs in the step's worker item, just before it.

        Raises:
            SessionNotFound: the session was closed.
            ConfigError: ``beam_idx`` comes with the prompt (there is no cache to reorder yet),
                or does not fit the cache (shape, range).
        """
        if self._closed:
            raise SessionNotFound("Cannot run a step on this trunk session, as it has been closed.")
        if self._cache is None:
            if beam_idx is not None:
                raise ConfigError(
                    "beam_idx reorders the trunk's cache, so the prompt (the first forward) cannot carry it."
                )
            self._cache = self._owner.trunk.new_cache(hidden.shape[0])
            if self._adapter is not None:
                bind_adapter(self._cache, self._adapter)
        trunk = self._owner.trunk
        return await self._worker.run(_run_trunk, trunk, hidden, attention_mask, position_ids, self._cache, beam_idx)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._cache is not None:
                self._cache.release()
            self._cache = None
            self._owner._sessions.discard(self)
