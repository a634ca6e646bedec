"""Training forwards waiting for their backward: the kept autograd graphs, bounded in number and age."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import StepNotFound, TrunkBusy

__all__ = ["PendingSteps", "StepGraph"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class StepGraph:
    """The kept autograd graph of one training forward.

    Attributes:
        inputs: ``(B, T, H)`` leaf tensor the trunk ran on (its gradient is the answer).
        outputs: ``(B, T, H)`` trunk output still attached to the graph.
        nbytes: Bytes of the tensors autograd saved for the backward (activations).
        owner: The training session the step belongs to.
        step_id: Its id.
        created_s: Clock time of the forward.
        segments: ``(input, output, rows)`` of each work item the forward ran, in order
            (``training._segments``): the input a leaf (the first is ``inputs``, the next
            ones the previous output detached), the output attached to the item's own
            graph (the last is ``outputs``); ``rows`` None, or the chunk of rows the item
            ran when one layer over every row was more than a segment's tokens.
        rows: This step's rows of ``segments`` when its forward ran batched with other
            sessions' (their graphs are shared; ``outputs`` is then this step's rows of the
            last); None when the forward ran alone.
        run: The forward that made the graph (a ``training._segments.ForwardRun``), for a
            backward that recomputes this step's rows alone; None when released.
    """

    inputs: torch.Tensor | None
    outputs: torch.Tensor | None
    nbytes: int
    owner: str = ""
    step_id: int = 0
    created_s: float = 0.0
    segments: list[tuple[torch.Tensor, torch.Tensor, slice | None]] = field(default_factory=list)
    rows: slice | None = None
    run: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.outputs.shape) if self.outputs is not None else ()

    @property
    def batch_rows(self) -> int:
        """How many rows of the forward's batch are this step's."""
        return int(self.outputs.shape[0]) if self.outputs is not None else 0

    def release(self) -> None:
        """Drop the graph (frees the saved activations)."""
        self.inputs = None
        self.outputs = None
        self.segments = []
        self.run = None
        self.nbytes = 0


class PendingSteps:
    """Graphs waiting for their backward, keyed by ``(owner, step_id)``, bounded in number and age.

    No torch here: the entries are opaque :class:`StepGraph` objects.

    Args:
        max_pending: Most graphs kept at once (over all owners).
        ttl_s: A graph older than this is dropped by :meth:`expire`.
        clock: Monotonic clock in seconds.
    """

    def __init__(self, max_pending: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_pending = max_pending
        self.ttl_s = ttl_s
        self._clock = clock
        self._steps: dict[tuple[str, int], StepGraph] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def nbytes(self) -> int:
        """Bytes of saved activations over all kept graphs."""
        return sum(g.nbytes for g in self._steps.values())

    def check_room(self) -> None:
        """Raise :class:`~splitlearn_async.errors.TrunkBusy` if no graph can be added."""
        if len(self._steps) >= self.max_pending:
            raise TrunkBusy(
                f"{len(self._steps)} training steps already wait for their backward (max_pending_steps="
                f"{self.max_pending}); send their Backward first, or wait for them to expire after {self.ttl_s} s."
            )

    def reserve(self) -> int:
        """A new step id, for a forward about to run (its graph comes to :meth:`add`)."""
        return next(self._ids)

    def add(self, owner: str, graph: StepGraph, step_id: int | None = None) -> int:
        """Keep ``graph`` for ``owner`` under ``step_id`` (a new id if None); returns the id.

        Raises:
            TrunkBusy: ``max_pending`` graphs are kept already.
        """
        self.check_room()
        if step_id is None:
            step_id = self.reserve()
        graph.owner, graph.step_id, graph.created_s = owner, step_id, self._clock()
        self._steps[(owner, step_id)] = graph
        return step_id

    def get(self, owner: str, step_id: int) -> StepGraph:
        """The graph of ``step_id`` (still kept).

        Raises:
            StepNotFound: the id is unknown to ``owner``, already used or expired.
        """
        graph = self._steps.get((owner, step_id))
        if graph is None:
            raise StepNotFound(
                f"training step {step_id} is unknown: it was never returned by a forward of this training "
                f"session, its backward already ran, or it expired (steps are kept {self.ttl_s} s); run the "
                "forward again."
            )
        return graph

    def has(self, owner: str, step_id: int) -> bool:
        """Whether the graph of ``step_id`` of ``owner`` is kept (its backward has not started)."""
        return (owner, step_id) in self._steps

    def pop(self, owner: str, step_id: int) -> StepGraph:
        """Remove and return the graph of ``step_id``; raises :class:`StepNotFound` like :meth:`get`."""
        graph = self.get(owner, step_id)
        del self._steps[(owner, step_id)]
        return graph

    def of_owner(self, owner: str) -> list[StepGraph]:
        """The kept graphs of ``owner``."""
        return [g for (o, _), g in self._steps.items() if o == owner]

    def drop_owner(self, owner: str) -> int:
        """Release every graph of ``owner``; returns how many."""
        keys = [k for k in self._steps if k[0] == owner]
        for k in keys:
            self._steps.pop(k).release()
        return len(keys)

    def expire(self) -> list[StepGraph]:
        """Release and return the graphs older than ``ttl_s``."""
        now = self._clock()
        old = [k for k, g in self._steps.items() if now - g.created_s > self.ttl_s]
        out = []
        for k in old:
            graph = self._steps.pop(k)
            logger.info(
                "training step %s of %s expired after %.1f s without a backward", k[1], k[0], now - graph.created_s
            )
            graph.release()
            out.append(graph)
        return out

    def clear(self) -> None:
        """Release everything."""
        for g in self._steps.values():
            g.release()
        self._steps.clear()
