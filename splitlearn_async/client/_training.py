"""The trunk's training interface seen by the client, and its in-process implementation.

A *training session* is opened on a trunk (``LocalTrunk.open_training`` or
``RemoteTrunk.open_training``) and chooses what trains on the trunk's side: LoRA
adapters, the whole trunk, or nothing. Each step is two calls::

    out, step_id = await session.forward(hidden, mask, positions)   # (B, T, H), graph kept
    grad_in = await session.backward(step_id, grad_out, apply=True)  # (B, T, H)

``backward`` runs autograd through the graph the forward kept (no recomputation),
accumulates the trunk's parameter gradients, steps the trunk's optimizer when ``apply``
is true, and returns the gradient w.r.t. the trunk input for the client's bottom stage.
The rules (caps, what must happen first) are the trunk's
:class:`~splitlearn_async.training.TrainingHost`'s, the same in-process as on a server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ClientClosed
from ..training import TrainingHost, TrunkState, output

__all__ = ["LocalTrainingSession", "TrainingSession", "TrunkState"]


class TrainingSession:
    """One training run on a trunk. Use as ``async with await trunk.open_training(...) as s:``.

    Attributes:
        training_id: The session's id on the trunk.
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        adapter_id: The trained adapter's name (LoRA only); inference sessions can open with it.
        trainable_parameters: Elements the trunk's optimizer updates.
        grad_norm_sq: Squared norm of the trunk's accumulated gradients after the last
            backward, before any optimizer step: the trunk's share of a global-norm clip.
    """

    training_id: str = ""
    mode: str = ""
    adapter_id: str | None = None
    trainable_parameters: int = 0
    grad_norm_sq: float = 0.0

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Run the trunk on ``hidden (B, T, H)`` keeping its graph.

        Returns:
            ``(out (B, T, H), step_id)``; pass ``step_id`` to :meth:`backward`.

        Raises:
            TrunkBusy: too many steps wait for their backward.
            TrunkRejected: the input is malformed.
            SessionNotFound: the session is unknown or expired.
        """
        raise NotImplementedError

    async def evaluate(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Run the trunk as this session trains it (its adapter active) without keeping a graph.

        Returns:
            ``(B, T, H)`` trunk output.
        """
        raise NotImplementedError

    async def backward(self, step_id: int, grad_output: torch.Tensor, *, apply: bool = True) -> torch.Tensor:
        """Back-propagate ``grad_output (B, T, H)`` through step ``step_id``'s graph.

        Args:
            step_id: From :meth:`forward`; each step takes one backward.
            grad_output: Gradient of the loss w.r.t. that step's trunk output.
            apply: Step the trunk's optimizer afterwards; False only accumulates.

        Returns:
            ``(B, T, H)`` gradient w.r.t. the trunk input.

        Raises:
            SessionNotFound: the step is unknown, used or expired.
            TrunkRejected: the gradient's shape or values are wrong, or ``apply`` while
                other steps of this session still wait for their backward.
        """
        raise NotImplementedError

    async def optimizer_step(self, *, scale: float = 1.0) -> int:
        """Apply the gradients accumulated by ``backward(apply=False)``, times ``scale`` (a clip's
        factor, in (0, 1]); returns optimizer steps so far."""
        raise NotImplementedError

    async def state(self, *, optimizer: bool = True) -> TrunkState:
        """The trained weights (and the optimizer's state) as safetensors bytes."""
        raise NotImplementedError

    async def save(self, directory: str | Path, *, optimizer: bool = True) -> list[Path]:
        """Write the trained weights (and the optimizer's state) as safetensors files under ``directory``.

        ``adapter.safetensors`` or ``trunk.safetensors``, and ``trunk_optimizer.safetensors``
        (:meth:`TrunkState.save`'s names). A remote session streams them to disk as they arrive.

        Returns:
            The files written.
        """
        state = await self.state(optimizer=optimizer)
        return await asyncio.to_thread(state.save, directory)

    async def aclose(self) -> None:
        """End the session; kept graphs are freed, a trained adapter stays loaded (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> TrainingSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LocalTrainingSession(TrainingSession):
    """A training session of a :class:`~splitlearn_async.client.LocalTrunk`, on the trunk's training host.

    Args:
        host: The trunk's training host.
        training_id: The session's id there.
        on_close: Called once when the session closes (the trunk forgets it).
    """

    def __init__(self, host: TrainingHost, training_id: str, on_close: Callable[[LocalTrainingSession], None]) -> None:
        entry = host.entry(training_id)
        self._host = host
        self._on_close = on_close
        self.training_id = training_id
        self.mode = entry.mode
        self.adapter_id = entry.adapter_id
        self.trainable_parameters = entry.trainable_parameters
        self._closed = False

    def _check(self, action: str) -> None:
        if self._closed:
            raise ClientClosed(f"Cannot {action}, as this training session has been closed.")

    @property
    def pending_steps(self) -> int:
        """Steps of this session waiting for their backward."""
        return len(self._host.pending.of_owner(self.training_id))

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        self._check("run a training forward")
        return await self._host.forward(self.training_id, hidden, attention_mask, position_ids, build=output)

    async def evaluate(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        self._check("run an evaluation forward")
        out, _ = await self._host.forward(
            self.training_id, hidden, attention_mask, position_ids, build=output, keep_graph=False
        )
        return out  # (B, T, H)

    async def backward(self, step_id: int, grad_output: torch.Tensor, *, apply: bool = True) -> torch.Tensor:
        self._check("run a backward")
        grad = await self._host.backward(self.training_id, step_id, grad_output, build=output, apply=apply)
        self.grad_norm_sq = self._host.grad_norm_sq(self.training_id)
        return grad

    async def optimizer_step(self, *, scale: float = 1.0) -> int:
        self._check("step the optimizer")
        return await self._host.optimizer_step(self.training_id, scale=scale)

    async def state(self, *, optimizer: bool = True) -> TrunkState:
        self._check("save the training state")
        return await self._host.save(self.training_id, optimizer=optimizer)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._host.close(self.training_id)
        self._on_close(self)
