"""Gathering: which queued items run together, and how long to wait for more.

On the event loop, :meth:`Gatherer.next_batch` waits for the first item, takes every other
item already waiting, and then, by the :class:`BatchPolicy`, waits a little for more: up
to ``max_batch_delay_s`` for a full batch, or up to ``max_gather_wait_s`` for the items
that the sources added with :meth:`Gatherer.expect` announce. On the worker thread,
:func:`plan` cuts what was gathered into units of one call each.

**Background items** (training segments: ``StageWorker.run_batched(..., background=True)``)
yield to the rest. A gathered batch holds every other item waiting, and at most one unit
of background work: the oldest background item, with the batched items of its key. The
other background items wait, in order, for the next batch. So an inference step waits for
at most one background unit (the one running when it arrives), however many trainers
queued theirs, and background work still advances by one unit per batch.

No tensors and no threads here: the policy can be tested with synthetic items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

from ._queue import STOP, BatchedItem, Item, PlainItem, Sentinel, WorkQueue

__all__ = ["BatchPolicy", "Gathered", "Gatherer", "Unit", "plan"]

#: What runs with one call: a plain call, or a chunk of batched items of one key.
Unit = PlainItem | list[BatchedItem]


class BatchPolicy(Protocol):
    """The batching settings, read afresh whenever a batch is formed (see ``StageWorker``)."""

    max_batch_size: int
    max_batch_delay_s: float
    batching: bool
    max_gather_wait_s: float


class Gathered:
    """Items taken from the queue in one go, in order, and whether :data:`STOP` came after them."""

    __slots__ = ("items", "stop")

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.stop = False

    def add(self, item: Item | Sentinel) -> None:
        """Take one item off the queue into the batch."""
        if item is STOP:
            self.stop = True
        else:
            self.items.append(item)

    def batched(self) -> int:
        """How many of the items are batched items (not plain calls)."""
        return sum(1 for item in self.items if isinstance(item, BatchedItem))


class Gatherer:
    """Forms the batches of one worker from its queue, by its policy (on the loop).

    Args:
        queue: The worker's queue.
        policy: The worker's settings; read each time, so a change applies to the next batch.
    """

    def __init__(self, queue: WorkQueue, policy: BatchPolicy) -> None:
        self._queue = queue
        self._policy = policy
        self._expected_sources: list[Callable[[], int]] = []
        self._held: list[Item] = []  # background items taken off the queue, waiting for a batch of their own

    @property
    def held(self) -> int:
        """Background items held back for a later batch."""
        return len(self._held)

    def discard_held(self) -> None:
        """Forget the held items (their callers have been failed)."""
        self._held.clear()

    def expect(self, source: Callable[[], int]) -> None:
        """Add a source of how many batched items are expected soon."""
        self._expected_sources.append(source)

    def _expected(self) -> int:
        """Batched items expected soon, by the sources of :meth:`expect`."""
        return sum(source() for source in self._expected_sources)

    async def next_batch(self) -> Gathered:
        """Wait for the first item, then take everything else already waiting.

        Then wait for more, up to ``max_batch_delay_s`` for a full batch, or up to
        ``max_gather_wait_s`` for the items :meth:`expect`'s sources announce.
        """
        policy = self._policy
        loop = asyncio.get_running_loop()
        gathered = Gathered()
        if not self._held:
            gathered.add(await self._queue.get())
        self._drain(gathered)
        target, wait_s = policy.max_batch_size, policy.max_batch_delay_s
        if policy.max_gather_wait_s > wait_s and self._expected_sources and self._wants_more(gathered):
            expected = min(policy.max_batch_size, self._expected())
            if expected > gathered.batched():
                target, wait_s = expected, policy.max_gather_wait_s
        if wait_s > 0 and self._wants_more(gathered, target):
            deadline = loop.time() + wait_s
            while self._wants_more(gathered, target):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    gathered.add(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
                self._drain(gathered)
        self._hold_background(gathered)
        return gathered

    def _hold_background(self, gathered: Gathered) -> None:
        """Keep one unit of background work in ``gathered`` (all of it before STOP); hold the rest back."""
        if not self._held and not any(item.background for item in gathered.items):
            return  # no background work (inference alone): the batch as gathered
        self._held += [item for item in gathered.items if item.background]
        items = [item for item in gathered.items if not item.background]
        if gathered.stop:  # the worker ends after this batch: everything queued before STOP runs
            items += self._held
            self._held = []
        else:
            self._held = [item for item in self._held if not item.abandoned]
            if self._held:
                first = self._held[0]
                key = first.key if isinstance(first, BatchedItem) else None
                unit = [
                    item
                    for item in self._held
                    if item is first or (key is not None and isinstance(item, BatchedItem) and item.key == key)
                ]
                items += unit
                taken = {id(item) for item in unit}
                self._held = [item for item in self._held if id(item) not in taken]
        gathered.items = items

    def _drain(self, gathered: Gathered) -> None:
        """Take every queued item into ``gathered``, stopping after :data:`STOP`."""
        while not gathered.stop:
            try:
                gathered.add(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _wants_more(self, gathered: Gathered, target: int | None = None) -> bool:
        """True while a batch could still grow to ``target`` (default: a full batch)."""
        policy = self._policy
        if gathered.stop or not policy.batching:
            return False
        batched = gathered.batched()
        return 0 < batched < min(policy.max_batch_size, target or policy.max_batch_size)


def plan(items: Sequence[Item], max_batch_size: int, batching: bool) -> list[Unit]:
    """Split gathered items into units, each run with one call, in order of first arrival.

    A plain call is a unit of its own. Batched items with equal keys are grouped at the
    place of the group's first item (so a batched item may overtake a plain call queued
    before it), then cut into chunks of at most ``max_batch_size`` (1 when batching is off).
    """
    units: list[Unit] = []
    groups: dict[Hashable, list[BatchedItem]] = {}
    for item in items:
        if isinstance(item, PlainItem):
            units.append(item)
            continue
        group = groups.get(item.key)
        if group is None:
            group = groups[item.key] = []
            units.append(group)
        group.append(item)
    size = max_batch_size if batching else 1
    chunked: list[Unit] = []
    for unit in units:
        if isinstance(unit, list):
            chunked.extend(unit[i : i + size] for i in range(0, len(unit), size))
        else:
            chunked.append(unit)
    return chunked
