"""The trunk's trainer: one training session's trainable parameters and their optimizer.

:class:`TrunkTrainer` holds the whole trunk, a LoRA adapter, or nothing as trainable
parameters, with their optimizer, the gradients accumulated since its last step, and the
session's saved state. The forward that keeps the autograd graph and the backward that
back-propagates the client's gradient of the trunk output through that very graph (no
recomputation) run layer segment by layer segment (:mod:`._segments`). Its methods run on
the torch worker thread only; the rules around them live in :mod:`._host`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import torch

from splitlearn_async.errors import ConfigError

from ..errors import CheckpointError, TrunkRejected
from ._config import OptimizerConfig
from ._lora import LoraAdapter
from ._safetensors import to_safetensors

__all__ = ["NonFiniteGradient", "TrunkTrainer", "serialize_state"]

logger = logging.getLogger(__name__)


class NonFiniteGradient(TrunkRejected):
    """A backward gave NaN or infinite gradients; nothing was accumulated and the step is kept."""


class TrunkTrainer:
    """One training session over a trunk: trainable parameters, optimizer, accumulation.

    Every method except the constructor runs on the torch worker thread.

    Args:
        trunk: The :class:`TrunkStage` (shared with inference sessions).
        mode: ``"lora"``, ``"full"`` or ``"frozen"``.
        optimizer: Optimizer settings for the trainable parameters.
        adapter: The LoRA adapter to train (``mode="lora"`` only).

    Raises:
        ValueError: ``mode`` and ``adapter`` do not agree.
    """

    def __init__(self, trunk: Any, mode: str, optimizer: OptimizerConfig, adapter: LoraAdapter | None = None) -> None:
        if (mode == "lora") != (adapter is not None):
            raise ConfigError("a LoRA training session needs an adapter, and only a LoRA session takes one.")
        self.trunk = trunk
        self.mode = mode
        self.adapter = adapter
        self.optimizer_config = optimizer
        if mode == "full":
            self.named_params = [(trunk.checkpoint_name(n), p) for n, p in trunk.named_parameters()]
            for _, p in self.named_params:
                p.requires_grad_(True)
        elif mode == "lora":
            self.named_params = list(adapter.named_parameters())  # type: ignore[union-attr]
        else:
            self.named_params = []
        self.params = [p for _, p in self.named_params]
        self.optimizer = optimizer.build(self.params) if self.params else None
        self.optimizer_steps = 0
        self.micro_steps = 0  # backwards since the last optimizer step
        self.last_grad_norm_sq = 0.0  # of the accumulated gradients, after the last backward

    @property
    def num_trainable(self) -> int:
        """Trainable elements."""
        return sum(p.numel() for p in self.params)

    def grad_norm_sq(self) -> float:
        """(worker) The squared L2 norm of the accumulated gradients of the trainable parameters."""
        norms = [torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None]
        if not norms:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(norms)) ** 2)

    def optimizer_step(self, scale: float = 1.0) -> int:
        """(worker) Apply the accumulated gradients (times ``scale``) and zero them; returns optimizer steps so far.

        ``scale`` is the clipping factor of a global-norm clip across the cut
        (``max_grad_norm / total norm``, at most 1).
        """
        if scale != 1.0:
            with torch.no_grad():
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        if self.optimizer is not None and self.micro_steps:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1
        self.micro_steps = 0
        return self.optimizer_steps

    def discard_gradients(self) -> None:
        """(worker) Zero accumulated gradients without stepping."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps = 0

    # --- state -----------------------------------------------------------------------------

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(worker) The trained weights and metadata: the adapter, or every trunk weight.

        The trunk's weights are the parameters themselves (detached, on the CPU), not
        copies: serialise them before the next optimizer step. (A copy of a whole trunk
        would double what a save costs; SmolLM2's trunk is 340 MB.)
        """
        if self.adapter is not None:
            return self.adapter.state_tensors(), self.adapter.metadata()
        tensors = {n: p.detach().to("cpu") for n, p in self.named_params}
        meta = {"format": "splitlearn-trunk/1", "layer_range": json.dumps(list(self.trunk.layer_range))}
        return tensors, meta

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(worker) The optimizer's state, keyed by parameter name, and its settings as metadata.

        As :meth:`weights`, the tensors are the optimizer's own (on the CPU), not copies.
        """
        tensors: dict[str, torch.Tensor] = {}
        if self.optimizer is not None:
            state = self.optimizer.state
            for name, p in self.named_params:
                for key, value in state.get(p, {}).items():
                    tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().to("cpu")
        meta = {
            "format": "splitlearn-optimizer/1",
            "optimizer": json.dumps(self.optimizer_config.to_wire()),
            "optimizer_steps": str(self.optimizer_steps),
        }
        return tensors, meta

    def load_optimizer_state(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        """(worker) Restore :meth:`optimizer_state`'s output; settings come from this session.

        Raises:
            CheckpointError: the state names parameters this session does not train.
        """
        if metadata.get("format") != "splitlearn-optimizer/1":
            raise CheckpointError(
                f"the optimizer file has format={metadata.get('format')!r}, expected 'splitlearn-optimizer/1'."
            )
        if self.optimizer is None:
            return
        index = {name: i for i, (name, _) in enumerate(self.named_params)}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, _, slot = key.rpartition("::")
            if name not in index:
                raise CheckpointError(
                    f"the optimizer file holds state for {name!r}, which this session does not train."
                )
            state.setdefault(index[name], {})[slot] = value
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        self.optimizer_steps = int(metadata.get("optimizer_steps", "0"))

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """(worker) Copy saved weights in (the adapter's, or the trunk's for ``mode="full"``).

        Raises:
            CheckpointError: a tensor is missing, extra or misshapen.
        """
        if self.adapter is not None:
            self.adapter.load_tensors(tensors)
            return
        expected = dict(self.named_params)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise CheckpointError(
                f"the trunk weights file lacks {missing[:2]} or has extra {extra[:2]}; it belongs to another trunk."
            )
        with torch.no_grad():
            for name, p in expected.items():
                if tuple(tensors[name].shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"trunk weight {name!r} has shape {list(tensors[name].shape)}, expected {list(p.shape)}."
                    )
                p.copy_(tensors[name].to(p.dtype))


def serialize_state(trainer: TrunkTrainer, optimizer: bool) -> tuple[bytes, bytes | None]:
    """(worker) ``(weights, optimizer_state)`` of a trainer as safetensors bytes.

    ``weights`` is empty for a frozen trunk; ``optimizer_state`` is None unless asked for.
    """
    weights = to_safetensors(*trainer.weights()) if trainer.mode != "frozen" else b""
    opt = to_safetensors(*trainer.optimizer_state()) if optimizer else None
    return weights, opt
