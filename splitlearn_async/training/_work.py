"""The training host's work on the torch worker thread: a step and its reply in one item."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ._engine import TrunkTrainer
from ._lora import LoraAdapter
from ._pending import StepGraph
from ._safetensors import from_safetensors

__all__ = ["adapter_from_bytes", "backward_work", "evaluate_work", "forward_work", "output"]

R = TypeVar("R")


def output(tensor: torch.Tensor, _: int) -> torch.Tensor:
    """A ``build`` for :meth:`TrainingHost.forward` and :meth:`~TrainingHost.backward` that returns the tensor itself."""
    return tensor


def forward_work(
    trainer: TrunkTrainer,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    build: Callable[[torch.Tensor, int], R],
    step_id: int,
) -> tuple[R, StepGraph]:
    out, graph = trainer.forward(hidden, mask, positions)  # (B, T, H)
    try:
        return build(out, step_id), graph
    except BaseException:
        graph.release()
        raise


def evaluate_work(
    trainer: TrunkTrainer,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    build: Callable[[torch.Tensor, int], R],
) -> R:
    return build(trainer.evaluate(hidden, mask, positions), 0)  # (B, T, H)


def backward_work(
    trainer: TrunkTrainer, graph: StepGraph, grad: torch.Tensor, apply: bool, build: Callable[[torch.Tensor, int], R]
) -> R:
    grad_in = trainer.backward(graph, grad, apply)  # (B, T, H)
    return build(grad_in, trainer.optimizer_steps)


def adapter_from_bytes(trunk: Any, weights: bytes, adapter_id: str) -> LoraAdapter:
    tensors, meta = from_safetensors(weights)
    return LoraAdapter.from_tensors(trunk, tensors, meta, adapter_id)
