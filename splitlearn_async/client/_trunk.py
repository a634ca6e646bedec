"""The trunk interface seen by the client, and its in-process implementation.

A trunk is anything with ``open_session()``: a session keeps the trunk's KV cache and
takes ``forward(hidden (B, T, H), attention_mask (B, T), position_ids (B, T))`` calls,
the first one with the prompt and each next one with a decode step. ``LocalTrunk`` runs a
:class:`~splitlearn_async.models.stages.TrunkStage` in-process on its own
:class:`~splitlearn_async.worker.StageWorker`; ``RemoteTrunk`` talks to a server.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import ClientClosed, SessionNotFound
from ..models.stages import run_stage
from ..worker import StageWorker

__all__ = ["TrunkSession", "LocalTrunk", "LocalTrunkSession"]

logger = logging.getLogger(__name__)


class TrunkSession:
    """One generation's conversation with the trunk; the trunk's KV cache lives with it.

    Use as ``async with await trunk.open_session() as session:``; leaving the block closes
    it and frees the cache.
    """

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run the trunk on ``hidden (B, T, H)`` with the new tokens' mask and positions ``(B, T)``."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the session and free its cache (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> "TrunkSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LocalTrunk:
    """A trunk stage run in-process, with the same interface as ``RemoteTrunk``.

    Args:
        trunk: The :class:`TrunkStage`.
        worker: The worker thread to run it on; by default the trunk gets its own, started
            on first use and stopped by :meth:`aclose`.
    """

    def __init__(self, trunk: Any, worker: StageWorker | None = None) -> None:
        self.trunk = trunk
        self._worker = worker
        self._owns_worker = worker is None
        self._closed = False
        self._sessions: set[LocalTrunkSession] = set()

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

    async def open_session(self) -> "LocalTrunkSession":
        """Open a session; its KV cache is created by the first ``forward``."""
        worker = await self._ensure_worker()
        session = LocalTrunkSession(self, worker)
        self._sessions.add(session)
        return session

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stateless trunk forward over ``hidden (B, T, H)`` (no cache)."""
        worker = await self._ensure_worker()
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
        self._closed = True
        if self._owns_worker and self._worker is not None:
            await self._worker.stop()

    async def __aenter__(self) -> "LocalTrunk":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _run_trunk(trunk: Any, hidden: torch.Tensor, mask: Any, positions: Any, cache: Any) -> torch.Tensor:
    return run_stage(trunk, hidden, mask, positions, cache).to(hidden.dtype)  # reply in the caller's dtype


class LocalTrunkSession(TrunkSession):
    """A session of a :class:`LocalTrunk`: a KV cache used on the trunk's worker thread."""

    def __init__(self, owner: LocalTrunk, worker: StageWorker) -> None:
        self._owner = owner
        self._worker = worker
        self._cache: Any = None
        self._closed = False

    @property
    def cache(self) -> Any:
        return self._cache

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        if self._closed:
            raise SessionNotFound("Cannot run a step on this trunk session, as it has been closed.")
        if self._cache is None:
            self._cache = self._owner.trunk.new_cache(hidden.shape[0])
        return await self._worker.run(_run_trunk, self._owner.trunk, hidden, attention_mask, position_ids, self._cache)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._cache = None
            self._owner._sessions.discard(self)
