"""``SplitTrainer``: one training step through bottom -> trunk -> top and back.

One :meth:`SplitTrainer.step` is::

    client worker   hidden = bottom(ids)                       (B, T, H), graph kept
    trunk           out, step_id = trunk.forward(hidden)       (B, T, H), graph kept there
    client worker   loss = loss_fn(top(out), labels); loss.backward()  -> top grads, d loss/d out
    trunk           d_in = trunk.backward(step_id, d out)      (B, T, H); trunk optimizer steps
    client worker   hidden.backward(d_in)                      -> bottom grads; client optimizer steps

so the gradients are exactly those of the unsplit model. Bottom and top run on the
client's :class:`~splitlearn_async.worker.StageWorker`, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from ..errors import ClientClosed, ConfigError, StateError
from ..models.positions import prompt_positions
from ..models.stages import BottomStage, TopStage
from ..training import IGNORE_INDEX, TrainingConfig, causal_lm_loss
from ..worker import StageWorker
from ._defenses import Defense, check_defense
from ._protocols import TrainableTrunk
from ._training import TrainingSession

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SplitTrainer"]

logger = logging.getLogger(__name__)

#: A training batch: ``input_ids (B, T)``, or a map of ``input_ids`` and optional
#: ``attention_mask``, ``labels`` and ``position_ids``, each ``(B, T)``.
Batch = Mapping[str, torch.Tensor] | torch.Tensor
#: What the bottom's forward hands on: ``(hidden with graph, hidden to send, mask, positions, labels)``.
_BottomOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class SplitTrainer:
    """Trains a split model: bottom and top here, the trunk behind a training session.

    Use ``async with SplitTrainer(bottom, trunk, top, TrainingConfig(...)) as trainer:``
    and ``loss = await trainer.step(batch)``. Many trainers (and generations) may share
    one event loop; each step awaits its worker calls and the trunk, and blocks nothing.

    Args:
        bottom: The client's :class:`BottomStage`.
        trunk: A ``LocalTrunk`` or a ``RemoteTrunk`` (any :class:`~._protocols.TrainableTrunk`).
        top: The client's :class:`TopStage`.
        config: What trains and how; ``None`` uses ``TrainingConfig()`` (LoRA on the trunk).
        loss_fn: ``loss_fn(logits (B, T, V), labels (B, T)) -> scalar``; default
            :func:`causal_lm_loss`.
        worker: The worker thread for bottom and top; by default the trainer starts its own
            on first use and stops it in :meth:`aclose`.
        defense: Applied to the bottom's output before every trunk forward (training and
            :meth:`evaluate`), inside the bottom's autograd graph, e.g. ``GaussianNoise(sigma)``
            or ``DChiNoise(eta)``; ``None`` (the default) sends the bottom's output unchanged.

    Raises:
        ConfigError: ``config`` is not a :class:`TrainingConfig`, or nothing would train.
        ArgumentError: ``defense`` is not callable.
    """

    def __init__(
        self,
        bottom: BottomStage,
        trunk: TrainableTrunk,
        top: TopStage,
        config: TrainingConfig | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        worker: StageWorker | None = None,
        defense: Defense | None = None,
    ) -> None:
        config = TrainingConfig() if config is None else config
        if not isinstance(config, TrainingConfig):
            raise ConfigError(f"config must be a TrainingConfig, got {type(config).__name__}.")
        self.bottom = bottom
        self.trunk = trunk
        self.top = top
        self.config = config
        self.loss_fn = loss_fn or causal_lm_loss
        self.defense = check_defense(defense)
        params: dict[int, torch.nn.Parameter] = {}
        for stage, wanted in ((bottom, config.train_bottom), (top, config.train_top)):
            if wanted:
                params.update({id(p): p for p in stage.parameters() if p.requires_grad})
        self.client_parameters = list(params.values())
        # back-propagate into the bottom only if something there trains (tied embeddings count)
        self._bottom_trains = any(id(p) in params for p in bottom.parameters())
        self.optimizer: torch.optim.Optimizer | None = (
            config.optimizer.build(self.client_parameters) if self.client_parameters else None
        )
        if self.optimizer is None and config.trunk == "frozen":
            raise ConfigError("nothing would train: train_bottom and train_top are off and the trunk is frozen.")
        self._worker = worker
        self._owns_worker = worker is None
        self._session: TrainingSession | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self.micro_steps = 0  #: step() calls so far
        self.optimizer_steps = 0  #: optimizer steps so far (client and trunk step together)

    # --- lifecycle -----------------------------------------------------------------------

    async def _ensure_worker(self) -> StageWorker:
        if self._closed:
            raise ClientClosed("Cannot train, as the SplitTrainer has been closed.")
        if self._worker is None:
            self._worker = StageWorker(name="splitlearn-trainer")
        if not self._worker.is_running:
            await self._worker.start()
        return self._worker

    async def session(self) -> TrainingSession:
        """The trunk's training session, opened on first use.

        Raises:
            ConfigError: the trunk offers no training interface.
            TrunkError: the trunk refused to open the session.
        """
        async with self._open_lock:
            if self._session is None:
                if not hasattr(self.trunk, "open_training"):  # an untyped caller passed a stage or the like
                    raise ConfigError(f"{type(self.trunk).__name__} cannot train: pass a LocalTrunk or a RemoteTrunk.")
                c = self.config
                self._session = await self.trunk.open_training(
                    c.trunk,
                    lora=c.lora,
                    optimizer=c.effective_trunk_optimizer,
                    adapter_id=c.adapter_id if c.trunk == "lora" else None,
                )
            return self._session

    @property
    def adapter_id(self) -> str | None:
        """The trunk adapter being trained (after the first step), for inference sessions."""
        return None if self._session is None else self._session.adapter_id

    async def aclose(self) -> None:
        """Close the trunk's training session (a trained adapter stays loaded there) and the worker."""
        if self._closed:
            return
        self._closed = True
        if self._session is not None:
            await self._session.aclose()
        if self._owns_worker and self._worker is not None:
            await self._worker.stop()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- training ----------------------------------------------------------------------------

    async def step(self, batch: Batch) -> float:
        """One micro-batch: forward, backward through all three stages, and (every
        ``accumulation_steps``-th call) one optimizer step on the client and the trunk.

        Args:
            batch: ``input_ids (B, T)``, or a map with ``input_ids`` and optionally
                ``attention_mask (B, T)`` (1 = real token), ``labels (B, T)`` (default: the
                ids, :data:`IGNORE_INDEX` where the mask is 0) and ``position_ids (B, T)``
                (default: counted over the mask).

        Returns:
            This micro-batch's loss (not divided by ``accumulation_steps``).

        Raises:
            ValueError: the batch is malformed.
            TrunkError: the trunk failed (the step's client gradients are discarded).
        """
        worker = await self._ensure_worker()
        session = await self.session()
        apply = (self.micro_steps + 1) % self.config.accumulation_steps == 0
        scale = 1.0 / self.config.accumulation_steps
        clip = self.config.max_grad_norm is not None
        bottom_graph, hidden, mask, positions, labels = await worker.run(self._bottom_forward, batch)
        try:
            out, step_id = await session.forward(hidden, mask, positions)  # (B, T, H)
            loss, grad_out = await worker.run(self._top_forward_backward, out, mask, positions, labels, scale)
            # with clipping, both sides step only once the global norm is known
            grad_in = await session.backward(step_id, grad_out, apply=apply and not clip)  # (B, T, H)
            await worker.run(self._bottom_backward, bottom_graph, grad_in, apply and not clip)
            if apply and clip:
                factor = await worker.run(self._clip_factor, session.grad_norm_sq)
                await session.optimizer_step(scale=factor)
                await worker.run(self._client_step, factor)
        except BaseException:
            await worker.run(self._discard_client_grads)
            raise
        self.micro_steps += 1
        if apply:
            self.optimizer_steps += 1
        return loss

    async def evaluate(self, batch: Batch) -> float:
        """The loss on ``batch`` with the current weights (trunk adapter included); nothing trains.

        Args:
            batch: As for :meth:`step`.

        Returns:
            The loss.

        Raises:
            ValueError: the batch is malformed.
            TrunkError: the trunk failed.
        """
        worker = await self._ensure_worker()
        session = await self.session()
        _, hidden, mask, positions, labels = await worker.run(self._bottom_forward, batch, False)
        out = await session.evaluate(hidden, mask, positions)  # (B, T, H)
        return await worker.run(self._top_loss, out, mask, positions, labels)

    async def save_trunk(self, directory: str | Path, *, optimizer: bool = True) -> list[Path]:
        """Save what the trunk trained (adapter or weights, plus optimizer state) as safetensors.

        Over a ``RemoteTrunk`` the files are streamed to disk chunk by chunk (``TrainSave``),
        so a whole trunk saves under any message limit without being held in memory.

        Returns:
            The files written (``adapter.safetensors``/``trunk.safetensors``, ``trunk_optimizer.safetensors``).
        """
        session = await self.session()
        return await session.save(directory, optimizer=optimizer)

    # --- worker-thread halves ----------------------------------------------------------------

    def _bottom_forward(self, batch: Batch, grad: bool = True) -> _BottomOut:
        """(client worker) Bottom forward (keeping its graph if ``grad``); returns what the trunk needs."""
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if "input_ids" not in batch:
            raise ConfigError(f"a training batch needs 'input_ids'; it has {sorted(batch)}.")
        ids = batch["input_ids"]
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ConfigError(f"input_ids must be (batch, tokens) with at least 2 tokens, got shape {list(ids.shape)}.")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(torch.long)
        if mask.shape != ids.shape:
            raise ConfigError(
                f"attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)} like input_ids."
            )
        positions = batch.get("position_ids")
        positions = prompt_positions(mask) if positions is None else positions.to(torch.long)
        labels = batch.get("labels")
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else labels
        device = self.bottom.device
        with torch.set_grad_enabled(grad):
            hidden = self.bottom(ids.to(device), mask.to(device), positions.to(device))  # (B, T, H), with graph
            if self.defense is not None:  # in the graph: the backward goes through it
                hidden = self.defense(hidden)
        sent = hidden.detach().to("cpu")  # what crosses to the trunk
        return hidden, sent, mask, positions, labels

    def _top_forward_backward(
        self, out: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, scale: float
    ) -> tuple[float, torch.Tensor]:
        """(client worker) Top forward + loss + backward; returns (loss, d loss/d trunk output)."""
        device = self.top.device
        out_leaf = out.detach().to(device=device, dtype=self.top.dtype).requires_grad_(True)  # (B, T, H)
        logits = self.top(out_leaf, mask.to(device), positions.to(device))  # (B, T, V)
        loss = self.loss_fn(logits, labels)
        if self.config.train_top:
            torch.autograd.backward(loss * scale)
            grad = out_leaf.grad
        else:  # only d loss / d out: no gradients for the top's weights (the LM head is large)
            (grad,) = torch.autograd.grad(loss * scale, out_leaf)
        if grad is None:
            raise StateError("the top produced no gradient for the trunk output; is the loss connected to the logits?")
        return float(loss.detach()), grad.to(device="cpu", dtype=out.dtype)  # (B, T, H)

    def _top_loss(self, out: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> float:
        """(client worker) Top forward and loss, no graph."""
        device = self.top.device
        with torch.no_grad():
            logits = self.top(out.to(device=device, dtype=self.top.dtype), mask.to(device), positions.to(device))
            return float(self.loss_fn(logits, labels))

    def _bottom_backward(self, hidden: torch.Tensor, grad_in: torch.Tensor, apply: bool) -> None:
        """(client worker) Finish the backward into the bottom; step the client optimizer if ``apply``."""
        if self._bottom_trains:
            torch.autograd.backward(hidden, grad_in.to(device=hidden.device, dtype=hidden.dtype))  # (B, T, H)
        if apply and self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def _clip_factor(self, trunk_norm_sq: float) -> float:
        """(client worker) ``torch.nn.utils.clip_grad_norm_``'s factor over the client's and the trunk's gradients.

        The global norm is ``sqrt(client norm^2 + trunk norm^2)``; the factor is
        ``max_grad_norm / (norm + 1e-6)``, at most 1, as torch computes it.
        """
        norms = [torch.linalg.vector_norm(p.grad) for p in self.client_parameters if p.grad is not None]
        client_sq = float(torch.linalg.vector_norm(torch.stack(norms)) ** 2) if norms else 0.0
        total = math.sqrt(client_sq + trunk_norm_sq)
        max_norm = float(self.config.max_grad_norm or 0.0)
        return min(1.0, max_norm / (total + 1e-6))

    def _client_step(self, factor: float) -> None:
        """(client worker) Scale the client's gradients by the clip ``factor`` and step its optimizer."""
        if factor != 1.0:
            with torch.no_grad():
                for p in self.client_parameters:
                    if p.grad is not None:
                        p.grad.mul_(factor)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def _discard_client_grads(self) -> None:
        """(client worker) Drop the client gradients of a step that failed half-way."""
        for p in self.client_parameters:
            p.grad = None
