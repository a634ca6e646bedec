"""StageWorker: the one thread that runs all torch work of a process.

The event loop never runs torch: a coroutine puts a work item (with an ``asyncio.Future``)
on an ``asyncio.Queue`` and awaits the future. One worker thread takes items in a short
loop, in the manner of vLLM's engine core::

    while True:
        items = <block on the queue until something is waiting, then drain it>
        run plain items one by one; group batched items by key into chunks, one call each
        hand every result back with loop.call_soon_threadsafe

A sentinel item ends the loop. Two kinds of failure are kept apart: one item failing (its
caller gets the exception, the rest carry on) and the thread dying (every pending and
later call fails fast with :class:`WorkerDied`).

This package does not import torch; the thread imports it only to set its thread count.

Threads and OpenMP: torch's CPU kernels run on OpenMP teams, one per thread that starts a
parallel region, and libgomp stops its threads from spinning between regions as soon as
it manages more threads than there are cores. A second team in the process (the event
loop's, say, after it converted one large tensor) makes every step of the worker's team
pay futex wake-ups instead: on 2 cores a SmolLM2 trunk step went from 22 ms to 38 ms. So
the worker sets its own thread count explicitly (all cores it may run on, by default),
and while it runs, the thread that started it (the event loop's) runs torch with one
thread, which never starts a team. Load models before starting the worker with
``torch.set_num_threads(1)`` on the main thread, or on the worker itself, for the same
reason (``splitlearn serve`` does).

What lives where:

- ``_queue``: work items, the sentinel, and their submission from the event loop;
- ``_gathering``: the batch-gathering policy: how long to wait for more items (the
  expectation sources of :meth:`StageWorker.expect`) and which items run together;
- ``_execution``: running units of items on the thread, the counters
  (:class:`WorkerStats`), and delivering results and exceptions back to the loop;
- ``_worker``: :class:`StageWorker`, the facade: settings, lifecycle, submission, crashes;
- ``_malloc``: :func:`pin_malloc_thresholds`, for a long-running process's allocator.
"""

from __future__ import annotations

from ..errors import WorkerDied, WorkerStopped
from ._execution import WorkerStats
from ._malloc import pin_malloc_thresholds
from ._worker import StageWorker

__all__ = ["StageWorker", "WorkerDied", "WorkerStats", "WorkerStopped", "pin_malloc_thresholds"]
