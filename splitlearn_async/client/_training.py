"""The trunk's training interface seen by the client, and its in-process implementation.

A *training session* is opened on a trunk (``LocalTrunk.open_training`` or
``open_remote_training(remote_trunk, ...)``) and chooses what trains on the trunk's side:
LoRA adapters, the whole trunk, or nothing. Each step is two calls::

    out, step_id = await session.forward(hidden, mask, positions)   # (B, T, H), graph kept
    grad_in = await session.backward(step_id, grad_out, apply=True)  # (B, T, H)

``backward`` runs autograd through the graph the forward kept (no recomputation),
accumulates the trunk's parameter gradients, steps the trunk's optimizer when ``apply``
is true, and returns the gradient w.r.t. the trunk input for the client's bottom stage.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ClientClosed, ConfigError, SessionNotFound, TrunkBusy, TrunkRejected
from ..training._config import LoraConfig, OptimizerConfig, check_adapter_id
from ..training._engine import (
    PendingFull,
    PendingSteps,
    StepNotFound,
    TrunkTrainer,
    create_adapter,
    from_safetensors,
    serialize_state,
)
from ..worker import StageWorker

if TYPE_CHECKING:
    from ._trunk import LocalTrunk

__all__ = ["TrainingSession", "TrunkState", "LocalTrainingSession", "open_local_training"]

logger = logging.getLogger(__name__)

WEIGHTS_FILES = {"lora": "adapter.safetensors", "full": "trunk.safetensors"}
OPTIMIZER_FILE = "trunk_optimizer.safetensors"


@dataclass(frozen=True)
class TrunkState:
    """What a training session trained on the trunk's side, as safetensors bytes.

    Attributes:
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        weights: The adapter (peft layout) or the trunk's weights; empty for ``"frozen"``.
        optimizer: The trunk optimizer's state, or None if not asked for.
        adapter_id: The adapter's name (LoRA only).
    """

    mode: str
    weights: bytes
    optimizer: bytes | None = None
    adapter_id: str | None = None

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``adapter.safetensors`` (or ``trunk.safetensors``) and ``trunk_optimizer.safetensors``.

        Returns:
            The files written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if self.mode in WEIGHTS_FILES:
            path = out / WEIGHTS_FILES[self.mode]
            path.write_bytes(self.weights)
            written.append(path)
        if self.optimizer is not None:
            path = out / OPTIMIZER_FILE
            path.write_bytes(self.optimizer)
            written.append(path)
        return written

    @classmethod
    def load(cls, directory: str | Path, mode: str = "lora") -> TrunkState:
        """Read what :meth:`save` wrote.

        Raises:
            FileNotFoundError: the weights file is missing.
        """
        base = Path(directory)
        weights = (base / WEIGHTS_FILES[mode]).read_bytes() if mode in WEIGHTS_FILES else b""
        opt = base / OPTIMIZER_FILE
        return cls(mode, weights, opt.read_bytes() if opt.is_file() else None)


class TrainingSession:
    """One training run on a trunk. Use as ``async with await trunk.open_training(...) as s:``.

    Attributes:
        training_id: The session's id on the trunk.
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        adapter_id: The trained adapter's name (LoRA only); inference sessions can open with it.
        trainable_parameters: Elements the trunk's optimizer updates.
    """

    training_id: str = ""
    mode: str = ""
    adapter_id: str | None = None
    trainable_parameters: int = 0

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

    async def optimizer_step(self) -> int:
        """Apply the gradients accumulated by ``backward(apply=False)``; returns optimizer steps so far."""
        raise NotImplementedError

    async def state(self, *, optimizer: bool = True) -> TrunkState:
        """The trained weights (and the optimizer's state) as safetensors bytes."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """End the session; kept graphs are freed, a trained adapter stays loaded (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> TrainingSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class LocalTrainingSession(TrainingSession):
    """A training session of a :class:`LocalTrunk`, run on the trunk's worker thread."""

    def __init__(
        self, owner: LocalTrunk, worker: StageWorker, trainer: TrunkTrainer, pending: PendingSteps, adapter_id: str | None
    ) -> None:
        self._owner = owner
        self._worker = worker
        self._trainer = trainer
        self._pending = pending
        self.training_id = uuid.uuid4().hex[:16]
        self.mode = trainer.mode
        self.adapter_id = adapter_id
        self.trainable_parameters = trainer.num_trainable
        self._closed = False

    def _check(self, action: str) -> None:
        if self._closed:
            raise ClientClosed(f"Cannot {action}, as this training session has been closed.")

    @property
    def pending_steps(self) -> int:
        """Steps of this session waiting for their backward."""
        return len(self._pending.of_owner(self.training_id))

    async def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        self._check("run a training forward")
        self._pending.expire()
        try:
            self._pending.check_room()
        except PendingFull as exc:
            raise TrunkBusy(str(exc)) from None
        try:
            out, graph = await self._worker.run(self._trainer.forward, hidden, attention_mask, position_ids)
        except ValueError as exc:
            raise TrunkRejected(f"the trunk refused the training forward: {exc}") from exc
        try:
            return out, self._pending.add(self.training_id, graph)  # (B, T, H), step id
        except PendingFull as exc:
            graph.release()
            raise TrunkBusy(str(exc)) from None

    async def evaluate(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        self._check("run an evaluation forward")
        try:
            return await self._worker.run(self._trainer.evaluate, hidden, attention_mask, position_ids)  # (B, T, H)
        except ValueError as exc:
            raise TrunkRejected(f"the trunk refused the evaluation forward: {exc}") from exc

    async def backward(self, step_id: int, grad_output: torch.Tensor, *, apply: bool = True) -> torch.Tensor:
        self._check("run a backward")
        try:
            graph = self._pending.get(self.training_id, step_id)
        except StepNotFound as exc:
            raise SessionNotFound(str(exc)) from None
        problem = backward_problem(graph.shape, grad_output, apply, len(self._pending.of_owner(self.training_id)))
        if problem:
            raise TrunkRejected(problem)
        self._pending.pop(self.training_id, step_id)
        return await self._worker.run(self._trainer.backward, graph, grad_output, apply)  # (B, T, H)

    async def optimizer_step(self) -> int:
        self._check("step the optimizer")
        others = len(self._pending.of_owner(self.training_id))
        if others:
            raise TrunkRejected(apply_blocked(others))
        return await self._worker.run(self._trainer.optimizer_step)

    async def state(self, *, optimizer: bool = True) -> TrunkState:
        self._check("save the training state")
        return await self._worker.run(trunk_state, self._trainer, optimizer, self.adapter_id)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pending.drop_owner(self.training_id)
        self._owner._training.discard(self)


def trunk_state(trainer: TrunkTrainer, optimizer: bool, adapter_id: str | None) -> TrunkState:
    """(worker) Serialise a trainer's weights and optimizer state."""
    weights, opt = serialize_state(trainer, optimizer)
    return TrunkState(trainer.mode, weights, opt, adapter_id)


def backward_problem(shape: tuple[int, ...], grad: torch.Tensor, apply: bool, pending_of_owner: int) -> str | None:
    """Why a backward cannot run, as a sentence; None if it can."""
    if tuple(grad.shape) != tuple(shape):
        return (
            f"grad_output has shape {list(grad.shape)} but the trunk output of this step has shape "
            f"{list(shape)}; send the gradient of the loss w.r.t. that output."
        )
    if apply and pending_of_owner > 1:
        return apply_blocked(pending_of_owner - 1)
    return None


def apply_blocked(others: int) -> str:
    """The sentence for an optimizer step while graphs of the session are still kept."""
    return (
        f"the optimizer cannot step while {others} other step(s) of this training session wait for "
        "their backward (their graphs hold the current weights); run their backward with apply=False first."
    )


async def open_local_training(
    owner: LocalTrunk,
    worker: StageWorker,
    pending: PendingSteps,
    mode: str,
    lora: LoraConfig | None,
    optimizer: OptimizerConfig | None,
    adapter_id: str | None,
    weights: bytes | None,
    optimizer_state: bytes | None,
) -> LocalTrainingSession:
    """Build a :class:`LocalTrainingSession` (see ``LocalTrunk.open_training``)."""
    from ..training._config import TRUNK_MODES

    if mode not in TRUNK_MODES:
        raise ConfigError(f"mode must be one of {', '.join(TRUNK_MODES)}, got {mode!r}.")
    check_adapter_id(adapter_id, "adapter_id", allow_none=True)
    optimizer = optimizer or OptimizerConfig()
    registry = owner._adapters
    adapter = None
    created = False
    if mode == "lora":
        if adapter_id is not None and adapter_id in registry.adapters:
            adapter = registry.adapters[adapter_id]
        else:
            adapter_id = adapter_id or registry.new_id()
            try:
                registry.check_room(adapter_id)
            except PendingFull as exc:
                raise TrunkBusy(str(exc)) from None
            adapter = await worker.run(create_adapter, owner.trunk, lora or LoraConfig(), adapter_id, weights)
            registry.adapters[adapter_id] = adapter
            created = True
    elif adapter_id is not None:
        raise ConfigError(f"adapter_id={adapter_id!r} is only meaningful for mode='lora', not {mode!r}.")
    try:
        trainer = await worker.run(TrunkTrainer, owner.trunk, mode, optimizer, adapter)
        if weights and not created:  # a new adapter was built from them already
            tensors, _ = await worker.run(from_safetensors, weights)
            await worker.run(trainer.load_weights, tensors)
        if optimizer_state:
            tensors, meta = await worker.run(from_safetensors, optimizer_state)
            await worker.run(trainer.load_optimizer_state, tensors, meta)
    except BaseException:
        if created:
            registry.adapters.pop(adapter_id, None)  # type: ignore[arg-type]
        raise
    return LocalTrainingSession(owner, worker, trainer, pending, adapter_id if mode == "lora" else None)
