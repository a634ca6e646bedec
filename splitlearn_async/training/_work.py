"""The training host's work on the torch worker thread: a step, segment by segment, batched over sessions.

A forward, an evaluation or a backward runs as one work item per layer segment
(:mod:`._segments`); the coroutines here send them to the worker one after another, so
the items other callers queued meanwhile (decode steps) run between two segments.

Every item is a batched item (``StageWorker.run_batched``). The first item of forwards
that wait together under one key (same trunk, same ``T``, same kind) forms one or more
:class:`~._segments.ForwardRun` over their sessions' rows, up to ``batch_tokens`` tokens
each; the next items of a run share a key of their own, and whichever of its sessions'
items runs first runs the segment for all of them. Backwards of one run at the same
segment share a key too, so those that wait together run as one backward. A session's
result comes back to its own coroutine; an error of one session's rows (NaN output,
non-finite gradients) is that session's alone.

The reply is built on the worker, in the last segment's item. Between segments
``check`` raises if the training session closed meanwhile; the session's part of the
segments' state is then dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ._engine import TrunkTrainer
from ._lora import LoraAdapter
from ._pending import StepGraph
from ._safetensors import from_safetensors
from ._segments import BackwardRun, ForwardRun, Member, backward_segment
from ._types import BatchedRunner

__all__ = ["adapter_from_bytes", "backward_steps", "forward_steps", "output"]

R = TypeVar("R")


def output(tensor: torch.Tensor, _: int) -> torch.Tensor:
    """A ``build`` for :meth:`TrainingHost.forward` and :meth:`~TrainingHost.backward` that returns the tensor itself."""
    return tensor


@dataclass(frozen=True)
class _Failed:
    """One item's error, handed back as its result (the others of the batch go on)."""

    error: BaseException


def _unwrap(result: Any) -> Any:
    if isinstance(result, _Failed):
        raise result.error
    return result


#: (run, next segment to ask for, (reply, graph) once the forward is done)
_Progress = tuple[ForwardRun, int, tuple[Any, StepGraph | None] | None]


async def forward_steps(
    batched: BatchedRunner,
    key: Hashable,
    member: Member,
    *,
    trunk: Any,
    layer_tokens: int | None,
    batch_tokens: int | None,
    keep_graph: bool,
    check: Callable[[], None],
) -> tuple[Any, StepGraph | None]:
    """Run a training forward (``keep_graph``) or an evaluation of ``member``, maybe with other sessions'.

    Args:
        batched: Runs items on the worker, batched by key.
        key: The first item's batch key: forwards that may run as one batch share it.
        member: The session's inputs, trainer and ``build``.
        trunk: The trunk stage.
        layer_tokens: ``TrainingLimits.segment_layer_tokens``.
        batch_tokens: ``TrainingLimits.batch_tokens``.
        keep_graph: Keep the graph for a backward (False: evaluate).
        check: Raises if the session closed meanwhile (between segments).

    Returns:
        ``(build(output, step_id), graph)``; the graph is None for an evaluation.
    """
    start = _Start(trunk, layer_tokens, batch_tokens, keep_graph)
    run: ForwardRun | None = None
    try:
        run, index, finished = _unwrap(await batched(key, member, start))
        while finished is None:
            check()
            run, index, finished = _unwrap(
                await batched(("train-segment", id(run), index), (run, index, member), _segment)
            )
        done: tuple[Any, StepGraph | None] = finished
        return done
    except BaseException:
        if run is not None and len(run.members) == 1:  # others' rows stay theirs
            run.release()
        raise


@dataclass(frozen=True)
class _Start:
    """(worker) The batch function of forwards' first items: form the runs, run their first segment."""

    trunk: Any
    layer_tokens: int | None
    batch_tokens: int | None
    keep_graph: bool

    def __call__(self, members: list[Member]) -> list[_Progress | _Failed]:
        results: dict[int, _Progress | _Failed] = {}
        for group in _groups(members, self.batch_tokens, self.layer_tokens):
            try:
                run = ForwardRun(self.trunk, [members[i] for i in group], self.layer_tokens, self.keep_graph)
                run.advance(0)
            except Exception as exc:
                results.update((i, _Failed(exc)) for i in group)
                continue
            results.update((i, _progress(run, members[i])) for i in group)
        return [results[i] for i in range(len(members))]


def _groups(members: Sequence[Member], batch_tokens: int | None, layer_tokens: int | None) -> list[list[int]]:
    """Members, in order, cut into runs, one step per trainer each.

    A run holds at most ``batch_tokens`` tokens, and no more than one segment's
    ``layer_tokens`` (unless its first member alone has more): a batch's segment then
    takes no longer than one session's, and a decode step waits for one segment at most.
    """
    groups: list[list[int]] = []
    tokens = limit = 0
    for i, m in enumerate(members):
        size = m.hidden.shape[:2].numel()
        last = groups[-1] if groups else None
        if (
            last is None
            or batch_tokens is None
            or tokens + size > limit
            or any(members[j].trainer is m.trainer for j in last)
        ):
            limit = batch_tokens or 0
            if layer_tokens is not None:
                limit = min(limit, max(layer_tokens, size))
            groups.append([i])
            tokens = size
        else:
            last.append(i)
            tokens += size
    return groups


def _segment(items: list[tuple[ForwardRun, int, Member]]) -> list[_Progress | _Failed]:
    """(worker) The batch function of a run's next items: run the segment once, for every member."""
    run, index, _ = items[0]
    try:
        run.advance(index)
    except Exception as exc:
        return [_Failed(exc)] * len(items)
    return [_progress(run, m) for _, _, m in items]


def _progress(run: ForwardRun, member: Member) -> _Progress | _Failed:
    """(worker) Where ``member`` stands after a segment: the next to ask for, or its reply and graph."""
    if not run.done:
        return run, run.next_segment, None
    try:
        out, graph = run.finish(member)  # (B, T, H) on the CPU
        return run, run.next_segment, (member.build(out, member.step_id), graph)
    except Exception as exc:
        return _Failed(exc)


async def backward_steps(
    batched: BatchedRunner,
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
    forward = id(graph.run)
    while True:
        key = ("train-backward", forward, run.next_segment)
        done, reply = _unwrap(await batched(key, (run, apply, build), _backward))
        if done:
            result: R = reply
            return result
        check()


def _backward(items: list[tuple[BackwardRun, bool, Callable[[torch.Tensor, int], Any]]]) -> list[Any]:
    """(worker) The batch function of backwards at one segment of one forward: one backward for all."""
    results: dict[int, Any] = {}
    live: list[int] = []
    for i, (run, _, _) in enumerate(items):
        try:
            run.check()
            live.append(i)
        except Exception as exc:
            results[i] = _Failed(exc)
    try:
        outcomes = backward_segment([items[i][0] for i in live]) if live else []
    except Exception as exc:
        outcomes = [exc] * len(live)
    for i, outcome in zip(live, outcomes, strict=True):
        run, apply, build = items[i]
        if outcome is not None:
            results[i] = _Failed(outcome)
        elif not run.done:
            results[i] = (False, None)
        else:
            try:
                grad_in = run.finish(apply)  # (B, T, H) on the CPU
                results[i] = (True, build(grad_in, run.trainer.optimizer_steps))
            except Exception as exc:
                results[i] = _Failed(exc)
    return [results[i] for i in range(len(items))]


def adapter_from_bytes(trunk: Any, weights: bytes, adapter_id: str) -> LoraAdapter:
    tensors, meta = from_safetensors(weights)
    return LoraAdapter.from_tensors(trunk, tensors, meta, adapter_id)
