"""What the client's loops need of a trunk, as ``typing.Protocol`` classes.

- :class:`Trunk`: what :class:`SplitPipeline` needs to generate: sessions that keep the
  trunk's KV cache, a stateless ``forward``, ``info`` to check the split points, and a
  lifecycle (``async with``, ``aclose``).
- :class:`TrainableTrunk`: a :class:`Trunk` that :class:`SplitTrainer` can also train
  through: training sessions, and loading or deleting adapters.

``LocalTrunk`` and ``RemoteTrunk`` satisfy both (mypy checks it, in
``splitlearn_async.client``); a chain of trunks is a :class:`Trunk` as well. The
protocols are structural: nothing needs to subclass them. The sessions they hand out are
the ones of :class:`~._trunk.TrunkSession` and :class:`~._training.TrainingSession`.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

    from ..training import LoraConfig, OptimizerConfig
    from ._training import TrainingSession
    from ._trunk import TrunkSession

__all__ = ["TrainableTrunk", "Trunk"]


class Trunk(Protocol):
    """A trunk that :class:`SplitPipeline` can generate with (``LocalTrunk``, ``RemoteTrunk``)."""

    async def open_session(self, adapter_id: str | None = None) -> TrunkSession:
        """A new session: the first ``forward`` takes the prompt, each next one a decode step.

        Args:
            adapter_id: Run the trunk with this loaded LoRA adapter; ``None``: the base weights.
        """
        ...

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stateless trunk call over ``hidden (B, T, H)``; returns ``(B, T, H)``, nothing cached.

        ``attention_mask (B, T)`` defaults to all ones, ``position_ids (B, T)`` to positions
        counted over the mask.
        """
        ...

    async def info(self) -> dict[str, Any]:
        """The trunk's description: at least ``layer_range``, ``hidden_size`` and ``model_type``."""
        ...

    async def aclose(self) -> None:
        """Close every session and free what the trunk holds (idempotent)."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class TrainableTrunk(Trunk, Protocol):
    """A :class:`Trunk` that :class:`SplitTrainer` can train through."""

    async def open_training(
        self,
        mode: str = "lora",
        *,
        lora: LoraConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        adapter_id: str | None = None,
        weights: bytes | None = None,
        optimizer_state: bytes | None = None,
    ) -> TrainingSession:
        """Open a training session: ``mode`` is ``"lora"``, ``"full"`` or ``"frozen"``.

        Args:
            mode: What trains on the trunk's side.
            lora: Settings of a new adapter (``mode="lora"``).
            optimizer: The trunk optimizer's settings; ``None``: ``OptimizerConfig()``.
            adapter_id: Train the loaded adapter of this name, or create it under this name.
            weights: Safetensors bytes to start from.
            optimizer_state: Safetensors bytes of a saved optimizer state to resume.
        """
        ...

    async def load_adapter(self, adapter_id: str, weights: bytes) -> None:
        """Load a saved LoRA adapter (safetensors bytes) under ``adapter_id``."""
        ...

    async def delete_adapter(self, adapter_id: str) -> None:
        """Forget the adapter ``adapter_id`` (sessions already using it keep it)."""
        ...
