"""Which training calls of different sessions run as one batch, and a backward's wait for its batch-mates.

Two halves of one policy, kept on the event loop (the worker side is ``_segments.py``):

- :func:`forward_key` is the batch key of a training forward's first work item: forwards
  that wait on the worker together under one key form one ``ForwardRun`` (equal ``T``, the
  same kind of call, the same trunk); a full-trunk session's forwards, and every forward
  when ``batch_tokens`` is None, get keys of their own.
- :class:`BatchMates` lets the backward of a batched forward wait (up to
  ``batch_wait_s``) until its batch-mates of other sessions have sent theirs or dropped
  their steps, so that the backwards meet on the worker as one batch. The host calls
  :meth:`BatchMates.graphs_changed` whenever a kept graph is taken (a backward starts) or
  dropped (closed, expired, cleared).
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from ._pending import PendingSteps, StepGraph
from ._types import TrainingEntry, TrainingLimits

__all__ = ["BatchMates", "forward_key"]


def forward_key(
    trunk: Any,
    limits: TrainingLimits,
    entry: TrainingEntry,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    keep_graph: bool,
) -> Any:
    """The batch key of a training forward's first item: forwards that may run as one batch share it.

    Equal ``T`` and the same kind of call (with or without a graph, masks, positions) on the
    same trunk. A full-trunk session trains weights every row uses, so its forwards run
    alone; so do all with ``limits.batch_tokens`` None.
    """
    if limits.batch_tokens is None or entry.mode == "full":
        return object()  # a key of its own
    return ("train-start", id(trunk), keep_graph, int(hidden.shape[1]), attention_mask is None, position_ids is None)


class BatchMates:
    """The backwards of batched forwards waiting for their batch-mates (on the event loop).

    Args:
        limits: The host's caps (``batch_wait_s``).
        pending: The host's kept graphs: a batch-mate is on its way while its step is kept there.
    """

    def __init__(self, limits: TrainingLimits, pending: PendingSteps) -> None:
        self._limits = limits
        self._pending = pending
        self._waiters: set[asyncio.Future[None]] = set()

    async def wait(self, training_id: str, graph: StepGraph) -> None:
        """Wait (up to ``batch_wait_s``) for the other sessions of ``graph``'s forward to send their backward.

        Their backwards then run as one; without them, this one recomputes its own rows
        (see ``training._segments.backward_segment``). Call it after the step left
        ``pending`` and :meth:`graphs_changed` was called.
        """
        run, wait_s = graph.run, self._limits.batch_wait_s
        if run is None or len(run.members) < 2:
            return
        # The batch-mates this arrival woke submit their items first, then this one: the worker's
        # gatherer, whose next step may already be queued on the loop, sees them all together.
        await asyncio.sleep(0)
        if wait_s <= 0:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while any(m.owner != training_id and self._pending.has(m.owner, m.step_id) for m in run.members):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            # A bare future, not wait_for: woken by graphs_changed, this task runs before the worker
            # gathers the item of the batch-mate that woke it, so their items meet in one batch.
            woken: asyncio.Future[None] = loop.create_future()
            self._waiters.add(woken)
            timer = loop.call_later(remaining, _resolve, woken)
            try:
                await woken
            finally:
                timer.cancel()
                self._waiters.discard(woken)

    def graphs_changed(self) -> None:
        """Wake the waiting backwards: a kept graph was taken or dropped."""
        for woken in self._waiters:
            _resolve(woken)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
