"""The training host's work on the torch worker thread: a step, segment by segment, and its reply.

A forward, an evaluation or a backward runs as one work item per layer segment
(:mod:`._segments`); the coroutines here send them to the worker one after another, so
the items other callers queued meanwhile (decode steps) run between two segments. The
reply is built on the worker, in the last segment's item. Between segments ``check``
raises if the training session closed meanwhile; the segments' state is then dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from ..errors import StateError
from ._engine import TrunkTrainer
from ._lora import LoraAdapter
from ._pending import StepGraph
from ._safetensors import from_safetensors
from ._segments import BackwardRun, ForwardRun, Layers, evaluate_segment
from ._types import Runner

__all__ = ["adapter_from_bytes", "backward_steps", "evaluate_steps", "forward_steps", "output"]

R = TypeVar("R")
Build = Callable[[torch.Tensor, int], Any]


def output(tensor: torch.Tensor, _: int) -> torch.Tensor:
    """A ``build`` for :meth:`TrainingHost.forward` and :meth:`~TrainingHost.backward` that returns the tensor itself."""
    return tensor


async def forward_steps(
    call: Runner,
    trainer: TrunkTrainer,
    inputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    segments: Sequence[Layers],
    build: Callable[[torch.Tensor, int], R],
    step_id: int,
    check: Callable[[], None],
) -> tuple[R, StepGraph]:
    """Run a training forward over ``inputs`` (hidden ``(B, T, H)``, mask, positions) keeping its graph.

    Returns:
        ``(build(output, step_id), graph)``.
    """
    run: ForwardRun | None = None
    try:
        for i, layers in enumerate(segments):
            if i:
                check()
            last = i == len(segments) - 1
            ran, reply = await call(_forward_item, run, trainer, inputs, layers, last, build, step_id)
            run = ran
            if last:
                result: R = reply
                return result, ran.graph
    except BaseException:
        if run is not None:
            run.release()
        raise
    raise StateError("a training forward needs at least one layer segment")  # pragma: no cover


def _forward_item(
    run: ForwardRun | None,
    trainer: TrunkTrainer,
    inputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    layers: Layers,
    last: bool,
    build: Build,
    step_id: int,
) -> tuple[ForwardRun, Any]:
    """(worker) One segment of a forward (the first makes the run); the last also builds the reply."""
    if run is None:
        run = ForwardRun(trainer, *inputs)
    try:
        run.segment(layers)
        if not last:
            return run, None
        out, _ = run.finish()  # (B, T, H) on the CPU
        return run, build(out, step_id)
    except BaseException:
        run.release()
        raise


async def evaluate_steps(
    call: Runner,
    trainer: TrunkTrainer,
    inputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    segments: Sequence[Layers],
    build: Callable[[torch.Tensor, int], R],
    check: Callable[[], None],
) -> R:
    """Run the trunk over ``inputs`` as the session trains it, without a graph; ``build(output, 0)``."""
    hidden, mask, positions = inputs
    out: Any = hidden
    for i, layers in enumerate(segments):
        if i:
            check()
        last = i == len(segments) - 1
        out = await call(_evaluate_item, trainer, out, mask, positions, layers, last, hidden.dtype, build)
    result: R = out
    return result


def _evaluate_item(
    trainer: TrunkTrainer,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    layers: Layers,
    last: bool,
    reply_dtype: torch.dtype,
    build: Build,
) -> Any:
    """(worker) One segment of an evaluation; the last builds the reply from the output."""
    out = evaluate_segment(trainer, hidden, mask, positions, layers, last, reply_dtype)  # (B, T, H)
    return build(out, 0) if last else out


async def backward_steps(
    call: Runner,
    trainer: TrunkTrainer,
    graph: StepGraph,
    grad_output: torch.Tensor,
    apply: bool,
    build: Callable[[torch.Tensor, int], R],
    check: Callable[[], None],
) -> R:
    """Back-propagate ``grad_output (B, T, H)`` through ``graph``, from its last segment down.

    Returns:
        ``build(grad_input, optimizer_steps)``, after the gradients were accumulated (and
        the optimizer stepped, with ``apply``).
    """
    run = BackwardRun(trainer, graph, grad_output)
    while True:
        done, reply = await call(_backward_item, run, apply, build)
        if done:
            result: R = reply
            return result
        check()


def _backward_item(run: BackwardRun, apply: bool, build: Build) -> tuple[bool, Any]:
    """(worker) One segment of a backward; after the first segment, accumulate and build the reply."""
    run.segment()
    if not run.done:
        return False, None
    grad_in = run.finish(apply)  # (B, T, H) on the CPU
    return True, build(grad_in, run.trainer.optimizer_steps)


def adapter_from_bytes(trunk: Any, weights: bytes, adapter_id: str) -> LoraAdapter:
    tensors, meta = from_safetensors(weights)
    return LoraAdapter.from_tensors(trunk, tensors, meta, adapter_id)
