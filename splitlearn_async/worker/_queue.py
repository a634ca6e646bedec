"""The queue: work items and their submission from the event loop.

A coroutine wraps its call in a work item (a :class:`PlainItem` or a :class:`BatchedItem`),
:meth:`WorkQueue.submit` puts it on an ``asyncio.Queue`` with an ``asyncio.Future`` for its
outcome, and the caller awaits that future. Items leave the queue in the order they came
(``_gathering`` decides which of them run together, and holds background items back
while other work waits).
:data:`STOP`, queued by ``stop()``, ends the worker thread after every item queued before it.

Everything here runs on the event loop, except :attr:`WorkItem.abandoned`, which the
worker thread reads.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Final

__all__ = ["STOP", "BatchedItem", "Item", "Outcome", "PlainItem", "Sentinel", "WorkItem", "WorkQueue"]


class WorkItem:
    """One submission, waiting for its outcome: a :class:`PlainItem` or a :class:`BatchedItem`.

    Payloads and results are of any type: items of many callers with many signatures
    share one queue, and :class:`~splitlearn_async.worker.StageWorker` gives each caller
    back the type it asked for.
    """

    __slots__ = ("abandoned", "background", "future")

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] | None = None
        # Set on the loop once nobody waits for the result (cancelled, failed at stop);
        # read by the worker thread, which then skips the item. A bool store is atomic.
        self.abandoned = False
        # Background work (training segments) yields to the rest: see ``_gathering``.
        self.background = False


class PlainItem(WorkItem):
    """A plain call, run alone: ``call()``."""

    __slots__ = ("call",)

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__()
        self.call = call


class BatchedItem(WorkItem):
    """A batched item: ``payload`` goes to ``batch_fn`` with the other items waiting under ``key``."""

    __slots__ = ("batch_fn", "key", "payload")

    def __init__(self, key: Hashable, payload: Any, batch_fn: Callable[[list[Any]], Sequence[Any]]) -> None:
        super().__init__()
        self.key = key
        self.payload = payload
        self.batch_fn = batch_fn


#: A submission of either kind.
Item = PlainItem | BatchedItem


class Sentinel(enum.Enum):
    """The type of :data:`STOP`."""

    STOP = "stop"


#: The sentinel: the thread ends after the items queued before it.
STOP: Final = Sentinel.STOP

#: (item, result, exception): what the thread hands back for one item.
Outcome = tuple[WorkItem, Any, BaseException | None]


class WorkQueue:
    """The items waiting for the worker thread, and the calls still waiting for an outcome."""

    def __init__(self) -> None:
        # asyncio primitives bind to the loop that first uses them (Python >= 3.10)
        self._queue: asyncio.Queue[Item | Sentinel] = asyncio.Queue()
        self._pending: set[Item] = set()

    def qsize(self) -> int:
        """Items waiting (not counting those the thread has taken)."""
        return self._queue.qsize()

    def submit(self, item: Item, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        """Queue ``item`` and return the future its caller awaits."""
        future = loop.create_future()
        item.future = future
        self._pending.add(item)
        future.add_done_callback(functools.partial(self._on_done, item))
        self._queue.put_nowait(item)
        return future

    def _on_done(self, item: Item, future: asyncio.Future[Any]) -> None:
        """Done-callback (loop): nobody needs the item any more; the thread skips it if not started."""
        item.abandoned = True
        self._pending.discard(item)

    def put_stop(self) -> None:
        """Queue :data:`STOP`, after every item already queued."""
        self._queue.put_nowait(STOP)

    async def get(self) -> Item | Sentinel:
        """The next item, waiting for one if none is queued."""
        return await self._queue.get()

    def get_nowait(self) -> Item | Sentinel:
        """The next item.

        Raises:
            asyncio.QueueEmpty: nothing is queued.
        """
        return self._queue.get_nowait()

    def fail_pending(self, make_error: Callable[[], BaseException]) -> int:
        """Fail every unfinished call with a fresh error from ``make_error``; return how many."""
        failed = 0
        for item in list(self._pending):
            item.abandoned = True  # before set_exception: its done-callback runs only later
            if item.future is not None and not item.future.done():
                item.future.set_exception(make_error())
                failed += 1
        return failed

    def discard_queued(self) -> None:
        """Drop every queued item (once their callers have been failed)."""
        while not self._queue.empty():
            self._queue.get_nowait()
